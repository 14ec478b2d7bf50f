"""Writing shards (digits, CSV import), shard specs, verify, and the `vlp data` CLI."""
import argparse
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlp.commands.data import add_data_parser
from vlp.data.csv_import import from_csv
from vlp.data.digits import CLASSNAMES, write_digits
from vlp.data.shards import expand_spec, read_shards, verify, write_shards


def _raise(exn):
    raise exn


def _samples(spec):
    """All raw samples of a spec, failing on any read error."""
    return list(read_shards(({"url": u} for u in expand_spec(spec)), handler=_raise))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, write_digits(out, size=24, shard_size=400)


def test_digits_counts_and_split(digits):
    out, counts = digits
    assert counts == {"train": 1437, "train_shards": 4, "val": 360, "val_shards": 1}
    train, val = _samples(out / "train"), _samples(out / "val")
    train_keys, val_keys = {s["__key__"] for s in train}, {s["__key__"] for s in val}
    assert len(train_keys) == 1437 and len(val_keys) == 360
    assert not train_keys & val_keys  # held-out images
    assert {int(s["cls"]) for s in val} == set(range(10))
    # stratified: each class keeps about its share (~36 of 360) in val
    assert all(30 <= sum(int(s["cls"]) == c for s in val) <= 42 for c in range(10))


def test_digits_sample_content(digits):
    out, _ = digits
    sample = _samples(out / "val")[0]
    image = Image.open(io.BytesIO(sample["png"]))
    assert image.size == (24, 24) and image.mode == "RGB"
    label, caption = int(sample["cls"]), sample["txt"].decode()
    assert CLASSNAMES[label] in caption.split() or str(label) in caption.split()
    assert sample["__key__"].startswith("digits-")


def test_digits_zeroshot_files(digits):
    out, _ = digits
    assert (out / "classnames.txt").read_text().split("\n")[:10] == CLASSNAMES
    templates = (out / "zeroshot_classification_templates.txt").read_text().strip().split("\n")
    assert len(templates) >= 3 and all("{c}" in t for t in templates)


def test_digits_are_reproducible(digits, tmp_path):
    out, _ = digits
    write_digits(tmp_path, size=24, shard_size=400)
    assert (tmp_path / "val/0.tar").read_bytes() == (out / "val/0.tar").read_bytes()


def test_verify_clean_shards(digits):
    out, _ = digits
    report = verify(out / "train")
    assert report["total"] == 1437 and report["corrupt"] == 0
    assert [s["samples"] for s in report["shards"]] == [400, 400, 400, 237]


def _write_tiny(folder, n_shards):
    samples = ({"__key__": f"s{i:03d}", "txt": "x", "png": b""} for i in range(n_shards))
    return write_shards(folder, samples, shard_size=1)


def test_expand_spec_forms(tmp_path):
    shards = _write_tiny(tmp_path / "a", 3)
    assert expand_spec(tmp_path / "a") == shards  # folder: sorted .tar files
    assert expand_spec(str(tmp_path / "a/shard-{000000..000002}.tar")) == shards
    assert expand_spec([str(tmp_path / "a/shard-000002.tar"), tmp_path / "a"]) == shards[2:] + shards
    assert expand_spec("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("a/shard-{000005..000009}.tar", "matches no file"),
        ("a/shard-{000000..000004}.tar", "2 of 5 shards are missing"),
        ("empty", "has no .tar files"),
        ([], "empty list"),
    ],
)
def test_expand_spec_errors(tmp_path, spec, message):
    _write_tiny(tmp_path / "a", 3)
    (tmp_path / "empty").mkdir()
    spec = [str(tmp_path / s) for s in spec] if isinstance(spec, list) else str(tmp_path / spec)
    with pytest.raises(ValueError, match=message):
        expand_spec(spec)


def test_write_shards_replaces_stale_shards(tmp_path):
    _write_tiny(tmp_path, 5)
    assert len(_write_tiny(tmp_path, 2)) == 2
    assert len(expand_spec(tmp_path)) == 2


