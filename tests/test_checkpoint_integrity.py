"""Checkpoints verify themselves (docs/errors.md): every file's size and sha256 recorded at save,
checked at load; a damaged latest falls back to the newest intact checkpoint on resume; a failed
write leaves the previous checkpoint as latest and no partial folder.

``trained_run`` is the one tiny trained run of a session (tests/test_bad_inputs.py uses it too)."""
import errno
import json
import os
import shutil

import pytest
import torch

from tests.test_train_e2e import RECIPE, TINY
from vlp.cli import main
from vlp.engine import checkpoint
from vlp.errors import CheckpointDamaged

TAGS = ["step_00000002", "step_00000004"]


def trained_run(tmp_path_factory):
    """(run dir, digits folder): 4 steps of the tiny CLIP at ZeRO-2 (fp32 master weights in optimizer
    shards), a checkpoint every 2 steps. Built once per session, in this process, then reused."""
    base = tmp_path_factory.getbasetemp() / "trained_run"
    run, digits = base / "run", base / "digits"
    if not (run / "checkpoints" / "latest").is_file():
        from vlp.commands.train import train
        from vlp.config import load_config
        from vlp.data.digits import write_digits

        shutil.rmtree(base, ignore_errors=True)
        write_digits(str(digits))
        train(load_config(RECIPE, [
            *TINY, f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}", "data.batch_size=8",
            "data.workers=0", "data.shuffle_buffer=16", "logging.every_steps=1", "logging.tensorboard=false",
            "logging.progress=false", "eval.tasks=[]", "optim.warmup_steps=1", "optim.steps=4",
            "run.checkpoint_every=2", "run.keep_checkpoints=3", "engine.zero_stage=2",
        ]))
    return str(run), str(digits)


def copy_run(run: str, dst: str) -> str:
    """A copy of ``run`` to damage: checkpoint files hard-linked (vlp never writes one in place: a damaged
    file is replaced by ``damage``), the rest copied; its config.yaml names the copy as run.dir."""
    def link_big(src, dst):
        return os.link(src, dst) if os.path.getsize(src) > 1 << 20 else shutil.copy2(src, dst)

    shutil.copytree(run, dst, copy_function=link_big)
    with open(os.path.join(dst, "config.yaml")) as f:
        text = f.read()
    with open(os.path.join(dst, "config.yaml"), "w") as f:  # the copy's own run.dir, as a run saves it
        f.write(text.replace(f"dir: {run}\n", f"dir: {dst}\n"))
    return dst


