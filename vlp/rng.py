"""Random state in one place: seeding a process, and capturing / restoring its RNGs.

- ``seed_all``: python, numpy and torch from one integer (the trainer seeds every rank
  alike before building the model, then per rank for dropout and augmentation);
- ``state`` / ``set_state``: every RNG of the process (checkpoints, per rank);
- ``torch_state`` / ``set_torch_state``: torch's CPU and CUDA generators only (the
  gradient cache replays a chunk's dropout masks with them).
"""
from __future__ import annotations

import random
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def state() -> Dict[str, Any]:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_state(saved: Dict[str, Any]) -> None:
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


TorchState = Tuple[torch.Tensor, Optional[list]]


def torch_state() -> TorchState:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_torch_state(saved: TorchState) -> None:
    torch.set_rng_state(saved[0])
    if saved[1] is not None:
        torch.cuda.set_rng_state_all(saved[1])
