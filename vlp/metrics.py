"""Run metrics: ``RUN_DIR/metrics.jsonl`` (one object per logged step and eval) and TensorBoard.

Only rank 0 writes; other ranks get a logger that drops everything. ``resume_at(step)``
(called when a run starts or resumes) drops what an earlier, interrupted process logged past
``step``, in both, so every step appears once.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from torch.utils.tensorboard import SummaryWriter


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb_dir = os.path.join(run_dir, "tb") if enabled and tensorboard else None
        self._tb = None
        self._purge_step: Optional[int] = None

    def resume_at(self, step: int) -> None:
        """Keep only records of steps <= ``step`` (the checkpoint resumed from; 0: a fresh start)."""
        if not self.enabled:
            return
        self._purge_step = step + 1  # TensorBoard hides later events of the old process
        if os.path.isfile(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def _writer(self):
        if self._tb is None and self._tb_dir is not None:
            self._tb = SummaryWriter(self._tb_dir, purge_step=self._purge_step)
        return self._tb

    def log(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:  # appended and flushed per line: a crash loses nothing logged
            f.write(json.dumps(record) + "\n")
        writer = self._writer() if step is not None else None
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    writer.add_scalar(k, v, step)
            writer.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
