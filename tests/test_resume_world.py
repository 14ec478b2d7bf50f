"""A run saved on 2 ranks resumes on 1 (ZeRO 2 and 3: DeepSpeed's universal checkpoint), with
every weight, Adam moment and the lr as the 2 ranks saved them."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_optim import hand_lr
from tests.test_train_e2e import (  # noqa: F401
    RECIPE,
    ROOT,
    TINY,
    _env,
    _latest,
    _metrics,
    check_resumed,
    digits,
    resume_here,
    resumed_view,
)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_then_one(digits, tmp_path, stage):  # noqa: F811  (fixture)
    run = str(tmp_path / "run")
    command = [RECIPE, *TINY, f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}",
               "eval.zeroshot=false", "run.checkpoint_every=3", "run.keep_checkpoints=3", f"engine.zero_stage={stage}",
               "optim.steps=9", "optim.min_lr_ratio=0.1", "logging.every_steps=1"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29720 + stage), "-m", "vlp", "train", *command],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _latest(run) == "step_00000009"
    # as if the 2 ranks had died after step 6's checkpoint
    shutil.rmtree(os.path.join(run, "checkpoints", "step_00000009"))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("step_00000006")

    def lr(step):  # optim.lr=2e-3 (the recipe), warmup 5 (TINY), cosine to 0.1 of it at step 9
        return hand_lr(step, 2e-3, 5, 9, 0.1)

    # what 1 rank loads from the 2 ranks' shards (through the universal checkpoint, in this
    # process, on a copy): every tensor as the 2 ranks saved it, the lr of the schedule
    trainer = resume_here(run, "step_00000006", command[1:])
    check_resumed(resumed_view(trainer), os.path.join(trainer.run_dir, "checkpoints", "step_00000006"), lr(6))
    assert os.path.isdir(os.path.join(trainer.run_dir, "checkpoints", "universal_step_00000006"))
    del trainer

    one = subprocess.run([sys.executable, "-m", "vlp", "train", *command],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from step 6" in one.stdout and _latest(run) == "step_00000009"
    assert os.path.isdir(os.path.join(run, "checkpoints", "universal_step_00000006"))
    logged = [r["step"] for r in _metrics(run) if "lr" in r]
    assert logged == list(range(1, 10))  # the 2-rank run's steps 7-9 were dropped at the resume: each step once
    after = [r for r in _metrics(run) if "lr" in r and r["step"] > 6]  # the 1-rank run's records
    assert [r["step"] for r in after] == [7, 8, 9]
    assert [r["lr"] for r in after] == pytest.approx([lr(7), lr(8), lr(9)], rel=1e-12)
