"""The eval data layouts: clip_benchmark split folders and dataset roots (captionless classification,
several captions per image), image folders, built-in class names and templates, the built-in
datasets' layout, bad input as one line and exit 2, and every rank reading its share."""
import json

import open_clip
import open_clip.zero_shot_metadata as meta
import pytest
import torch

from tests.eval_data import captionless, digits_and_run, image_folder, multi_captions, raw_samples
from tests.helpers import noise_png
from vlp import dist
from vlp.cli import main
from vlp.data.clip_benchmark import eval_loader, resolve_split
from vlp.data.config import DataConfig
from vlp.data.digits_multimodal import write_digits_multimodal
from vlp.data.folders import folder_classnames
from vlp.data.shards import expand_spec, write_shards, write_split
from vlp.data.stream import _to_sample, build_eval_loader
from vlp.data.tones import write_tones
from vlp.eval.retrieval import evaluate_retrieval
from vlp.eval.zeroshot import read_classnames_templates
from vlp.runs import load_model_from_run

CFG = DataConfig(workers=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    data, run = digits_and_run(root)
    return root, data, run


def _json(argv, capsys):
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vlp eval: error: ")
    return err


# --- the built-in datasets' layout and split folders -------------------------------------------------


def test_builtin_datasets_write_split_folders(setup, tmp_path):
    _, data, _ = setup
    for split, shards in (("train", 8), ("val", 2)):  # vlp data digits: 200 per shard
        assert (data / split / "nshards.txt").read_text() == f"{shards}\n"
        assert expand_spec(data / split) == [str(data / split / f"{i}.tar") for i in range(shards)]
    assert len(raw_samples(data / "train")) == 1437  # a training spec (configs: data/digits/train) reads them all
    write_tones(tmp_path / "tones", train_per_class=2, val_per_class=1, shard_size=7)
    assert (tmp_path / "tones/train/nshards.txt").read_text() == "3\n" and (tmp_path / "tones/val/1.tar").is_file()
    write_digits_multimodal(tmp_path / "mm", shard_size=1000)
    assert sorted(p.name for p in (tmp_path / "mm/val").iterdir()) == ["0.tar", "nshards.txt"]


def test_split_folder_order_stale_shards_and_bad_counts(tmp_path):
    samples = [{"__key__": f"s{i:03d}", "txt": "x", "png": b""} for i in range(12)]
    write_shards(tmp_path / "s", samples, shard_size=1)  # an older layout in the same folder
    written = write_split(tmp_path / "s", samples, shard_size=1)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == sorted([f"{i}.tar" for i in range(12)] + ["nshards.txt"])
    assert expand_spec(tmp_path / "s") == written == [str(tmp_path / "s" / f"{i}.tar") for i in range(12)]  # 2 < 10
    (tmp_path / "s/nshards.txt").write_text("13\n")
    with pytest.raises(ValueError, match="nshards.txt says 13 shards but 1 are missing, e.g. '12.tar'"):
        expand_spec(tmp_path / "s")
    (tmp_path / "s/nshards.txt").write_text("many\n")
    with pytest.raises(ValueError, match="positive number of shards"):
        expand_spec(tmp_path / "s")


def test_resolve_split(setup, tmp_path):
    _, data, _ = setup
    assert resolve_split(data, "val") == str(data / "val")
    assert resolve_split(str(data / "val")) == str(data / "val") and resolve_split("pipe:cat x.tar") == "pipe:cat x.tar"
    with pytest.raises(ValueError, match="dataset root with splits train, val: pass --split"):
        resolve_split(data)  # no test split to default to
    (tmp_path / "test").mkdir()
    (tmp_path / "test/nshards.txt").write_text("1\n")
    assert resolve_split(tmp_path) == str(tmp_path / "test")  # clip_benchmark's default split
    with pytest.raises(FileNotFoundError, match=r"no split 'dev' in .* \(splits: train, val\)"):
        resolve_split(data, "dev")
    with pytest.raises(ValueError, match="needs a local dataset root"):
        resolve_split(str(data / "val/{0..1}.tar"), "val")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare/0.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="has no nshards.txt"):
        resolve_split(tmp_path, "bare")


