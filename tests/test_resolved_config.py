"""A run's saved config.yaml is fully resolved: reloading it after a registry default
changed builds the same model, heads and objective (docs/design.md, "The run config")."""
import dataclasses
import typing

import torch
import yaml

from tests.helpers import make_tiny_run
from vlp.config import load_config
from vlp.eval import EVALUATORS
from vlp.models import create_model
from vlp.models.heads import HEADS
from vlp.models.towers import IMAGE_TOWERS
from vlp.objectives import OBJECTIVES, build_objective
from vlp.registry import Entry

HEAD = {"cls": {"name": "classifier", "num_classes": 3}}


def _with_default(monkeypatch, registry, name: str, **defaults) -> None:
    """Replace entry ``name``'s settings class by one with other defaults (as a later release might)."""
    entry = registry.get(name)
    hints = typing.get_type_hints(entry.settings)
    fields = [(f.name, hints[f.name], dataclasses.field(default=defaults[f.name]))
              for f in dataclasses.fields(entry.settings) if f.name in defaults]
    changed = dataclasses.make_dataclass(entry.settings.__name__, fields, bases=(entry.settings,))
    monkeypatch.setitem(registry._entries, name, Entry(name, entry.builder, changed))


def _objective_loss(spec) -> float:
    g = torch.Generator().manual_seed(0)
    x, y = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1) for _ in range(2))
    losses = build_objective(spec).cross_sample({"image": x, "text": y}, {"logit_scale": torch.tensor([10.0])})
    return float(losses["loss"])


def test_saved_config_lists_every_setting(tmp_path):
    run = make_tiny_run(tmp_path, heads=HEAD)
    saved = yaml.safe_load(open(f"{run}/config.yaml"))
    image = IMAGE_TOWERS.get("open_clip").settings
    assert set(saved["model"]["image"]) == {"name", *(f.name for f in dataclasses.fields(image))}
    names = lambda registry, entry: {"name", *(f.name for f in dataclasses.fields(registry.get(entry).settings))}  # noqa: E731
    assert set(saved["model"]["heads"]["cls"]) == names(HEADS, "classifier")
    assert set(saved["objective"]) == names(OBJECTIVES, "infonce")
    assert saved["eval"]["tasks"] == [{"name": "zeroshot", **dataclasses.asdict(EVALUATORS.get("zeroshot").settings())}]
    assert saved["eval"]["zeroshot"] is None  # the shorthand became the task list


def test_changed_defaults_do_not_change_a_saved_run(tmp_path, monkeypatch):
    run = make_tiny_run(tmp_path, heads=HEAD)
    before = load_config(f"{run}/config.yaml")
    torch.manual_seed(0)
    model_before = create_model(before.model).state_dict()
    loss_before = _objective_loss(before.objective)

    # a later release changes defaults of the tower, the head, the objective and an evaluator
    _with_default(monkeypatch, IMAGE_TOWERS, "open_clip", mlp_ratio=2.0, ls_init_value=0.5)
    _with_default(monkeypatch, HEADS, "classifier", hidden_dim=7)
    _with_default(monkeypatch, OBJECTIVES, "infonce", label_smoothing=0.3)
    _with_default(monkeypatch, EVALUATORS, "zeroshot", modality="audio")

    after = load_config(f"{run}/config.yaml")
    torch.manual_seed(0)
    model_after = create_model(after.model).state_dict()
    assert model_after.keys() == model_before.keys()
    assert all(torch.equal(model_after[k], model_before[k]) for k in model_before)
    assert _objective_loss(after.objective) == loss_before
    assert after.eval.tasks == before.eval.tasks

    # the same settings given as a bare spec do pick up the new defaults: the check above could fail
    bare = load_config(None, ["model.embed_dim=32", "model.image.width=32", "model.image.head_width=16"])
    assert bare.model.image["mlp_ratio"] == 2.0 and bare.model.image["ls_init_value"] == 0.5
    assert _objective_loss({"name": "infonce"}) != loss_before
    assert bare.eval.tasks[0]["modality"] == "audio"


def test_shorthands_edit_the_task_list():
    cfg = load_config("configs/quickstart/coca_digits.yaml", ["eval.zeroshot=false", "eval.retrieval=true"])
    assert [t["name"] for t in cfg.eval.tasks] == ["caption", "retrieval"]
    cfg = load_config(None, ["eval.retrieval=true"])  # no tasks: zero-shot plus retrieval, as before tasks existed
    assert [t["name"] for t in cfg.eval.tasks] == ["zeroshot", "retrieval"]
    assert load_config(None, ["eval.zeroshot=false"]).eval.tasks == []


def test_nested_objective_specs_are_resolved_too():
    cfg = load_config("configs/quickstart/coca_digits.yaml")
    inner = cfg.objective["contrastive"]
    assert set(inner) == {"name", *(f.name for f in dataclasses.fields(OBJECTIVES.get(inner["name"]).settings))}
