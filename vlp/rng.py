"""Random state in one place: seeding a process, and capturing / restoring its RNGs.

- ``seed_all``: python, numpy and torch from one integer (the trainer seeds every rank
  alike before building the model, then per rank for dropout and augmentation);
- ``state`` / ``set_state``: every RNG of the process (checkpoints, per rank);
- ``seed_cpu`` / ``seeded``: run a block with python, numpy and torch's CPU generator seeded, then put them back
  (a data sample's augmentation draws from its own seed, whichever process makes it);
- ``torch_state`` / ``set_torch_state``: torch's CPU and CUDA generators only (the
  gradient cache replays a chunk's dropout masks with them).
"""
from __future__ import annotations

import contextlib
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


def seed_cpu(seed: int) -> None:
    """``seed_all`` without CUDA (cheap: ~10 us; a forked DataLoader worker must not touch CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, restore: bool = True):
    """Python, numpy and torch's CPU generator seeded with ``seed`` inside the block and, with
    ``restore``, put back after it (~250 us; a DataLoader worker, whose generators serve its samples
    only, passes ``restore=False``)."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    seed_cpu(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


TorchState = Tuple[torch.Tensor, Optional[list]]


def torch_state() -> TorchState:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_torch_state(saved: TorchState) -> None:
    torch.set_rng_state(saved[0])
    if saved[1] is not None:
        torch.cuda.set_rng_state_all(saved[1])
