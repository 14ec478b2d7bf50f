"""Helpers every evaluator shares: eval mode, input dtype, which tower is evaluated, encoding."""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model.eval()`` and no grad inside; the caller's train/eval mode is restored after
    (the trainer's periodic eval hands in the model it is training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def image_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype images must have: the weights' (bf16/fp16 under DeepSpeed mixed precision)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


TOWERS = {"image": "visual", "audio": "audio"}  # modality -> the model's tower attribute


def zeroshot_modality(model: torch.nn.Module, requested: Optional[str] = None) -> str:
    """``requested`` if the model has that tower, else (None) image when it has an image tower, else audio."""
    if requested is None:
        requested = "image" if getattr(model, "visual", None) is not None else "audio"
    if requested not in TOWERS or getattr(model, TOWERS[requested], None) is None:
        have = [m for m, tower in TOWERS.items() if getattr(model, tower, None) is not None]
        raise ValueError(f"cannot classify {requested!r}: the model's towers for it are {', '.join(have) or 'none'}")
    return requested


def encode(model, modality: str, x: torch.Tensor, device: Any) -> torch.Tensor:
    """(b, D) unit-norm features of a batch of ``modality`` inputs (images or log-mels)."""
    x = x.to(device, image_dtype(model))
    return model.encode_image(x, normalize=True) if modality == "image" else model.encode_audio(x, normalize=True)
