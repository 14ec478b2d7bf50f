"""``vlp bench e2e``: the training job (real loader, logging, checkpoints) against the same number of
model steps on one preloaded batch, on a tiny model for a few steps."""
import json

import pytest

from vlp.cli import main

TINY = ["model.embed_dim=16", "model.image.width=32", "model.image.layers=1", "model.image.head_width=16",
        "model.text.width=32", "model.text.layers=1", "data.batch_size=16", "run.checkpoint_every=2",
        "logging.every_steps=2"]
KEYS = {"steps", "batch_size", "workers", "fit_s", "model_steps_s", "fit_samples_per_s", "model_samples_per_s",
        "overhead_share", "steps_trained", "breakdown_s", "checkpoints_saved"}


@pytest.mark.slow  # a whole (tiny) training job with its data workers
def test_bench_e2e_json(capsys):
    assert main(["bench", "e2e", "--steps", "4", "--workers", "1", "--json", *TINY]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS <= r.keys(), r
    assert (r["steps"], r["steps_trained"], r["batch_size"], r["workers"]) == (4, 4, 16, 1)
    assert r["fit_s"] > 0 and r["model_steps_s"] > 0
    assert r["fit_samples_per_s"] > 0 and r["model_samples_per_s"] > 0
    assert r["overhead_share"] == pytest.approx(1 - r["model_steps_s"] / r["fit_s"], abs=1e-3)
    assert r["checkpoints_saved"] == 2  # steps 2 and 4
    b = r["breakdown_s"]
    assert {"step_in_fit", "data_wait", "logging", "checkpoints", "eval", "rest"} == b.keys()
    # eval off: the trainer's eval call returns at once; its wall clock can still read a scheduler tick
    # (0.001 s was seen on a loaded 2-core machine), while any real evaluation takes seconds
    assert b["step_in_fit"] > 0 and b["checkpoints"] > 0 and b["eval"] < 0.05


def test_bench_e2e_bad_input(capsys, tmp_path):
    assert main(["bench", "e2e", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["bench", "e2e", "--data", str(tmp_path)]) == 2
    assert "no train/ folder" in capsys.readouterr().err
