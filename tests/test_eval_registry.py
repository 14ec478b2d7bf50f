"""Evaluators as a registry: `vlp eval NAME` generated from it, the val_loss evaluator
against open_clip's ClipLoss, and the task list run on a model."""
import dataclasses
import io
import typing

import pytest
import torch
from open_clip.loss import ClipLoss
from PIL import Image

from tests.helpers import make_tiny_run, noise_png
from vlp.cli import build_parser, main
from vlp.data.shards import write_shards
from vlp.eval import EVALUATORS, run_tasks
from vlp.objectives import build_objective
from vlp.runs import eval_context, load_model_from_run


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evreg")
    write_shards(root / "val", ({"__key__": f"v{i:03d}", "png": noise_png(i), "txt": f"a photo of thing {i % 3}",
                                 "cls": i % 3} for i in range(20)), 7)
    (root / "classnames.txt").write_text("zero\none\ntwo\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of thing {c}\n")
    return make_tiny_run(root, [f"data.val={root / 'val'}"]), root


def test_eval_subcommands_come_from_the_registry():
    parser = build_parser("eval")
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval"]
    tasks = next(a for a in sub._actions if a.dest == "eval_task").choices
    assert set(tasks) == {n.replace("_", "-") for n in EVALUATORS.list()} | {"continual", "suite"}
    for name in EVALUATORS.list():
        options = {o for a in tasks[name.replace("_", "-")]._actions for o in a.option_strings}
        settings = EVALUATORS.get(name).settings
        for f in dataclasses.fields(settings):  # every setting is an option (data: the common --data)
            assert f"--{f.name.replace('_', '-')}" in options or f.default is True, (name, f.name)
        assert {"--checkpoint", "--config", "--data", "--json"} <= options
    flags = lambda name: {o for a in tasks[name]._actions for o in a.option_strings}  # noqa: E731
    assert {"--C", "--knn-k", "--train", "--val"} <= flags("linear-probe") and "--no-cache" in flags("caption")


def test_every_evaluator_has_a_settings_dataclass_and_documented_fields():
    from vlp.registry import field_comments

    for name in EVALUATORS.list():
        settings = EVALUATORS.get(name).settings
        assert dataclasses.is_dataclass(settings), name
        typing.get_type_hints(settings)  # resolvable: the CLI derives option types from them
        assert all(field_comments(settings).get(f.name) for f in dataclasses.fields(settings)), name


@pytest.mark.parametrize("batch_size", [32, 6])
def test_val_loss_equals_open_clip_clip_loss(run_and_data, batch_size):
    run, root = run_and_data
    cfg, model, tokenizer, transform = load_model_from_run(run)
    cfg.eval.batch_size = batch_size
    ctx = eval_context(cfg, model, tokenizer, transform, objective=build_objective(cfg.objective))
    got = run_tasks([{"name": "val_loss"}], ctx)
    # reference: open_clip's ClipLoss on each eval batch (in shard order), weighted by its size
    images = torch.stack([transform(Image.open(io.BytesIO(noise_png(i))).convert("RGB")) for i in range(20)])
    texts = tokenizer([f"a photo of thing {i % 3}" for i in range(20)])
    with torch.no_grad():
        x = model.encode_image(images, normalize=True).double()
        y = model.encode_text(texts, normalize=True).double()
        scale = model.logit_scale.exp().double()
    total = sum(float(ClipLoss()(x[i:i + b], y[i:i + b], scale)) * len(x[i:i + b])
                for i, b in _batches(20, batch_size))
    assert got["val_loss_num_samples"] == 20
    assert abs(got["val_loss_loss"] - total / 20) < 1e-5


def _batches(n: int, batch: int):
    """(start, size) of the eval batches: one ordered pass over the shards, the last batch partial."""
    start = 0
    while start < n:
        size = min(batch, n - start)
        yield start, size
        start += size


def test_cli_eval_val_loss_and_bad_task(run_and_data, capsys):
    run, root = run_and_data
    assert main(["eval", "val-loss", "--checkpoint", run, "--batch-size", "32"]) == 0
    assert capsys.readouterr().out.startswith("val-loss on ")
    with pytest.raises(ValueError, match="unknown evaluator 'nope'"):
        run_tasks([{"name": "nope"}], None)
