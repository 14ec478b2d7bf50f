"""A 2-rank ZeRO-3 run with evaluation on finishes (it used to deadlock at its first eval:
rank 0's forward through the partitioned module all-gathers, the other rank sat in a barrier),
and its in-loop metrics equal a 1-process `vlp eval` of the saved checkpoint."""
import json
import os
import subprocess
import sys

import pytest

from tests.test_train_e2e import RECIPE, ROOT, TINY, _env, _metrics, digits, vlp  # noqa: F401  (fixture)


@pytest.mark.slow
def test_two_rank_zero3_run_with_eval_finishes(digits, tmp_path):  # noqa: F811  (fixture)
    run = tmp_path / "run"
    args = [RECIPE, *TINY, f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}",
            "engine.zero_stage=3", "engine.timeout_s=90", "optim.steps=4", "eval.every_steps=2",
            "logging.every_steps=2", "eval.tasks=[{name: zeroshot}, {name: val_loss}]"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29731", "-m", "vlp", "train", *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in _metrics(run) if "zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for name, key in (("zeroshot", "top1"), ("val-loss", "loss")):
        out = vlp("eval", name, "--checkpoint", str(run), "--json").stdout
        metrics = json.loads(out.strip().splitlines()[-1])
        in_loop = evals[-1][f"{name.replace('-', '_')}_{key}"]
        assert abs(metrics[key] - in_loop) <= 1e-6 * max(1.0, abs(in_loop)), (name, metrics[key], in_loop)
    assert os.path.isfile(run / "checkpoints" / "latest")
