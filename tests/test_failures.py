"""Failure behaviour: non-finite losses are skipped then stop the run; a dead rank makes
the others exit with a clear message in bounded time; the restart resumes, every weight, Adam
moment and the lr as saved.

Also a worker: ``torchrun --nproc_per_node 2 -m tests.test_failures OUT KEY=VALUE...`` resumes
a Trainer of the clip_digits recipe with those overrides and saves what it holds to OUT."""
import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_optim import hand_lr
from tests.test_train_e2e import (  # noqa: F401
    RECIPE,
    ROOT,
    TINY,
    _env,
    _latest,
    check_resumed,
    copy_checkpoint,
    digits,
    resumed_trainer,
    resumed_view,
    vlp,
)
from tests.tiny import PlainEngine, tiny_batch, tiny_model_cfg
from vlp.engine.step import Step
from vlp.models import create_model
from vlp.objectives import build_objective


@pytest.mark.parametrize("chunk", [0, 4])
def test_nonfinite_loss_skips_the_step(chunk):
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = create_model(cfg)
    before = copy.deepcopy(model.state_dict())
    batch = tiny_batch(8, cfg)
    batch["image"][3] = float("nan")
    losses = Step(PlainEngine(model), build_objective({"name": "infonce"}), torch.device("cpu"), chunk)(batch)
    assert losses["skipped_step"] == 1.0 and losses["loss"] != losses["loss"]
    assert all(p.grad is None for p in model.parameters())  # no backward ran
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_run_stops_after_consecutive_nonfinite_steps(digits, tmp_path):  # noqa: F811  (fixture)
    # exp(1e5) overflows: every logit is inf, every loss NaN
    proc = vlp("train", RECIPE, *TINY, f"data.train={digits}/train", f"data.val={digits}/val",
               f"run.dir={tmp_path}/r", "model.init_logit_scale=100000", "run.max_skipped_steps=3", check=False)
    assert proc.returncode == 1
    assert "loss was not finite for 3 consecutive steps at step 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def _rank_env(rank, port):
    env = _env()
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


@pytest.mark.slow
def test_dead_rank_then_resume(digits, tmp_path):  # noqa: F811  (fixture)
    run = str(tmp_path / "run")
    args = [sys.executable, "-m", "vlp", "train", RECIPE, *TINY, f"data.train={digits}/train",
            f"data.val={digits}/val", f"run.dir={run}", "optim.steps=30", "run.checkpoint_every=5",
            "eval.zeroshot=false", "engine.zero_stage=2", "engine.timeout_s=30", "run.keep_checkpoints=5"]
    procs = [subprocess.Popen(args, cwd=ROOT, env=_rank_env(r, 29655), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    deadline = time.time() + 300
    while (_latest(run) or "step_00000000") < "step_00000010" and time.time() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)
    killed = time.time()
    out, err = procs[0].communicate(timeout=120)
    waited = time.time() - killed
    procs[1].wait()
    assert procs[0].returncode != 0 and waited < 30 + 30, waited  # bounded by engine.timeout_s
    assert "another rank died or did not answer" in err and "Traceback" not in err, err[-2000:]
    tag = _latest(run)
    files = set(os.listdir(os.path.join(run, "checkpoints", tag)))
    assert {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors"} <= files  # complete: both ranks' shards
    assert sum(f.startswith("zero_pp_rank_") for f in files) == 2
    # what the restarted 2 ranks load from it (a resume-only copy of the job beside the run):
    # every tensor as saved, the lr of the schedule
    step = int(tag.split("_")[1])
    here, out = copy_checkpoint(run, tag), str(tmp_path / "resumed.pt")
    check = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            "29657", "-m", "tests.test_failures", out, *args[args.index(RECIPE) + 1:],
                            f"run.dir={here}", "data.workers=0", "logging.tensorboard=false"],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr[-3000:]
    check_resumed(torch.load(out, weights_only=False), os.path.join(here, "checkpoints", tag),
                  hand_lr(step, 2e-3, 5, 30))

    procs = [subprocess.Popen(args, cwd=ROOT, env=_rank_env(r, 29656), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:]
    assert f"resumed from step {step}" in outs[0][0]
    assert _latest(run) == "step_00000030"


def resumed_state(out: str, overrides) -> None:
    """On every rank: resume a Trainer of ``overrides`` and take its ``resumed_view``; rank 0 saves it to OUT."""
    from vlp import dist

    trainer = resumed_trainer(overrides)
    view = resumed_view(trainer)  # gathers the partitions: every rank takes part
    if trainer.info.is_main:
        torch.save(view, out)
    dist.shutdown()


def test_label_objective_rejects_unlabelled_samples():
    cfg = tiny_model_cfg()
    model = create_model(cfg)
    batch = tiny_batch(8, cfg)
    batch["label"][2] = -1  # what the stream yields for a sample without `cls`
    with pytest.raises(ValueError, match="needs a label on every sample"):
        Step(PlainEngine(model), build_objective({"name": "supcon"}), torch.device("cpu"))(batch)


if __name__ == "__main__":
    resumed_state(sys.argv[1], sys.argv[2:])