def test_eval_samples_need_no_caption_with_a_label_and_keep_every_caption_line(tmp_path):
    samples = [
        {"__key__": "a", "png": noise_png(0), "cls": 2},  # classification: no caption
        {"__key__": "b", "png": noise_png(1), "txt": "one\ntwo\nthree"},  # retrieval: three captions
        {"__key__": "c", "png": noise_png(2)},  # neither: skipped and counted
        {"__key__": "d", "png": noise_png(3), "txt": "plain", "cls": 0},
    ]
    write_split(tmp_path, samples, shard_size=10)
    tok = open_clip.get_tokenizer("ViT-B-32")
    batches = list(build_eval_loader(tmp_path, CFG, lambda im: torch.zeros(3, 4, 4), tok, batch_size=10))
    (batch,) = batches
    assert batch["key"] == ["a", "b", "d"] and batch["n_skipped"] == 1
    assert batch["captions"] == [[], ["one", "two", "three"], ["plain"]]
    assert batch["caption"] == ["", "one", "plain"] and batch["label"].tolist() == [2, -1, 0]
    assert torch.equal(batch["text"][1], tok(["one"])[0])
    with pytest.raises(ValueError, match="no caption"):  # outside an eval loader a caption is still required
        _to_sample({"__key__": "a", "png": "image", "cls": 1}, CFG, lambda im: im, tok)


# --- zero-shot on every layout ------------------------------------------------------------------------


def test_zeroshot_agrees_on_shards_captionless_split_and_image_folder(setup, capsys):
    root, data, run = setup
    base = ["eval", "zeroshot", "--checkpoint", run]
    reference = _json([*base, "--data", str(data / "val")], capsys)
    cb = captionless(data / "val", root / "cb")
    folder = image_folder(data / "val", root / "folder" / "val")
    templates = "zeroshot_classification_templates.txt"  # found one level up, as beside shard folders
    (root / "folder" / templates).write_bytes((data / templates).read_bytes())
    assert folder_classnames(str(folder))[:3] == ["eight", "five", "four"]  # sorted folder names = labels
    for name, argv in {"captionless root": ["--data", str(cb), "--split", "test"],
                       "captionless split folder": ["--data", str(cb / "test")],
                       "image folder": ["--data", str(folder)]}.items():
        got = _json([*base, *argv], capsys)
        for key in ("top1", "top5", "mean_per_class_recall", "num_samples", "acc1", "acc5"):
            assert got[key] == pytest.approx(reference[key], abs=1e-9), (name, key)


def test_builtin_classnames_and_templates_are_open_clips(setup, capsys, tmp_path):
    root, data, run = setup
    names, prompts = read_classnames_templates(str(data / "val"), "imagenet1k", "openai")
    assert names == list(meta.IMAGENET_CLASSNAMES) and prompts == list(meta.OPENAI_IMAGENET_TEMPLATES)
    assert read_classnames_templates(str(data / "val"), templates="simple")[1] == list(meta.SIMPLE_IMAGENET_TEMPLATES)
    write_split(tmp_path / "few/test", raw_samples(data / "val")[:16], shard_size=16)
    (tmp_path / "one.txt").write_text("a photo of a {c}.\n")
    got = _json(["eval", "zeroshot", "--checkpoint", run, "--data", str(tmp_path / "few"), "--classnames",
                 "imagenet1k", "--templates", str(tmp_path / "one.txt")], capsys)
    assert got["num_samples"] == 16 and 0 <= got["acc5"] <= 1


def test_bad_input_is_one_line_and_exit_2(setup, capsys, tmp_path):
    root, data, run = setup
    base = ["eval", "zeroshot", "--checkpoint", run]
    assert "unknown built-in classnames 'imagenet21k'" in _error([*base, "--classnames", "imagenet21k"], capsys)
    assert "built-in: openai, simple" in _error([*base, "--templates", "clip"], capsys)
    (tmp_path / "three.txt").write_text("zero\none\ntwo\n")
    assert "out of range for 3 class names" in _error([*base, "--classnames", str(tmp_path / "three.txt")], capsys)
    bare = tmp_path / "bare"
    write_split(bare / "test", raw_samples(data / "val")[:8], shard_size=8)
    assert "no classnames.txt in" in _error([*base, "--data", str(bare), "--split", "test"], capsys)
    (bare / "test/nshards.txt").unlink()
    assert "has no nshards.txt" in _error([*base, "--data", str(bare), "--split", "test"], capsys)
    folder = image_folder(data / "val", tmp_path / "f")
    err = _error([*base, "--data", str(folder), "--classnames", str(tmp_path / "three.txt"), "--templates", "simple"],
                 capsys)
    assert "10 class folders but 3 class names" in err
    assert "no split 'test'" in _error(["eval", "retrieval", "--checkpoint", run, "--data", str(data), "--split",
                                        "test"], capsys)


