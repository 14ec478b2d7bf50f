"""The gradient-cached step gives the full-batch gradients for every registered objective
(float64, drop-path and patch dropout on, labels with repeats).

The reference is one backward through the whole batch's graph. With stochastic layers
it is built chunk by chunk under the same seed, so that it draws the same masks as the
cached step: which random numbers a mask uses depends on the batch split (timm's
drop-path draws one (B,1,1) tensor per block), not on caching. For open_clip's patch
dropout the draws are row-major and the plain unchunked pass matches as well.
"""
import copy

import pytest
import torch

from tests.tiny import OWN_MODEL_OBJECTIVES, PlainEngine, tiny_batch, tiny_model_cfg
from vlp.engine.step import Step, model_inputs, split
from vlp.models import create_model
from vlp.objectives import OBJECTIVES, build_objective

OBJECTIVE_NAMES = [n for n in OBJECTIVES.list() if n not in OWN_MODEL_OBJECTIVES]


def _setup(name: str, timm: bool):
    objective = build_objective({"name": name})
    kw = {"init_logit_bias": -10.0} if "logit_bias" in objective.scalar_keys else {}
    if timm:  # drop-path (stochastic depth) and patch dropout: RNG replay must reproduce both
        kw["image"] = {"name": "timm", "model_name": "test_vit", "image_size": 16, "drop_path": 0.2,
                       "patch_dropout": 0.25}
    cfg = tiny_model_cfg(**kw)
    if not timm:
        cfg.image["patch_dropout"] = 0.25
    torch.manual_seed(0)
    model = create_model(cfg).double().train()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in tiny_batch(16, cfg).items()}
    return model, objective, batch


def _grads_after_step(model, objective, batch, chunk):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout stream for every K
    losses = Step(PlainEngine(model), objective, torch.device("cpu"), chunk_size=chunk)(batch)
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _full_graph_grads(model, objective, batch, chunk):
    """Full-batch loss, one backward through every chunk's graph, masks drawn chunk-wise."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    outs = [model(model_inputs(c, torch.device("cpu"))) for c in split(batch, chunk)]
    out = {k: torch.cat([o[k] for o in outs]) if k in objective.rep_keys else outs[0][k] for k in outs[0]}
    step = Step(PlainEngine(model), objective, torch.device("cpu"))
    losses = step._loss(out, batch, len(batch["text"]))
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(losses["loss"].detach()), grads


def _assert_close(got, ref):
    assert got.keys() == ref.keys()
    for pname in ref:
        err = (got[pname] - ref[pname]).norm() / ref[pname].norm().clamp_min(1e-30)
        assert err <= 1e-6, (pname, float(err))


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
@pytest.mark.parametrize("timm", [False, True], ids=["open_clip_vit", "timm_vit"])
def test_chunks_equal_full_batch(name, timm):
    model, objective, batch = _setup(name, timm)
    for k in (1, 2, 4):
        ref_loss, ref = _full_graph_grads(model, objective, batch, chunk=16 // k)
        assert "logit_scale" in ref or "logit_scale" not in objective.scalar_keys
        losses, got = _grads_after_step(copy.deepcopy(model), objective, batch, chunk=16 // k)
        assert abs(losses["loss"] - ref_loss) <= 1e-9 * max(1.0, abs(ref_loss)), k
        _assert_close(got, ref)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_chunks_equal_unchunked_pass(name):
    """open_clip ViT (row-major patch-dropout draws): cached == the plain one-pass step."""
    model, objective, batch = _setup(name, timm=False)
    ref_losses, ref = _grads_after_step(model, objective, batch, chunk=0)
    for k in (2, 4):
        losses, got = _grads_after_step(copy.deepcopy(model), objective, batch, chunk=16 // k)
        assert abs(losses["loss"] - ref_losses["loss"]) <= 1e-9 * max(1.0, abs(ref_losses["loss"]))
        _assert_close(got, ref)


def test_replay_matters():
    """Without RNG replay the cached gradients differ: the test above can fail."""
    model, objective, batch = _setup("infonce", timm=True)
    _, ref = _full_graph_grads(model, objective, batch, chunk=4)
    from vlp import rng

    saved = rng.set_torch_state
    rng.set_torch_state = lambda state: None
    try:
        _, got = _grads_after_step(copy.deepcopy(model), objective, batch, chunk=4)
    finally:
        rng.set_torch_state = saved
    err = max(float((got[n] - ref[n]).norm() / ref[n].norm()) for n in ref)
    assert err > 1e-3


def test_logit_scale_grad_counted_once():
    model, objective, batch = _setup("infonce", timm=False)
    full = _grads_after_step(model, objective, batch, chunk=0)[1]["logit_scale"]
    cached = _grads_after_step(copy.deepcopy(model), objective, batch, chunk=4)[1]["logit_scale"]
    assert torch.allclose(full, cached, rtol=1e-9)  # not 4x (open_clip --accum-freq counts it per chunk)
