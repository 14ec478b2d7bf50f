"""engine.precision amp_bf16 (DeepSpeed's torch_autocast over fp32 weights) and engine.compile
(torch.compile of the towers) on CPU with a tiny model, against plain fp32 eager training."""
import math

import pytest
import torch

from tests.tiny import tiny_batch, tiny_model_cfg
from vlp.models import create_model


def _train(steps: int = 3, **engine_kw):
    from vlp import dist
    from vlp.engine.config import EngineConfig
    from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
    from vlp.engine.optim import OptimConfig
    from vlp.engine.step import Step
    from vlp.objectives import build_objective

    quiet_deepspeed()
    dist.init_distributed("gloo")
    mcfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = create_model(mcfg)
    cfg = OptimConfig(lr=1e-3, steps=steps, warmup_steps=0)
    engine, _, _ = build_engine(model, EngineConfig(zero_stage=0, **engine_kw), cfg, 8)
    step = Step(engine, build_objective({"name": "infonce"}), torch.device("cpu"), total_steps=steps)
    return engine, [step(tiny_batch(8, mcfg, seed=i))["loss"] for i in range(steps)]


@pytest.fixture
def reset_autocast():
    yield
    import deepspeed.runtime.torch_autocast as ta  # a process-wide flag DeepSpeed sets for autocast engines

    ta.TORCH_AUTOCAST_INITIALIZED, ta.TORCH_AUTOCAST_DTYPE = False, None


def test_amp_bf16_autocasts_over_fp32_weights(reset_autocast):
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(o.dtype) if isinstance(m, torch.nn.Linear) else None)
    try:
        engine, amp = _train(precision="amp_bf16")
    finally:
        hook.remove()
    assert torch.bfloat16 in seen  # the towers' matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())  # fp32 weights and optimizer
    assert type(engine.optimizer) is torch.optim.AdamW
    _, fp32 = _train()
    assert all(math.isfinite(x) for x in amp)
    assert amp == pytest.approx(fp32, abs=2e-2) and amp != fp32  # bf16 rounding, same training


def test_unknown_precision_lists_the_valid_ones():
    from vlp.config import load_config

    with pytest.raises(ValueError, match="engine.precision must be fp32, bf16, fp16, amp_bf16, amp_fp16"):
        load_config(None, ["engine.precision=amp"])


@pytest.mark.slow  # about 45 s of inductor compilation on 2 CPU cores
def test_compiled_towers_train_like_eager():
    engine, compiled = _train(compile=True)
    assert "visual.proj" in dict(engine.module.named_parameters())  # names unchanged (compiled in place)
    assert engine.module.visual._compiled_call_impl is not None
    _, eager = _train()
    assert compiled == pytest.approx(eager, abs=1e-5)
