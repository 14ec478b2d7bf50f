"""`vlp eval suite`: several models over a datasets file, one table (CSV, JSON, bar chart)."""
import csv
import json
import sys

import pytest

from tests.eval_data import digits_and_run, raw_samples
from vlp.cli import main
from vlp.data.shards import write_split
from vlp.eval.suite import plot_suite, read_datasets


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small clip_benchmark dataset root (train/val split folders, class files), a tiny run and its
    open_clip export (the same weights: the suite must give both the same row)."""
    root = tmp_path_factory.mktemp("suite")
    data, run = digits_and_run(root)
    samples = raw_samples(data / "val")
    small = root / "small"
    write_split(small / "train", samples[:240], shard_size=100)
    write_split(small / "val", samples[240:], shard_size=100)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (small / name).write_bytes((data / name).read_bytes())
    assert main(["export", "--checkpoint", run, "--format", "open_clip", "--out", str(root / "oc")]) == 0
    return root, small, run


def test_suite_runs_every_task_for_every_model(setup, capsys, tmp_path):
    root, small, run = setup
    datasets = tmp_path / "datasets.txt"
    datasets.write_text(f"# DATA [TASK] [key=value ...]\n{small} zeroshot split=val\n"
                        f"{small} retrieval split=val   # every caption line counts\n\n"
                        f"{small} linear_probe split=val as=probe\n"
                        f"wds/small zeroshot split=val templates=simple as=simple\n")
    capsys.readouterr()
    argv = ["eval", "suite", "--model", run, str(root / "oc"), "--datasets", str(datasets), "--dataset-root",
            str(root / "{dataset}"), "--out", str(tmp_path / "out"), "--batch-size", "64", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["models"] == ["run", "oc"]
    labels = [d["label"] for d in report["datasets"]]
    assert labels == ["small:zeroshot", "small:retrieval", "probe", "simple"]
    for model in ("run", "oc"):
        per = report["results"][model]
        assert {"acc1", "acc5", "mean_per_class_recall"} <= set(per[labels[0]]) and per[labels[0]]["num_samples"] == 120
        assert {"image_retrieval_recall@5", "text_retrieval_recall@5"} <= set(per[labels[1]])
        assert per["probe"]["num_train"] == 240 and 0 <= per["probe"]["linear_top1"] <= 1
    run_row, oc_row = report["results"]["run"], report["results"]["oc"]
    for label in labels:  # a run and its open_clip export are the same model
        for key, value in run_row[label].items():
            assert oc_row[label][key] == pytest.approx(value, abs=1e-6), (label, key)
    with open(report["files"]["csv"]) as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows] == ["model", "run", "oc"] and "small:zeroshot/acc1" in rows[0]
    with open(report["files"]["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "out/suite.json"))["results"] == report["results"]
    # the readable form: a table of the headline figures
    assert main(argv[:-1]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("model") and "probe linear_top1" in out and "suite.png" in out


def test_suite_without_matplotlib_skips_the_chart_with_a_note(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    note = plot_suite([("d acc1", {"a": 0.5})], str(tmp_path / "x.png"))
    assert "matplotlib is not installed" in note and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("line, message", [
    ("{small} zeroshot spilt=val", "unknown key 'spilt'"),
    ("{small} classify", "neither a task"),
    ("{small}/nowhere zeroshot", "dataset not found"),
    ("wds/cifar10", "pass --dataset-root"),
    ("{small} zeroshot knn_k=three", "unknown key 'knn_k'"),
])
def test_bad_datasets_file_is_one_line_and_exit_2(setup, tmp_path, capsys, line, message):
    root, small, run = setup
    datasets = tmp_path / "d.txt"
    datasets.write_text(line.format(small=small) + "\n")
    capsys.readouterr()
    assert main(["eval", "suite", "--model", run, "--datasets", str(datasets)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "d.txt:1" in err


def test_bad_model_is_one_line_and_exit_2(setup, tmp_path, capsys):
    root, small, run = setup
    datasets = tmp_path / "d.txt"
    datasets.write_text(f"{small} zeroshot split=val\n")
    for model, message in (("open_clip:NoSuchNet", "unknown open_clip model 'NoSuchNet'"),
                           (str(tmp_path / "nothing"), "model not found")):
        capsys.readouterr()
        assert main(["eval", "suite", "--model", model, "--datasets", str(datasets), "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def test_task_defaults_from_dataset_type(setup, tmp_path):
    root, small, run = setup
    (tmp_path / "ret/test").mkdir(parents=True)
    (tmp_path / "ret/test/nshards.txt").write_text("1\n")
    (tmp_path / "ret/dataset_type.txt").write_text("retrieval\n")
    (tmp_path / "d.txt").write_text(f"{small} split=val\n{tmp_path / 'ret'}\n")
    assert [d.task for d in read_datasets(str(tmp_path / "d.txt"))] == ["zeroshot", "retrieval"]
