"""The gradient-cached step gives the full-batch gradients (float64, dropout on)."""
import copy

import pytest
import torch

from tests.tiny import PlainEngine, tiny_batch, tiny_model_cfg
from vlp.engine.step import Step
from vlp.models import create_model
from vlp.objectives import build_objective


def _grads_after_step(model, objective, batch, chunk):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout stream for every K
    Step(PlainEngine(model), objective, torch.device("cpu"), chunk_size=chunk)(batch)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["infonce", "siglip"])
def test_chunks_equal_full_batch(objective):
    torch.manual_seed(0)
    kw = {"init_logit_bias": -10.0} if objective == "siglip" else {}
    cfg = tiny_model_cfg(**kw)
    cfg.image["patch_dropout"] = 0.25  # random masks: RNG replay must reproduce them
    model = create_model(cfg).double().train()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in tiny_batch(16, cfg).items()}
    obj = build_objective({"name": objective})
    ref = _grads_after_step(model, obj, batch, chunk=0)
    assert "logit_scale" in ref
    for k in (2, 4):
        got = _grads_after_step(copy.deepcopy(model), obj, batch, chunk=16 // k)
        assert got.keys() == ref.keys()
        for name in ref:
            err = (got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)
            assert err <= 1e-6, (k, name, float(err))


def test_logit_scale_grad_counted_once():
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    model = create_model(cfg).double()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in tiny_batch(16, cfg).items()}
    obj = build_objective({"name": "infonce"})
    full = _grads_after_step(model, obj, batch, chunk=0)["logit_scale"]
    cached = _grads_after_step(copy.deepcopy(model), obj, batch, chunk=4)["logit_scale"]
    assert torch.allclose(full, cached, rtol=1e-9)  # not 4x (open_clip --accum-freq counts it per chunk)
