"""``tools/gpu_check.sh --dry-run``: the GPU check's code path on CPU (gloo, fp32, tiny model) prints one
JSON object with every part's figures and no failure."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # DeepSpeed ZeRO-1 and ZeRO-3 engines, an open_clip loop and the loss bench's children
def test_gpu_check_dry_run():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"dry_run", "device", "settings", "zero1", "zero3", "open_clip", "speed_ratio_zero1",
            "speed_ratio_zero3", "loss", "part_s", "wall_s", "failures"} <= r.keys()
    assert r["dry_run"] is True and r["device"] == "cpu" and r["failures"] == []
    for k, stage in (("zero1", 1), ("zero3", 3)):
        assert r[k]["zero_stage"] == stage and r[k]["samples_per_s"] > 0 and r[k]["step_s"] > 0
    # same seed, same batch, same math: ZeRO-1 and ZeRO-3 take the same steps (fp32 on one rank)
    assert abs(r["zero1"]["last_loss"] - r["zero3"]["last_loss"]) < 1e-3, (r["zero1"], r["zero3"])
    assert r["open_clip"]["samples_per_s"] > 0 and r["open_clip"]["batch"] == r["settings"]["batch"]
    loss = r["loss"]
    assert {"vlp_s", "open_clip_s", "speedup", "vlp_peak_mb", "open_clip_peak_mb", "memory_ratio",
            "max_abs_diff"} <= loss.keys()
    assert loss["batch"] == 1024 and loss["max_abs_diff"] <= 1e-5

