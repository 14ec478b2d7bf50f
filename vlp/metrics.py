"""Run metrics: ``RUN_DIR/metrics.jsonl`` (one object per logged step and eval), TensorBoard and,
with ``logging.wandb.project`` set, Weights & Biases (its run folder under ``RUN_DIR/wandb``; a resumed
run continues the same wandb run, whose id is kept in ``RUN_DIR/wandb_id``).

Only rank 0 writes; other ranks get a logger that drops everything. ``resume_at(step)``
(called when a run starts or resumes) drops what an earlier, interrupted process logged past
``step``, in both, so every step appears once.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Optional

from torch.utils.tensorboard import SummaryWriter

WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    project: Optional[str] = None  # a wandb project; null: no wandb (pip install "vlp[wandb]")
    entity: Optional[str] = None  # wandb user or team; null: the default
    name: Optional[str] = None  # the wandb run name; null: the run folder's name
    mode: str = "online"  # online | offline (written to RUN_DIR/wandb, `wandb sync` later) | disabled


def check_wandb(cfg: WandbConfig) -> None:
    if cfg.mode not in WANDB_MODES:
        raise ValueError(f"logging.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {cfg.mode!r}")
    if cfg.project is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("logging.wandb.project is set but wandb is not installed: pip install "
                             "'vlp[wandb]' (or wandb), or set logging.wandb.project=null") from None


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True,
                 wandb: Optional[WandbConfig] = None, run_config: Optional[Dict[str, Any]] = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self._wandb_cfg = wandb if enabled and wandb is not None and wandb.project else None
        self._run_config = run_config
        self._wandb = None
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

    def _wandb_run(self):
        if self._wandb is None and self._wandb_cfg is not None:
            import wandb

            cfg = self._wandb_cfg
            id_file = os.path.join(self.run_dir, "wandb_id")
            run_id = open(id_file).read().strip() if os.path.isfile(id_file) else uuid.uuid4().hex[:8]
            with open(id_file, "w") as f:
                f.write(run_id)
            self._wandb = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=self.run_dir,
                                     name=cfg.name or os.path.basename(os.path.abspath(self.run_dir)),
                                     id=run_id, resume="allow", config=self._run_config)
        return self._wandb

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
        run = self._wandb_run() if step is not None else None
        if run is not None:
            run.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")},
                    step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
