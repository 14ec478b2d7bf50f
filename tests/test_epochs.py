"""Epochs and budgets: every rank takes the same steps per epoch (uneven shards, 2 ranks, through
torchrun), a budget in epochs or in samples instead of optim.steps, and data workers that live
through every epoch (no fork per epoch) at a lower CPU priority than the trainer."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.test_data_resume import TOKENIZER, _read, _write
from tests.test_train_e2e import RECIPE, ROOT, _env, _metrics, digits  # noqa: F401  (fixture)
from vlp.data.config import DataConfig
from vlp.data.stream import TrainData

TINY = ["model.embed_dim=32", "model.image.width=32", "model.image.layers=1", "model.image.head_width=16",
        "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "logging.progress=false",
        "logging.every_steps=1", "optim.warmup_steps=1", "data.batch_size=64", "data.val=null",
        "run.checkpoint_every=0", "engine.timeout_s=120"]


def _pid(image):
    return torch.tensor([os.getpid()])


def test_workers_persist_across_epochs(tmp_path):
    _write(tmp_path, n_shards=4, per_shard=8)
    cfg = DataConfig(batch_size=4, workers=2, shuffle_buffer=0)
    data = TrainData(tmp_path, cfg, image_transform=_pid, tokenizer=TOKENIZER, rank=0, world_size=1, seed=0)
    batches = _read(data, 99, epochs=3)  # 8 batches an epoch
    assert len(batches) == 24 and data.epoch == 3
    pids = [set(b["image"].flatten().tolist()) for b in batches]
    assert len(set().union(*pids)) == 2 and pids[:8] == pids[8:16] == pids[16:]  # the same 2 workers throughout
    data.close()
    fresh = TrainData(tmp_path, DataConfig(batch_size=4, workers=2, shuffle_buffer=0, persistent_workers=False),
                      image_transform=_pid, tokenizer=TOKENIZER, rank=0, world_size=1, seed=0)
    assert len(set().union(*[set(b["image"].flatten().tolist()) for b in _read(fresh, 99, epochs=3)])) == 6


def _niceness(image):
    return torch.tensor([os.nice(0)])


@pytest.mark.parametrize("niceness", [0, 7])
def test_workers_run_below_the_trainers_priority(tmp_path, niceness):
    _write(tmp_path, n_shards=2, per_shard=8)
    trainer = os.nice(0)
    cfg = DataConfig(batch_size=4, workers=2, shuffle_buffer=0, worker_niceness=niceness)
    data = TrainData(tmp_path, cfg, image_transform=_niceness, tokenizer=TOKENIZER, rank=0, world_size=1, seed=0)
    batches = _read(data, 4, epochs=1)
    data.close()
    assert len(batches) == 4
    assert {int(v) for b in batches for v in b["image"].flatten()} == {min(trainer + niceness, 19)}  # every worker
    assert os.nice(0) == trainer  # the trainer's own priority is unchanged


def test_epochs_count_the_batches_every_rank_yields(tmp_path):
    _write(tmp_path, n_shards=3, per_shard=10)  # 2 ranks: 2 shards and 1 -> 5 and 2 batches of 4
    cfg = DataConfig(batch_size=4, workers=2)
    ranks = [TrainData(tmp_path, cfg, image_transform=_pid, tokenizer=TOKENIZER, rank=r, world_size=2, seed=0)
             for r in range(2)]
    assert ranks[0].batches_per_epoch(0) == ranks[1].batches_per_epoch(0) == 2  # the fewest, one role each
    assert TrainData(tmp_path, cfg, image_transform=_pid, tokenizer=TOKENIZER, rank=0, world_size=1,
                     seed=0).batches_per_epoch(0) == 2 + 5  # 1 rank, 2 roles: 20 and 10 samples


def test_a_budget_in_samples_sets_the_steps(digits, tmp_path):  # noqa: F811  (fixture)
    from vlp.config import load_config
    from vlp.train import Trainer

    run = str(tmp_path / "run")
    trainer = Trainer(load_config(RECIPE, [*TINY, f"data.train={digits}/train", f"run.dir={run}",
                                           "optim.samples=1000", "data.workers=0"]))
    assert trainer.cfg.optim.steps == 16  # ceil(1000 / 64)
    assert "steps: 16" in open(os.path.join(run, "config.yaml")).read()
    with pytest.raises(ValueError, match="optim.samples or in data.epochs, not both"):
        Trainer(load_config(RECIPE, [*TINY, f"data.train={digits}/train", f"run.dir={run}2",
                                     "optim.samples=1000", "data.epochs=1", "data.workers=0"]))


@pytest.mark.slow
def test_two_ranks_with_uneven_shards_take_the_same_steps(digits, tmp_path):  # noqa: F811  (fixture)
    # 3 shards of 200 on 2 ranks: one rank reads 400 samples an epoch, the other 200 -> 3 steps an
    # epoch on both (the fewest full batches); data.epochs=2 -> 6 steps, then the run ends on both.
    run = str(tmp_path / "run")
    shards = "[" + ",".join(sorted(str(p) for p in (digits / "train").glob("*.tar"))[:3]) + "]"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29773", "-m", "vlp", "train", RECIPE, *TINY, f"data.train={shards}", "data.epochs=2",
                           "data.workers=2", f"run.dir={run}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # both ranks print their result; their lines may interleave on the shared stdout
    results = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", done.stdout)]
    assert [r["step"] for r in results] == [6, 6] and [r["epoch"] for r in results] == [1, 1]  # epochs 0 and 1
    assert [(r["step"], r["epoch"]) for r in _metrics(run) if "loss" in r] == [(s, (s - 1) // 3) for s in range(1, 7)]
