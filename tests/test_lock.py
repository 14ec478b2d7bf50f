"""model.lock (LiT): locked parameters get no gradient and no optimizer state and are bit-identical
after training, at ZeRO 0 and 3 with the gradient cache on; a lock on a missing tower is bad input."""
import pytest
import torch

from tests.test_optim import _full
from tests.tiny import tiny_batch, tiny_model_cfg
from vlp.config import load_config
from vlp.models import create_model
from vlp.models.factory import LockConfig, LockImage, LockText


def _locked_model():
    lock = LockConfig(image=LockImage(unlocked_groups=0), text=LockText(unlocked_layers=1))
    cfg = tiny_model_cfg(init_logit_bias=-10.0, lock=lock)
    torch.manual_seed(0)
    return cfg, create_model(cfg)


def test_lock_freezes_the_named_parameters():
    _, model = _locked_model()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {n for n, _ in model.named_parameters() if n.startswith("visual.")} <= frozen
    # text: unlocked_layers=1 leaves the last block, final norm and projection trainable
    assert "text.token_embedding.weight" in frozen and "text.text_projection" not in frozen
    assert "logit_scale" not in frozen


@pytest.mark.parametrize("stage", [0, 3])
def test_locked_parameters_are_bit_identical_after_training(stage):
    from vlp import dist
    from vlp.engine.config import EngineConfig, GradCacheConfig
    from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
    from vlp.engine.optim import OptimConfig
    from vlp.engine.step import Step
    from vlp.objectives import build_objective

    quiet_deepspeed()
    dist.init_distributed("gloo")
    mcfg, model = _locked_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    locked = {n for n, p in model.named_parameters() if not p.requires_grad}
    ecfg = EngineConfig(zero_stage=stage, grad_cache=GradCacheConfig(chunk_size=4))
    ocfg = OptimConfig(lr=1e-2, weight_decay=0.5, steps=3, warmup_steps=0)
    engine, optimizer, _ = build_engine(model, ecfg, ocfg, 8)
    in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    step = Step(engine, build_objective({"name": "siglip"}), torch.device("cpu"), chunk_size=4, total_steps=3)
    for i in range(3):
        step(tiny_batch(8, mcfg, seed=i))
    after = _full(engine)
    for n in before:
        if n in locked:
            assert torch.equal(after[n], before[n]), n
        else:
            assert not torch.equal(after[n], before[n]), n
    if stage == 0:  # no optimizer state and no gradient for a locked parameter
        by_name = dict(engine.module.named_parameters())
        assert all(id(by_name[n]) not in in_optimizer and by_name[n].grad is None for n in locked)
        assert all(by_name[n] not in engine.optimizer.state for n in locked)


def test_lock_on_a_missing_tower_is_one_line_bad_input():
    with pytest.raises(ValueError, match="model.lock.image is set but the model has no image tower"):
        load_config(None, ["model.image=null", "model.audio={name: vit}", "data.image_key=null",
                           "data.audio_key=flac", "model.lock.image.unlocked_groups=0"])
    with pytest.raises(ValueError, match="unlocked_layers must be null"):
        load_config(None, ["model.lock.text.unlocked_layers=-1"])
