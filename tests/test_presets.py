"""ZeRO presets: the shipped JSON files, name/path resolution, precedence, and one real
DeepSpeed step per preset on CPU (in a fresh process, so that the process group and
DeepSpeed's globals do not leak into the rest of the suite)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from vlp.engine.config import EngineConfig
from vlp.engine.deepspeed_engine import ZERO_PRESETS, deepspeed_config, load_preset
from vlp.engine.optim import OptimConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESET_DIR = os.path.join(ROOT, "configs", "deepspeed")
NAMES = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]


def _zero(**engine) -> dict:
    return deepspeed_config(EngineConfig(**engine), OptimConfig(), micro_batch=4)["zero_optimization"]


def test_shipped_json_files_are_the_builtin_presets():
    files = sorted(f[: -len(".json")] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))
    assert files == ZERO_PRESETS.list() == NAMES
    for name in NAMES:
        with open(os.path.join(PRESET_DIR, f"{name}.json")) as f:
            assert json.load(f) == load_preset(name), name
        # a path resolves to the same fields as the name
        assert load_preset(os.path.join(PRESET_DIR, f"{name}.json")) == load_preset(name)
        assert _zero(preset=name)["stage"] == int(name[4])


def test_unknown_preset_lists_the_valid_ones():
    valid = "zero0, zero1, zero2, zero3, zero3_offload"
    with pytest.raises(ValueError, match=f"unknown ZeRO preset 'zero5'; valid: {valid}; or a path to a DeepSpeed"):
        _zero(preset="zero5")
    with pytest.raises(FileNotFoundError, match="engine.preset file not found"):
        _zero(preset="/nonexistent/zero2.json")


def test_preset_holds_zero_settings_only(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}))
    with pytest.raises(ValueError, match="sets gradient_clipping: a preset holds ZeRO settings only"):
        _zero(preset=str(path))
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1234}}))
    assert _zero(preset=str(path)) == {"stage": 2, "reduce_bucket_size": 1234}


def test_precedence_preset_then_fields_then_raw():
    # preset alone: its stage and knobs
    zero = _zero(preset="zero2")
    assert zero["stage"] == 2 and zero["overlap_comm"] is True and "offload_optimizer" not in zero
    # a set field beats the preset's value (and warns); the preset's other knobs stay
    with pytest.warns(UserWarning, match="engine.zero_stage=3 overrides stage 2 of engine.preset=zero2"):
        zero = _zero(preset="zero2", zero_stage=3)
    assert zero["stage"] == 3 and zero["allgather_bucket_size"] == 50_000_000  # a zero2 knob
    # a boolean field adds offload to a preset without it; one that offloads already keeps its section
    assert _zero(preset="zero2", offload_optimizer=True)["offload_optimizer"]["device"] == "cpu"
    kept = _zero(preset="zero3_offload", offload_optimizer=True)["offload_optimizer"]
    assert kept == {"device": "cpu", "pin_memory": True}
    # raw engine.deepspeed beats both
    raw = {"zero_optimization": {"stage": 1, "reduce_bucket_size": 7}}
    with pytest.warns(UserWarning):
        zero = _zero(preset="zero2", zero_stage=3, deepspeed=raw)
    assert zero["stage"] == 1 and zero["reduce_bucket_size"] == 7 and zero["overlap_comm"] is True
    # without a preset the fields are the whole story (the behaviour before presets)
    assert _zero() == {"stage": 0} and _zero(zero_stage=2) == {"stage": 2}
    # our torch AdamW needs DeepSpeed's CPU-Adam check off whenever the optimizer is offloaded
    full = deepspeed_config(EngineConfig(zero_stage=2, offload_optimizer=True), OptimConfig(), 4)
    assert full["zero_force_ds_cpu_optimizer"] is False


def test_offload_needs_the_right_stage():
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):
        _zero(preset="zero2", offload_params=True)
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):  # the raw stage is the one that runs
        _zero(preset="zero3_offload", deepspeed={"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="needs ZeRO stage 1-3"):
        _zero(offload_optimizer=True)


def test_preset_in_run_config(tmp_path):
    from vlp.config import load_config, save_config

    cfg = load_config(None, ["engine.preset=zero3_offload"])
    assert cfg.engine.preset == "zero3_offload" and cfg.engine.zero_stage == 0
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


# ---- one real DeepSpeed step per preset, in a fresh process ------------------------------


def _one_step(preset: str):
    from tests.tiny import tiny_batch, tiny_model_cfg
    from vlp.engine.checkpoint import full_state_dict
    from vlp.engine.deepspeed_engine import build_engine
    from vlp.engine.step import Step
    from vlp.models import create_model
    from vlp.objectives import build_objective

    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = create_model(cfg)
    engine, _, _ = build_engine(model, EngineConfig(preset=preset), OptimConfig(lr=1e-2, warmup_steps=0), 8)
    losses = Step(engine, build_objective({"name": "infonce"}), torch.device("cpu"))(tiny_batch(8, cfg))
    sections = (engine.zero_offload_optimizer(), engine.zero_offload_param())
    offload = [str(getattr(o, "device", "none")) for o in sections]
    return {"loss": losses["loss"], "stage": engine.zero_optimization_stage(), "offload": offload,
            "weights": full_state_dict(engine)}


def one_step_per_preset(out: str, presets) -> None:
    from vlp import dist
    from vlp.engine.deepspeed_engine import quiet_deepspeed

    quiet_deepspeed()
    dist.init_distributed("gloo")
    torch.save({p: _one_step(p) for p in presets}, out)


@pytest.mark.slow
def test_every_preset_builds_an_engine_and_steps(tmp_path):
    from tests.tiny import tiny_model_cfg
    from vlp.models import create_model

    out = tmp_path / "steps.pt"
    from tests.tiny import child_env

    env = child_env()
    code = f"from tests.test_presets import one_step_per_preset; one_step_per_preset({str(out)!r}, {NAMES!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    torch.manual_seed(0)
    init = create_model(tiny_model_cfg()).state_dict()
    ref = got["zero0"]
    assert [got[p]["stage"] for p in NAMES] == [0, 1, 2, 3, 3]
    assert [got[p]["offload"] for p in NAMES] == [["none", "none"]] * 4 + [["cpu", "cpu"]]  # optimizer, params
    for name in NAMES:
        assert got[name]["loss"] == pytest.approx(ref["loss"], rel=1e-6), name
        for key, w in ref["weights"].items():
            update = (w - init[key]).abs().max()
            err = (got[name]["weights"][key] - w).abs().max()
            assert err <= 1e-4 * update + 1e-7, (name, key, float(err), float(update))
    # the step moved the weights, so the equality above is not trivially true
    assert (ref["weights"]["visual.proj"] - init["visual.proj"]).abs().max() > 1e-3


# ---- tools/zero_memory.py: the memory table in docs/zero.md -----------------------------------


@pytest.fixture(scope="module")
def zero_memory():
    import importlib.util

    spec = importlib.util.spec_from_file_location("zero_memory", os.path.join(ROOT, "tools", "zero_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zero_accounting(zero_memory):
    psi = 1000
    one = zero_memory.per_rank_bytes(psi, 1)
    assert all(m["gpu"] + m["host"] == 16 * psi for m in one.values())  # one rank: nothing to split
    eight = zero_memory.per_rank_bytes(psi, 8)
    assert [eight[p]["gpu"] for p in NAMES[:4]] == [16 * psi, 4 * psi + 12 * psi / 8, 2 * psi + 14 * psi / 8, 2 * psi]


def test_param_count_is_open_clips(zero_memory):
    # open_clip's model_profile: ViT-B-16 149.62 M (image 86.19 M, text 63.43 M)
    n = zero_memory.count_params("ViT-B-16")
    assert (round(n["total"] / 1e4), round(n["image"] / 1e4), round(n["text"] / 1e4)) == (14962, 8619, 6343)


def test_saved_activations_grow_linearly_with_batch(zero_memory):
    from tests.tiny import tiny_batch, tiny_model_cfg
    from vlp.models import create_model

    cfg = tiny_model_cfg()
    model = create_model(cfg).train()
    one, four = (zero_memory.saved_activation_bytes(model, tiny_batch(n, cfg)) for n in (1, 4))
    assert one > 0 and abs(four - 4 * one) <= 0.02 * four  # per-sample tensors only (a shared mask at most)