# --- linear probe on image folders and dataset roots ---------------------------------------------------


def test_linear_probe_on_image_folders_and_dataset_roots(setup, capsys):
    root, data, run = setup
    samples = raw_samples(data / "val")  # 240 to fit, 120 to score: a dataset root of split folders
    for split, part in (("train", samples[:240]), ("val", samples[240:])):
        write_split(root / "probe" / split, part, shard_size=100)
        write_split(root / "probe_src" / split, part, shard_size=1000)
        image_folder(root / "probe_src" / split, root / "probe_folders" / split)
    on_shards = _json(["eval", "linear-probe", "--checkpoint", run, "--train", str(root / "probe"), "--val",
                       str(root / "probe"), "--split", "val"], capsys)  # dataset roots: train_split train, split val
    on_folders = _json(["eval", "linear-probe", "--checkpoint", run, "--train", str(root / "probe_folders/train"),
                        "--val", str(root / "probe_folders/val")], capsys)
    assert (on_shards["num_train"], on_shards["num_val"]) == (on_folders["num_train"], on_folders["num_val"]) \
        == (240, 120)
    assert on_folders["linear_top1"] == pytest.approx(on_shards["linear_top1"], abs=0.03)
    assert on_folders["linear_top1"] > 0.3  # the tiny random features still separate the digits


# --- every rank its share ----------------------------------------------------------------------------


def test_ranks_share_image_folders_and_multi_caption_retrieval(setup, monkeypatch, tmp_path):
    root, data, run = setup
    cfg, model, tokenizer, transform = load_model_from_run(run)
    folder = image_folder(data / "val", tmp_path / "folder")
    keys = [[k for b in eval_loader(folder, CFG, transform, tokenizer, 50, r, 3) for k in b["key"]] for r in range(3)]
    assert sorted(sum(keys, [])) == sorted(k for b in eval_loader(folder, CFG, transform, tokenizer, 64)
                                           for k in b["key"]) and all(keys) and len(sum(keys, [])) == 360
    # retrieval over 2 ranks (the gather simulated): the figures one process gets
    samples = raw_samples(data / "val")[:30]
    write_split(tmp_path / "ret/test", ({"__key__": s["__key__"], "png": s["png"], "txt": "\n".join(caps)}
                                        for s, caps in zip(samples, multi_captions(30))), shard_size=7)
    spec = tmp_path / "ret/test"
    one = evaluate_retrieval(model, eval_loader(spec, CFG, transform, tokenizer, 8), tokenizer=tokenizer)
    parts = []
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: parts.append(obj) or [obj])
    for rank in (0, 1):
        evaluate_retrieval(model, eval_loader(spec, CFG, transform, tokenizer, 8, rank, 2), tokenizer=tokenizer)
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: parts)
    two = evaluate_retrieval(model, eval_loader(spec, CFG, transform, tokenizer, 8, 0, 2), tokenizer=tokenizer)
    assert one == pytest.approx(two) and one["num_texts"] > one["num_samples"] == 30


def test_eval_tasks_read_every_layout(setup):
    """The evaluator list the trainer runs (eval.tasks) takes the same data and settings."""
    from vlp.eval import run_tasks
    from vlp.runs import eval_context

    root, data, run = setup
    cfg, model, tokenizer, transform = load_model_from_run(run)
    ctx = eval_context(cfg, model, tokenizer, transform)
    cb = root / "tasks_cb"
    write_split(cb / "test", ({"__key__": s["__key__"], "png": s["png"], "cls": s["cls"]}
                              for s in raw_samples(data / "val")[:40]), shard_size=16)
    got = run_tasks([{"name": "zeroshot", "as": "cb", "data": str(cb), "classnames": str(data / "classnames.txt"),
                      "templates": "simple"},
                     {"name": "zeroshot", "as": "digits", "data": str(data), "split": "val"}], ctx)
    assert got["cb_num_samples"] == 40 and got["digits_num_samples"] == 360 and "cb_acc1" in got
