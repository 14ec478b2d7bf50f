"""A run saved on 2 ranks resumes on 1 (ZeRO 2 and 3: DeepSpeed's universal checkpoint)."""
import os
import subprocess
import sys

import pytest

from tests.test_train_e2e import RECIPE, ROOT, TINY, _env, _latest, digits  # noqa: F401


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_then_one(digits, tmp_path, stage):  # noqa: F811  (fixture)
    run = str(tmp_path / "run")
    common = [RECIPE, *TINY, f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}",
              "eval.zeroshot=false", "run.checkpoint_every=3", f"engine.zero_stage={stage}"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29720 + stage), "-m", "vlp", "train", *common, "optim.steps=6"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _latest(run) == "step_00000006"
    one = subprocess.run([sys.executable, "-m", "vlp", "train", *common, "optim.steps=9"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from step 6" in one.stdout and _latest(run) == "step_00000009"
    assert os.path.isdir(os.path.join(run, "checkpoints", "universal_step_00000006"))
