"""The replay memory of class-incremental training: samples of past tasks.

A row is one sample as the training stream decoded it (``image`` (3, H, W) or ``audio``
tensors, ``text`` (L,), ``label``, ``caption``, ``key``...): the memory keeps that one
augmentation draw. Updated once per task (``add_task``) with a pass over the task's data:

- ``class_balanced`` (default): every class seen so far gets an equal quota
  (capacity // classes; the first classes get one more until the capacity is used); a
  new class fills its quota by reservoir sampling over its rows, an old class shrinks
  to its new quota by dropping uniformly drawn rows. A class with fewer rows than its
  quota keeps them all (the spare capacity stays unused).
- ``random``: one reservoir over every row of every task so far (a uniform sample of
  the data seen, so classes keep their data proportions).

Draws are seeded (``seed``), and the random state is part of ``state_dict``, so a
resumed run continues with the same memory and the same future draws.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

import torch

from vlp.data.continual import POLICIES

Row = Dict[str, Any]


def batch_rows(batch: Dict[str, Any], classes: Optional[Set[int]] = None) -> List[Row]:
    """Split a batch dict into per-sample rows (tensors and lists; scalars like n_skipped
    dropped), only those whose ``label`` is in ``classes`` when given. Tensors are copied
    (a view would keep, and checkpoint, the whole batch's storage)."""
    keys = [k for k, v in batch.items() if isinstance(v, (torch.Tensor, list))]
    labels = batch["label"].tolist()
    keep = [i for i, c in enumerate(labels) if classes is None or c in classes]
    return [{k: batch[k][i].clone() if isinstance(batch[k], torch.Tensor) else batch[k][i] for k in keys} for i in keep]


def collate_rows(rows: Sequence[Row]) -> Dict[str, Any]:
    """Rows back to a batch dict: tensors stacked (0-d ones to (B,)), other fields as lists."""
    out: Dict[str, Any] = {}
    for key, first in rows[0].items():
        values = [r[key] for r in rows]
        out[key] = torch.stack(values) if isinstance(first, torch.Tensor) else values
    return out


class ReplayBuffer:
    def __init__(self, capacity: int, policy: str = "class_balanced", seed: int = 0):
        if capacity < 0:
            raise ValueError(f"replay buffer capacity must be >= 0, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"replay buffer policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.capacity = capacity
        self.policy = policy
        self.rng = random.Random(seed)
        self.rows: List[Row] = []
        self.classes: List[int] = []  # every class seen so far, in order of arrival
        self.seen = 0  # rows offered so far (random policy's reservoir count)

    def __len__(self) -> int:
        return len(self.rows)

    def class_counts(self) -> Dict[int, int]:
        counts: Dict[int, int] = defaultdict(int)
        for row in self.rows:
            counts[int(row["label"])] += 1
        return dict(counts)

    # --- updates ----------------------------------------------------------------------
    def add_task(self, rows: Iterable[Row], classes: Sequence[int]) -> None:
        """Offer one task's rows (only those of ``classes`` are kept)."""
        classes = [int(c) for c in classes]
        self.classes += [c for c in classes if c not in self.classes]
        wanted = set(classes)
        stream = (r for r in rows if int(r["label"]) in wanted)
        if self.policy == "random":
            self._reservoir(stream)
        else:
            self._class_balanced(stream, classes)
        assert len(self.rows) <= self.capacity

    def _reservoir(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self.seen += 1
            if len(self.rows) < self.capacity:
                self.rows.append(row)
            else:
                j = self.rng.randrange(self.seen)
                if j < self.capacity:
                    self.rows[j] = row

    def _quotas(self) -> Dict[int, int]:
        n = len(self.classes)
        base, extra = divmod(self.capacity, n)
        return {c: base + (i < extra) for i, c in enumerate(self.classes)}

    def _class_balanced(self, rows: Iterable[Row], new: Sequence[int]) -> None:
        quota = self._quotas()
        by_class: Dict[int, List[Row]] = defaultdict(list)
        for row in self.rows:
            by_class[int(row["label"])].append(row)
        for c in list(by_class):  # old classes shrink to their new quota, uniformly
            if len(by_class[c]) > quota[c]:
                by_class[c] = self.rng.sample(by_class[c], quota[c])
        count: Dict[int, int] = defaultdict(int)
        for row in rows:  # one reservoir per new class
            c = int(row["label"])
            count[c] += 1
            kept = by_class[c]
            if len(kept) < quota[c]:
                kept.append(row)
            else:
                j = self.rng.randrange(count[c])
                if j < quota[c]:
                    kept[j] = row
        self.rows = [row for c in self.classes for row in by_class.get(c, [])]

    # --- replay -----------------------------------------------------------------------
    def sample(self, k: int, rng: random.Random) -> List[Row]:
        """``k`` rows drawn uniformly (without replacement when the memory holds k or more)."""
        if not self.rows or k <= 0:
            return []
        return rng.sample(self.rows, k) if k <= len(self.rows) else rng.choices(self.rows, k=k)

    # --- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"capacity": self.capacity, "policy": self.policy, "rows": self.rows,
                "classes": list(self.classes), "seen": self.seen, "rng": self.rng.getstate()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["policy"] != self.policy:
            raise ValueError(f"checkpoint's replay buffer has policy {state['policy']!r}, the config {self.policy!r}")
        self.capacity = state["capacity"]
        self.rows = list(state["rows"])
        self.classes = list(state["classes"])
        self.seen = state["seen"]
        self.rng.setstate(state["rng"])
