"""End to end through the `vlp` command: data -> train -> eval -> export; kill -9 and resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.tiny import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "quickstart", "clip_digits.yaml")
TINY = [
    "model.embed_dim=32", "model.image.width=32", "model.image.layers=1", "model.image.head_width=16",
    "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
    "data.batch_size=32", "data.workers=1", "logging.progress=false", "logging.every_steps=5",
    "optim.warmup_steps=5",
]


def _env():
    return child_env()


def vlp(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "vlp", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    vlp("data", "digits", "--out", str(out))
    return out


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_smoke_train_eval_export(digits, tmp_path):
    run = tmp_path / "run"
    data = [f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}"]
    tasks = "eval.tasks=[{name: zeroshot}, {name: retrieval}, {name: val_loss}]"
    vlp("train", RECIPE, *TINY, *data, "optim.steps=20", "eval.every_steps=10", "run.checkpoint_every=10", tasks)
    records = _metrics(run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "zeroshot_top1" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    assert [r["step"] for r in evals] == [10, 20] and all(r["skipped_samples"] == 0 for r in steps)
    assert os.path.isfile(run / "config.yaml") and os.listdir(run / "tb")
    # every task of the list ran in the loop, and equals `vlp eval NAME` on the saved checkpoint
    for name, key in (("zeroshot", "top1"), ("retrieval", "image_to_text_R@1"), ("val-loss", "loss")):
        out = vlp("eval", name, "--checkpoint", str(run), "--data", f"{digits}/val", "--json").stdout
        metrics = json.loads(out.strip().splitlines()[-1])
        assert metrics["num_samples"] == 360
        in_loop = evals[-1][f"{name.replace('-', '_')}_{key}"]
        assert abs(metrics[key] - in_loop) <= 1e-6 * max(1.0, abs(in_loop)), (name, metrics[key], in_loop)
    vlp("export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(tmp_path / "oc"))
    assert os.path.isfile(tmp_path / "oc" / "open_clip_config.json")


@pytest.mark.slow
def test_cli_errors_are_one_line(digits, tmp_path):
    bad = vlp("train", RECIPE, "optim.lrr=1", check=False)
    assert bad.returncode == 2 and "unknown config key 'optim.lrr'" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = vlp("train", RECIPE, *TINY, f"run.dir={tmp_path}/r", "data.train=/nonexistent/train", check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def _latest(run):
    path = os.path.join(run, "checkpoints", "latest")
    return open(path).read().strip() if os.path.isfile(path) else None


@pytest.mark.slow
def test_kill_9_then_resume(digits, tmp_path):
    run = str(tmp_path / "run")
    args = [sys.executable, "-m", "vlp", "train", RECIPE, *TINY, f"data.train={digits}/train",
            f"data.val={digits}/val", f"run.dir={run}", "optim.steps=40", "run.checkpoint_every=5",
            "eval.zeroshot=false", "run.keep_checkpoints=3"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while (_latest(run) or "step_00000000") < "step_00000015" and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # lands anywhere: between checkpoints or inside a save
    proc.wait()
    killed_at = _latest(run)
    tag_dir = os.path.join(run, "checkpoints", killed_at)
    assert {"model.safetensors", "mp_rank_00_model_states.pt", "rng_rank0.pt"} <= set(os.listdir(tag_dir))
    # a crash inside a save leaves only a *.tmp folder, never a checkpoint `latest` names
    os.makedirs(os.path.join(run, "checkpoints", "step_00000099.tmp"))

    resumed = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(killed_at.split("_")[1])
    assert f"resumed from step {step}" in resumed.stdout
    assert not [p for p in os.listdir(os.path.join(run, "checkpoints")) if p.endswith(".tmp")]
    assert _latest(run) == "step_00000040"
    after = [r for r in _metrics(run) if "loss" in r and r["step"] > step]
    assert after[0]["step"] == (step // 5 + 1) * 5 and after[-1]["step"] == 40
    # optimizer schedule restored: the lr logged after resume follows the warmup-cosine curve
    from vlp.engine.optim import OptimConfig, lr_lambda
    sched = lr_lambda(OptimConfig(steps=40, warmup_steps=5))
    for r in after:
        assert abs(r["lr"] - 2e-3 * sched(r["step"])) < 1e-9, r
