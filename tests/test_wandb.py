"""logging.wandb with mode offline: the wandb run folder under RUN_DIR holds the logged metrics."""
import glob
import json
import os
import struct

import pytest

from vlp.metrics import MetricsLogger, WandbConfig

wandb = pytest.importorskip("wandb")


def _records(path):
    """The protobuf records of a .wandb transaction log: a 7-byte header (":W&B", magic, version),
    then LevelDB log blocks of 32 KiB whose chunks have a 7-byte header (crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = open(path, "rb").read(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def test_offline_wandb_run_holds_the_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    log = MetricsLogger(run_dir, True, tensorboard=False, wandb=WandbConfig(project="vlp-test", mode="offline"),
                        run_config={"optim": {"lr": 1e-3}})
    log.log({"step": 1, "loss": 2.5, "lr": 1e-3}, step=1)
    log.log({"step": 2, "loss": 1.25, "lr": 5e-4}, step=2)
    log.close()
    runs = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(runs) == 1
    # every step's record is in the run's transaction log (what `wandb sync` uploads)
    path = glob.glob(os.path.join(runs[0], "*.wandb"))[0]
    records = list(_records(path))
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
               for rec in records if rec.WhichOneof("record_type") == "history"]
    kinds = [rec.WhichOneof("record_type") for rec in records]  # shown if the history is not there
    assert [(h["_step"], h["loss"], h["lr"]) for h in history] == [(1, 2.5, 1e-3), (2, 1.25, 5e-4)], (
        os.path.getsize(path), kinds)
    assert open(os.path.join(run_dir, "wandb_id")).read().strip() == runs[0].rsplit("-", 1)[-1]


def test_bad_wandb_mode_is_bad_input():
    from vlp.config import load_config

    with pytest.raises(ValueError, match="logging.wandb.mode must be one of online, offline, disabled"):
        load_config(None, ["logging.wandb.mode=cloud"])
