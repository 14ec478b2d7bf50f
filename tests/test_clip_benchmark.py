"""vlp's zero-shot and retrieval metrics equal clip_benchmark's own (its ``zeroshot_classification`` and
``zeroshot_retrieval.evaluate``) on the same tiny model and data, read from datasets written by
clip_benchmark's converter; and clip_benchmark reads vlp's built-in digits as they are written."""
import builtins
import json

import numpy as np
import pytest
import torch

cb_zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification",
                                  reason="clip-benchmark is not installed (a dev dependency: pip install -e '.[dev]')")
cb_builder = pytest.importorskip("clip_benchmark.datasets.builder", reason="clip_benchmark's dataset builder does not "
                                 "import (it needs requests, a dev dependency)")
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval  # noqa: E402
from clip_benchmark.models import load_clip  # noqa: E402
from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset  # noqa: E402

from tests.eval_data import digits_and_run, multi_captions, raw_samples, webp  # noqa: E402
from vlp.cli import main  # noqa: E402
from vlp.data.digits import CLASSNAMES, ZEROSHOT_TEMPLATES  # noqa: E402

KS = (1, 5, 10)


class Converted(list):
    """(image bytes, label) pairs with the class files clip_benchmark's converter writes."""

    classes = CLASSNAMES
    templates = ZEROSHOT_TEMPLATES


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The digits, a tiny run over them, its open_clip export loaded as clip_benchmark loads a model."""
    root = tmp_path_factory.mktemp("cb")
    data, run = digits_and_run(root)
    assert main(["export", "--checkpoint", run, "--format", "open_clip", "--out", str(root / "oc")]) == 0
    model, transform, tokenizer = load_clip("open_clip", f"local-dir:{root / 'oc'}", "none", None, "cpu")
    return root, data, run, (model.eval(), transform, tokenizer)


@pytest.fixture
def numpy_scalars(monkeypatch):
    """clip_benchmark 1.6.2's ``accuracy`` calls ``float`` on a 1-element array, which numpy >= 2.4
    rejects; this gives that module a ``float`` that takes the element (nothing else changes)."""
    def as_float(x):
        return builtins.float(np.asarray(x).reshape(-1)[0]) if isinstance(x, np.ndarray) else builtins.float(x)

    monkeypatch.setattr(cb_zeroshot, "float", as_float, raising=False)


def _vlp(argv, capsys):
    capsys.readouterr()  # what came before (clip_benchmark's converter prints)
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _cb_loader(root, split, transform, batch_size=64, task="zeroshot_classification"):
    dataset = cb_builder.build_dataset(f"wds/{root.name}", root=str(root), transform=transform, split=split, task=task)
    return torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, num_workers=0), dataset


def test_zeroshot_equals_clip_benchmark_on_three_layouts(setup, numpy_scalars, capsys):
    root, data, run, (model, transform, tokenizer) = setup
    # clip_benchmark's classification layout, written by its converter: webp + cls, no caption
    samples = raw_samples(data / "val")
    convert_dataset(Converted((webp(s["png"]), int(s["cls"])) for s in samples), "test", str(root / "cls"),
                    image_format="webp", max_count=150, verbose=False)
    assert (root / "cls/test/nshards.txt").read_text().strip() == "3"
    ours = {
        "vlp layout": _vlp(["eval", "zeroshot", "--checkpoint", run, "--data", str(data / "val")], capsys),
        "root + split": _vlp(["eval", "zeroshot", "--checkpoint", run, "--data", str(root / "cls"), "--split", "test"],
                             capsys),
        "split folder": _vlp(["eval", "zeroshot", "--checkpoint", run, "--data", str(root / "cls/test")], capsys),
    }
    theirs = {}
    for name, (folder, split) in {"clip_benchmark layout": (root / "cls", "test"), "vlp layout": (data, "val")}.items():
        loader, dataset = _cb_loader(folder, split, transform)
        assert dataset.classes == CLASSNAMES
        theirs[name] = cb_zeroshot.evaluate(model, loader, tokenizer, dataset.classes, dataset.templates, "cpu",
                                            amp=False)
    reference = theirs["clip_benchmark layout"]
    # not one class predicted for every image (mean per-class recall would be exactly 1/10)
    assert abs(reference["mean_per_class_recall"] - 0.1) > 1e-3 and reference["acc5"] < 1
    for name, metrics in {**ours, **{f"clip_benchmark on {k}": v for k, v in theirs.items()}}.items():
        assert metrics.get("num_samples", len(samples)) == len(samples), name
        for key in ("acc1", "acc5", "mean_per_class_recall"):
            assert abs(metrics[key] - reference[key]) <= 1e-6, (name, key, metrics[key], reference[key])
        assert metrics.get("top1", metrics["acc1"]) == metrics["acc1"]


def test_retrieval_equals_clip_benchmark_with_several_captions_per_image(setup, capsys):
    root, data, run, (model, transform, tokenizer) = setup
    samples = raw_samples(data / "val")[:45]
    captions = list(multi_captions(len(samples)))
    convert_retrieval_dataset([(webp(s["png"]), caps) for s, caps in zip(samples, captions)], "test",
                              str(root / "ret"), image_format="webp", max_count=20, verbose=False)
    assert (root / "ret/dataset_type.txt").read_text().strip() == "retrieval"
    ours = _vlp(["eval", "retrieval", "--checkpoint", run, "--data", str(root / "ret"), "--split", "test",
                 "--batch-size", "16"], capsys)
    loader, _ = _cb_loader(root / "ret", "test", transform, batch_size=16, task="zeroshot_retrieval")
    theirs = cb_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=list(KS))
    assert ours["num_samples"] == len(samples) and ours["num_texts"] == sum(map(len, captions)) > len(samples)
    for k in KS:
        for key in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
            assert abs(ours[key] - theirs[key]) <= 1e-6, (key, ours[key], theirs[key])
    assert ours["image_retrieval_recall@1"] == ours["text_to_image_R@1"] and 0 < theirs["text_retrieval_recall@5"] < 1
