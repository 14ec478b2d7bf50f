"""kill -9 anywhere, run the same command again: the per-step losses are the uninterrupted run's (fp32 on
CPU, to 1e-6 relative), in one-pass and resampled mode, with 2 data workers and the shuffle buffer on,
on 1 and 2 ranks (torchrun), ZeRO 0 and 3, across an epoch end. The checkpoint holds the data position
(vlp/data/stream.py, TrainStream); the weights, optimizer, schedule and RNG were already exact."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_train_e2e import RECIPE, ROOT, _env, _latest, _metrics, digits  # noqa: F401  (fixture)

TINY = ["model.embed_dim=32", "model.image.width=32", "model.image.layers=1", "model.image.head_width=16",
        "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "logging.progress=false",
        "logging.every_steps=1", "optim.warmup_steps=3", "data.batch_size=64", "data.workers=2",
        "data.shuffle_buffer=100", "data.val=null", "run.checkpoint_every=2", "run.keep_checkpoints=2",
        "engine.timeout_s=120"]
STEPS = 10  # an epoch is 6 steps: 200-sample shards, 2 per rank, 2 workers, 3 batches of 64 each


def _command(data, run, ranks, stage, mode, port):
    launcher = [sys.executable, "-m", "vlp"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m", "vlp"]
    shards = "[" + ",".join(sorted(str(p) for p in (data / "train").glob("*.tar"))[: 2 * ranks]) + "]"
    data = ["data.resampled=true", f"data.epoch_samples={400 * ranks}"] if mode == "resampled" else []
    return [*launcher, "train", RECIPE, *TINY, *data, f"data.train={shards}", f"engine.zero_stage={stage}",
            f"optim.steps={STEPS}", f"run.dir={run}"]


def _descendants(pid: int) -> list:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                out += [child, *_descendants(child)]
    return out


def _losses(run):
    return {r["step"]: r["loss"] for r in _metrics(run) if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("ranks, stage, mode, port", [(1, 0, "epoch", 0), (1, 0, "resampled", 0),
                                                      (2, 0, "epoch", 29771), (2, 3, "resampled", 29772)])
def test_kill_9_then_resume_gives_the_uninterrupted_losses(digits, tmp_path, ranks, stage, mode, port):  # noqa: F811
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    done = subprocess.run(_command(digits, straight, ranks, stage, mode, port), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    want = _losses(straight)
    assert sorted(want) == list(range(1, STEPS + 1))

    command = _command(digits, killed, ranks, stage, mode, port)
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while (_latest(killed) or "") < "step_00000003" and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # every process of the job, mid-step or mid-save
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    stopped = int(_latest(killed).split("_")[1])
    assert 3 <= stopped < STEPS
    again = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {stopped}" in again.stdout
    got = _losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))  # every step once
    for step in range(stopped + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got[step], want[step])
