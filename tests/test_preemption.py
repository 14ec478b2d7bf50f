"""Preemption: SIGTERM or SIGUSR1 (what SLURM's --signal sends every task) makes every rank finish
its step, save a checkpoint and exit 0 with one line naming it; the same command then resumes."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train_e2e import RECIPE, ROOT, TINY, _env, _latest, _metrics, digits  # noqa: F401  (fixture)


def _wait_for_checkpoint(proc, run, timeout=300):
    deadline = time.time() + timeout
    while _latest(run) is None and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    assert _latest(run) is not None


def _children(pid: int):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.slow
@pytest.mark.parametrize("ranks,sig", [(1, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_signal_saves_and_exits_zero_then_resumes(digits, tmp_path, ranks, sig):  # noqa: F811  (fixture)
    run = str(tmp_path / "run")
    common = [RECIPE, *TINY, f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}",
              "eval.tasks=[]", "run.checkpoint_every=4", "logging.every_steps=1", "engine.timeout_s=60"]
    launcher = [sys.executable, "-m", "vlp"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29741", "-m", "vlp"]
    proc = subprocess.Popen([*launcher, "train", *common, "optim.steps=100000"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, run)
    # every task gets the signal, as under SLURM (torchrun's own process is left alone)
    targets = [proc.pid] if ranks == 1 else _children(proc.pid)
    assert len(targets) == ranks
    for pid in targets:
        os.kill(pid, sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = [line for line in out.splitlines() if "preempted" in line and "[vlp]" in line]
    assert len(lines) == 1 and signal.Signals(sig).name in lines[0], out[-2000:]
    stopped = _latest(run)
    assert stopped in lines[0]
    step = int(stopped.split("_")[1])
    assert 4 <= step < 100000 and [r["step"] for r in _metrics(run) if "loss" in r][-1] == step
    resumed = subprocess.run([sys.executable, "-m", "vlp", "train", *common, f"optim.steps={step + 2}",
                              "engine.zero_stage=0"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stdout and _latest(run) == f"step_{step + 2:08d}"
