"""Tiny random-init models and a stand-in engine shared by the tests."""
import torch

from vlp.models import ModelConfig


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(
        embed_dim=16,
        image={"name": "open_clip", "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text={"name": "open_clip", "context_length": 8, "width": 32, "heads": 2, "layers": 1, "vocab_size": 64},
    )
    base.update(kw)
    return ModelConfig(**base)


# Objectives that need a model other than the tiny two-tower one: the generic gradient-cache and
# distributed tests skip them, and the named test file checks both with that model.
OWN_MODEL_OBJECTIVES = {"coca": "tests/test_coca.py", "mlcd": "tests/test_mlcd.py", "mlc": "tests/test_mlcd.py",
                        "distill": "tests/test_distill.py"}  # distill: needs a teacher


def tiny_batch(n: int, cfg: ModelConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size, ctx = cfg.image.get("image_size", 16), cfg.text["context_length"]
    # open_clip ViT and timm towers alike
    return {
        "image": torch.randn(n, 3, size, size, generator=g),
        "text": torch.randint(1, cfg.text.get("vocab_size", 64), (n, ctx), generator=g),
        "label": torch.randint(0, 4, (n,), generator=g),  # repeats: several positives per row
    }


class PlainEngine:
    """The slice of DeepSpeed's engine API that vlp.engine.step uses, without DeepSpeed:
    lets the step be checked in float64 against a plain full-batch backward."""

    def __init__(self, module):
        self.module = module

    def __call__(self, inputs):
        return self.module(inputs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def zero_optimization_stage(self):
        return 0

    def no_sync(self):
        import contextlib

        return contextlib.nullcontext()


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra) -> dict:
    """Environment for a child process: no launcher variables inherited from this one
    (an in-process engine may have set them), one thread, unbuffered output."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env
