import pytest

from vlp.config import load_config, save_config
from vlp.registry import Registry


def test_overrides_and_types():
    overrides = ["optim.lr=1e-3", "optim.steps=200", "engine.zero_stage=2"]
    cfg = load_config("configs/quickstart/clip_digits.yaml", overrides)
    assert cfg.optim.lr == 1e-3 and cfg.optim.steps == 200 and cfg.engine.zero_stage == 2
    assert cfg.model.image["width"] == 128  # from the recipe


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; valid keys here: betas, cooldown_power"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("optim.lr=abc", "bad config value for 'optim.lr'"),
        ("model.image.widht=3", "unknown key 'widht' in image tower 'open_clip'; valid:"),
        ("objective.name=nope", "unknown objective 'nope'; valid: clip,"),
        ("engine.zero_stage=4", "engine.zero_stage must be 0, 1, 2 or 3"),
        ("engine.grad_cache.chunk_size=7", "must be 0 or divide data.batch_size"),
    ],
)
def test_bad_config_is_one_line_error(override, needle):
    with pytest.raises(ValueError) as e:
        load_config("configs/quickstart/clip_digits.yaml", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError):
        load_config("nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/quickstart/clip_digits.yaml", ["optim.lr=3e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


def test_registry_duplicate_and_unknown():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(ValueError, match="unknown thing 'b'; valid: a"):
        reg.get("b")
    assert reg.list() == ["a"] and reg.build({"name": "a"}) == 1
