"""continual.lr_schedule: per_task restarts optim's warmup and decay with every task; global spans the run."""
import json
import math

import pytest

from tests.test_coconut import RECIPE, TINY
from vlp.continual import per_task_lr
from vlp.data.continual import ContinualConfig, validate_continual
from vlp.engine.optim import OptimConfig, lr_lambda


def test_per_task_multiplier_restarts_each_task():
    optim = OptimConfig(lr=1.0, warmup_steps=5, steps=60, schedule="cosine")
    fn = per_task_lr(optim, 20)
    for start in (0, 20, 40):  # every task: warmup from 1/5, peak at its end, cosine down to its last step
        assert fn(start) == pytest.approx(1 / 5)
        assert fn(start + 4) == pytest.approx(1.0)
        assert fn(start + 19) == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 15)))
    assert lr_lambda(optim)(44) < 0.2  # where the last task peaks, the global schedule has decayed


def test_lr_schedule_names():
    with pytest.raises(ValueError, match="lr_schedule"):
        validate_continual(ContinualConfig(tasks=[[0]], lr_schedule="cyclic"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from vlp.data.digits import write_digits

    out = tmp_path_factory.mktemp("data") / "digits"
    write_digits(out)
    return out


def test_trainer_lr_at_each_step_per_task(digits, tmp_path, monkeypatch):
    """The lr the optimizer uses at each step of a 2-task run (4 steps each, warmup 2, cosine)."""
    from vlp.config import load_config
    from vlp.continual import ContinualTrainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(RECIPE, [*TINY, f"data.train={digits}/train", f"data.val={digits}/val",
                               f"run.dir={tmp_path}", "eval.tasks=[]", "run.checkpoint_every=0",
                               "continual.tasks=[[0,1],[2,3]]", "continual.steps_per_task=4",
                               "continual.buffer_size=8", "optim.lr=0.001", "continual.lr_schedule=per_task"])
    trainer = ContinualTrainer(cfg)
    used = [trainer.optimizer.param_groups[0]["lr"]]  # step 1's lr; the log at step s has step s+1's
    trainer.fit()
    used += [r["lr"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "lr" in r][:-1]
    # each task: warmup 1/2, 1, then a cosine over its last 2 steps: 1, 1/2 (the global one: 1, 0.93, 0.75, ...)
    assert used == pytest.approx([1e-3 * m for m in [0.5, 1.0, 1.0, 0.5] * 2])
