"""2-rank runs with evaluation on finish at every ZeRO stage (ZeRO-3 used to deadlock at its first
eval: rank 0's forward through the partitioned module all-gathered while the other rank sat in a
barrier). Every rank evaluates its share of data.val, and the in-loop metrics equal a 1-process
`vlp eval` of the saved checkpoint."""
import json
import os
import subprocess
import sys

import pytest

from tests.test_train_e2e import RECIPE, ROOT, TINY, _env, _metrics, digits  # noqa: F401  (fixture)
from vlp.cli import main

TASKS = "eval.tasks=[{name: zeroshot}, {name: retrieval}, {name: val_loss}, {name: linear_probe, knn_k: 5}]"
CHECKS = (("zeroshot", "top1"), ("retrieval", "text_to_image_R@5"), ("val-loss", "loss"),
          ("linear-probe", "linear_top1"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_rank_run_with_eval_finishes(digits, tmp_path, stage, capsys):  # noqa: F811  (fixture)
    run = tmp_path / "run"
    # eval batches of 40 divide both digits val shards (200, 160): the same batches on 1 and 2 ranks
    args = [RECIPE, *TINY, f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}",
            f"engine.zero_stage={stage}", "engine.timeout_s=90", "optim.steps=4", "eval.every_steps=2",
            "eval.batch_size=40", "logging.every_steps=2", TASKS]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29731 + stage), "-m", "vlp", "train", *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in _metrics(run) if "zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [2, 4] and evals[-1]["zeroshot_num_samples"] == 360
    for name, key in CHECKS:
        extra = ["--knn-k", "5"] if name == "linear-probe" else []
        capsys.readouterr()
        assert main(["eval", name, "--checkpoint", str(run), *extra, "--json"]) == 0  # 1 process, in this one
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        in_loop = evals[-1][f"{name.replace('-', '_')}_{key}"]
        assert abs(metrics[key] - in_loop) <= 1e-5 * max(1.0, abs(in_loop)), (name, metrics[key], in_loop)
    assert os.path.isfile(run / "checkpoints" / "latest")