def _png_bytes(value, size=(6, 5)):
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _write_csv(tmp_path, rows, header=("filepath", "caption", "label")):
    with (tmp_path / "data.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return tmp_path / "data.csv"


def test_from_csv_round_trip(tmp_path):
    (tmp_path / "img").mkdir()
    images = {f"img/{i}.png": _png_bytes(i * 40) for i in range(5)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    rows = [(name, f"caption {i}", i) for i, name in enumerate(images)]
    rows.insert(2, ("img/missing.png", "gone", 9))  # skipped and counted, not fatal
    out = tmp_path / "shards"
    counts = from_csv(_write_csv(tmp_path, rows), out, shard_size=2, label_col="label")
    assert counts == {"samples": 5, "shards": 3, "skipped": 1}
    samples = _samples(out)
    assert [s["png"] for s in samples] == list(images.values())  # bytes stored as-is
    assert [s["txt"].decode() for s in samples] == [f"caption {i}" for i in range(5)]
    assert [int(s["cls"]) for s in samples] == list(range(5))
    assert verify(out)["total"] == 5


def test_from_csv_bad_input(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(1))
    with pytest.raises(ValueError, match="no column 'label'"):
        no_label = _write_csv(tmp_path, [("a.png", "c")], header=("filepath", "caption"))
        from_csv(no_label, tmp_path / "o", label_col="label")
    with pytest.raises(ValueError, match=r"data.csv:2: label 'x'"):
        from_csv(_write_csv(tmp_path, [("a.png", "c", "x")]), tmp_path / "o", label_col="label")
    with pytest.raises(ValueError, match="no usable rows"):
        from_csv(_write_csv(tmp_path, [("nope.png", "c", 1)]), tmp_path / "o")


def _cli(argv):
    parser = argparse.ArgumentParser(prog="vlp")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_verify_json(digits, capsys):
    out, _ = digits
    assert _cli(["data", "verify", str(out / "val"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 360 and report["corrupt"] == 0


def test_cli_from_csv_and_verify_text(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(_png_bytes(1))
    csv_path = _write_csv(tmp_path, [("a.png", "one image", 3)])
    assert _cli(["data", "from-csv", "--csv", str(csv_path), "--out", str(tmp_path / "o"), "--label-col", "label"]) == 0
    assert _cli(["data", "verify", str(tmp_path / "o")]) == 0
    assert "1 samples in 1 shards, 0 corrupt" in capsys.readouterr().out


def test_read_shards_on_a_shard_cut_anywhere(tmp_path):
    """Wherever a shard is cut, what comes out is a prefix of its samples with every field
    intact, and the damage costs one handler call or shows as an incomplete last sample."""
    samples = [{"__key__": f"k{i}", "png": _png_bytes(i, (20 + 9 * i, 7)), "txt": f"caption {i} " * (60 * i + 1)}
               for i in range(4)]
    whole = (Path(write_shards(tmp_path / "whole", samples, shard_size=10)[0])).read_bytes()
    cut_path, outcomes = tmp_path / "cut.tar", set()
    for cut in range(0, len(whole), 61):
        cut_path.write_bytes(whole[:cut])
        errors = []
        got = list(read_shards([{"url": str(cut_path)}], handler=errors.append))
        assert [s["__key__"] for s in got] == [f"k{i}" for i in range(len(got))]
        for s, original in zip(got, samples):
            assert s.get("png", original["png"]) == original["png"]
            assert s.get("txt", original["txt"].encode()) == original["txt"].encode()
        incomplete = [s for s in got if not {"png", "txt"} <= set(s)]
        outcomes.add((bool(errors), bool(incomplete)))
        if errors:
            assert len(errors) == 1 and not incomplete, cut
        else:
            assert incomplete in ([], got[-1:]), cut
    assert outcomes == {(True, False), (False, False), (False, True)}  # every kind of cut was tried