def damage(path: str, how: str = "truncate") -> None:
    """Replace ``path`` by a damaged copy: cut to a third, or one byte flipped (same size)."""
    data = bytearray(open(path, "rb").read())
    os.unlink(path)  # a hard link of the intact file elsewhere keeps its bytes
    if how == "truncate":
        data = data[: len(data) // 3]
    else:
        data[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)[0]


def _call(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_save_records_every_files_size_and_sha256(run):
    root = checkpoint.ckpt_dir(run)
    assert checkpoint.tags(run) == TAGS and checkpoint.latest_tag(run) == TAGS[-1]
    for tag in TAGS:
        folder = os.path.join(root, tag)
        with open(os.path.join(folder, checkpoint.META_FILE)) as f:
            meta = json.load(f)
        assert (meta["world_size"], meta["zero_stage"], meta["step"]) == (1, 2, int(tag[5:]))
        files = meta["files"]
        on_disk = sorted(n for n in os.listdir(folder) if n != checkpoint.META_FILE)
        assert sorted(files) == on_disk and {"model.safetensors", "rng_rank0.pt"} <= set(files)
        assert any(n.endswith("_optim_states.pt") for n in files)  # ZeRO-2: DeepSpeed's shards are recorded too
        for name, rec in files.items():
            assert rec == {"size": os.path.getsize(os.path.join(folder, name)),
                           "sha256": checkpoint.sha256(os.path.join(folder, name))}
        checkpoint.verify(folder)


@pytest.mark.parametrize("how", ["truncate", "flip", "delete", "record"])
def test_verify_names_the_damaged_file(run, tmp_path, how):
    folder = str(tmp_path / "tag")
    shutil.copytree(os.path.join(checkpoint.ckpt_dir(run), TAGS[0]), folder)
    name = "rng_rank0.pt"
    if how == "delete":
        os.unlink(os.path.join(folder, name))
    elif how == "record":
        name = checkpoint.META_FILE
        with open(os.path.join(folder, name), "w") as f:
            f.write('{"files": ')
    else:
        damage(os.path.join(folder, name), how)
    with pytest.raises(CheckpointDamaged, match=name):
        checkpoint.verify(folder)
    if how != "record":
        checkpoint.verify(folder, ["model.safetensors"])  # only the files asked for


def test_hash_shares_cover_every_file_once():
    sizes = {f"f{i}": (i * 7919) % 1000 for i in range(23)}
    for world in (1, 2, 3, 8):
        shares = [checkpoint._share(sizes, r, world) for r in range(world)]
        assert sorted(n for s in shares for n in s) == sorted(sizes)


def test_latest_tag_without_a_latest_file_and_pruning(tmp_path):
    run = str(tmp_path)
    root = checkpoint.ckpt_dir(run)
    for tag in ("step_00000002", "step_00000004", "step_00000006", "step_00000008.tmp"):
        os.makedirs(os.path.join(root, tag))
    assert checkpoint.latest_tag(run) == "step_00000006"  # no `latest`: the newest complete folder
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000010")  # names a folder that is gone
    assert checkpoint.latest_tag(run) == "step_00000006"
    os.makedirs(os.path.join(root, "step_00000003"))
    checkpoint._prune(root, 1, "step_00000003")  # a run resumed from step 2 saved step 3 (keep 1)
    assert checkpoint.tags(run) == ["step_00000003", "step_00000004", "step_00000006"]  # later ones: left alone


def test_resume_falls_back_to_the_newest_intact_checkpoint(run, tmp_path, capsys):
    here = copy_run(run, str(tmp_path / "run"))
    bad = os.path.join(checkpoint.ckpt_dir(here), TAGS[-1], "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    damage(bad)
    code, out, err = _call(["train", os.path.join(here, "config.yaml"), f"run.dir={here}", "optim.steps=6"], capsys)
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("[vlp] warning: checkpoint step_00000004 is damaged")
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in err[0] and "resuming from step_00000002" in err[0]
    assert "resumed from step 2" in out
    assert checkpoint.latest_tag(here) == "step_00000006"
    for tag in ("step_00000002", "step_00000004", "step_00000006"):  # step 4 saved again, intact
        checkpoint.verify(os.path.join(checkpoint.ckpt_dir(here), tag))


@pytest.mark.parametrize("where", ["deepspeed", "weights"])
def test_a_failed_write_keeps_the_previous_checkpoint(run, tmp_path, capsys, monkeypatch, where):
    here = copy_run(run, str(tmp_path / "run"))

    full = {  # what torch.save raises on a full disk; an OSError of a plain write
        "deepspeed": RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        "weights": OSError(errno.ENOSPC, "No space left on device"),
    }[where]

    def fail(*args, **kwargs):
        raise full

    if where == "deepspeed":
        monkeypatch.setattr(torch, "save", fail)  # DeepSpeed's first file of the checkpoint
    else:
        monkeypatch.setattr(checkpoint, "save_file", fail)  # model.safetensors, after DeepSpeed's files
    why = str(full)
    code, _, err = _call(["train", os.path.join(here, "config.yaml"), f"run.dir={here}", "optim.steps=6"], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0] == (f"vlp train: error: could not write checkpoint step_00000006: {why}; "
                      "step_00000004 is still the latest checkpoint")
    assert checkpoint.latest_tag(here) == "step_00000004"
    assert sorted(os.listdir(checkpoint.ckpt_dir(here))) == ["latest", *TAGS, "zero_to_fp32.py", "zero_to_torch.py"]
    for tag in TAGS:
        checkpoint.verify(os.path.join(checkpoint.ckpt_dir(here), tag))
