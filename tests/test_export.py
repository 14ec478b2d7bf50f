"""Export round-trips: what `vlp export` writes loads in open_clip, timm, transformers (and back in
vlp) with identical outputs; a real ZeRO-3 checkpoint exports its gathered and its fp32 master weights."""
import json
import os
import subprocess
import sys
import uuid

import open_clip
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.helpers import TAG, TINY_MODEL, make_tiny_run
from vlp.cli import main
from vlp.commands.export import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, TIMM_HEAD, export, export_open_clip, save_hf_towers
from vlp.runs import load_model_from_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CAPTIONS = ["a handwritten seven", "the digit 3", "a photo of a cat", ""]


def _set_logits(run_dir, scale: float, bias=None) -> None:
    """Give the checkpoint logit scale/bias values no fresh model has, so a round trip must carry them."""
    path = os.path.join(run_dir, "checkpoints", TAG, "model.safetensors")
    state = load_file(path)
    state["logit_scale"] = torch.full_like(state["logit_scale"], scale)
    if bias is not None:
        state["logit_bias"] = torch.full_like(state["logit_bias"], bias)
    save_file(state, path)


def _assert_same_embeddings(ours, theirs, tokenizer) -> None:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(CAPTIONS)  # (4, L)
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images), ours.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.encode_text(tokens), ours.encode_text(tokens), atol=1e-5, rtol=0)


@pytest.fixture
def exported(tmp_path):
    run = make_tiny_run(tmp_path)
    _set_logits(run, scale=1.25)
    out = export_open_clip(run, str(tmp_path / "oc"))
    return run, out


def test_open_clip_local_dir_loads_same_model(exported):
    run, out = exported
    _, ours, tokenizer, eval_tf = load_model_from_run(run)
    theirs, _, their_tf = open_clip.create_model_and_transforms("local-dir:" + out)
    assert isinstance(theirs, open_clip.CustomTextCLIP)
    _assert_same_embeddings(ours, theirs, tokenizer)
    assert theirs.logit_scale.item() == pytest.approx(1.25)
    assert theirs.logit_bias is None
    # open_clip rebuilds the same preprocessing and tokenizer from the folder
    image = Image.new("RGB", (40, 50), (200, 30, 90))
    torch.testing.assert_close(their_tf(image), eval_tf(image))
    their_tok = open_clip.get_tokenizer("local-dir:" + out)
    assert torch.equal(their_tok(CAPTIONS), tokenizer(CAPTIONS))


def test_open_clip_config_plus_pretrained_file(exported, tmp_path):
    run, out = exported
    _, ours, tokenizer, _ = load_model_from_run(run)
    with open(os.path.join(out, OPEN_CLIP_CONFIG)) as f:
        model_cfg = json.load(f)["model_cfg"]
    name = f"vlp-test-{uuid.uuid4().hex[:8]}"  # open_clip's config registry is global
    cfg_file = tmp_path / f"{name}.json"
    cfg_file.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(str(cfg_file))
    theirs = open_clip.create_model(name, pretrained=os.path.join(out, OPEN_CLIP_WEIGHTS))
    _assert_same_embeddings(ours, theirs, tokenizer)


def test_siglip_logit_bias_round_trips(tmp_path):
    run = make_tiny_run(tmp_path, init_logit_bias=-10.0)
    _set_logits(run, scale=2.5, bias=-3.5)
    out = export_open_clip(run, str(tmp_path / "oc"))
    _, ours, tokenizer, _ = load_model_from_run(run)
    theirs = open_clip.create_model("local-dir:" + out)
    assert theirs.logit_bias is not None
    assert theirs.logit_bias.item() == pytest.approx(-3.5)
    assert theirs.logit_scale.item() == pytest.approx(2.5)
    _assert_same_embeddings(ours, theirs, tokenizer)


def test_cli_export_safetensors_reloads(tmp_path, capsys):
    run = make_tiny_run(tmp_path, init_logit_bias=-10.0)
    out = str(tmp_path / "st")
    assert main(["export", "--checkpoint", run, "--format", "safetensors", "--out", out]) == 0
    assert capsys.readouterr().out.strip() == out
    assert sorted(os.listdir(out)) == ["config.yaml", "model.safetensors"]
    exported = load_file(os.path.join(out, "model.safetensors"))
    original = load_file(os.path.join(run, "checkpoints", TAG, "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    # the copied config rebuilds the architecture the weights fit
    from vlp.config import load_config
    from vlp.models import create_model

    model = create_model(load_config(os.path.join(out, "config.yaml")).model, load_weights=False)
    model.load_state_dict(exported, strict=True)


def test_cli_export_open_clip_prints_folder(tmp_path, capsys):
    run = make_tiny_run(tmp_path)
    out = str(tmp_path / "oc")
    assert main(["export", "--checkpoint", run, "--out", out]) == 0  # open_clip is the default format
    assert capsys.readouterr().out.strip() == out
    assert {OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS} <= set(os.listdir(out))
    _, ours, tokenizer, _ = load_model_from_run(run)
    _assert_same_embeddings(ours, open_clip.create_model("local-dir:" + out), tokenizer)


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export(missing, "open_clip", str(tmp_path / "out"))
    assert main(["export", "--checkpoint", missing, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint not found" in err
    assert not os.path.exists(tmp_path / "out")


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export(make_tiny_run(tmp_path), "onnx", str(tmp_path / "out"))


def test_safetensors_export_loads_with_load_model_from_run(tmp_path):
    run = make_tiny_run(tmp_path)
    out = export(run, "safetensors", str(tmp_path / "st"))
    _, ours, tokenizer, _ = load_model_from_run(run)
    _, reloaded, _, _ = load_model_from_run(os.path.join(out, "model.safetensors"))
    _assert_same_embeddings(ours, reloaded, tokenizer)


# ---- timm: the image tower ----------------------------------------------------------------

VIT = TINY_MODEL["image"]
VIT_VARIANTS = {
    "tok": {},
    "avg_ln_after_pool_layer_scale": {
        "image": {**VIT, "pool_type": "avg", "final_ln_after_pool": True, "ls_init_value": 0.5}
    },
    "avg_no_ln_pre_quick_gelu": {"image": {**VIT, "pool_type": "avg", "no_ln_pre": True}, "quick_gelu": True},
}


def _images(size: int = 32):
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))


def _assert_timm_pipeline_is_ours(theirs, head, run) -> None:
    """From PIL images (not square, not the model's size): timm's own preprocessing of the
    exported folder (its data config) and the timm model, then the saved projection ``head``
    (if any), give vlp's eval transform + ``encode_image`` features."""
    from timm.data import create_transform, resolve_data_config

    _, ours, _, eval_tf = load_model_from_run(run)
    timm_tf = create_transform(**resolve_data_config(model=theirs))
    g = torch.Generator().manual_seed(4)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in ((50, 40), (23, 61))]
    x_timm = torch.stack([timm_tf(im) for im in images])
    x_ours = torch.stack([eval_tf(im) for im in images])
    torch.testing.assert_close(x_timm, x_ours, rtol=0, atol=1e-6)
    with torch.no_grad():
        got = theirs(x_timm)
        if head:
            got = got @ head["proj.weight"].T
        want = ours.encode_image(x_ours)
    assert float((want[0] - want[1]).abs().max()) > 1e-2  # the two images' features differ
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VIT_VARIANTS), ids=list(VIT_VARIANTS))
def test_timm_vit_gives_our_image_features(tmp_path, variant):
    run = make_tiny_run(tmp_path, **VIT_VARIANTS[variant])
    out = export(run, "timm", str(tmp_path / "timm"))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    _, ours, _, _ = load_model_from_run(run)
    theirs = timm.create_model("local-dir:" + out, pretrained=True).eval()
    assert type(theirs).__name__ == "VisionTransformer"
    with torch.no_grad():
        torch.testing.assert_close(theirs(_images()), ours.encode_image(_images()), atol=1e-5, rtol=0)
    _assert_timm_pipeline_is_ours(theirs, {}, run)


def test_timm_vit_file_with_pretrained_cfg_overlay(tmp_path):
    """The other documented route: an entry point + its model_args + the weights file."""
    run = make_tiny_run(tmp_path)
    out = export(run, "timm", str(tmp_path / "timm"))
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architecture"] == "vit_base_patch16_clip_224" and config["num_classes"] == TINY_MODEL["embed_dim"]
    # our preprocessing, not the entry point's default tag's
    pcfg = config["pretrained_cfg"]
    assert pcfg["tag"] == "vlp" and "license" not in pcfg and pcfg["input_size"] == [3, 32, 32]
    assert pcfg["mean"] == list(open_clip.OPENAI_DATASET_MEAN) and pcfg["crop_pct"] == 1.0
    overlay = dict(file=os.path.join(out, "model.safetensors"), num_classes=config["num_classes"])
    theirs = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                               **config["model_args"]).eval()
    _, ours, _, _ = load_model_from_run(run)
    with torch.no_grad():
        torch.testing.assert_close(theirs(_images()), ours.encode_image(_images()), atol=1e-5, rtol=0)


def test_timm_export_rejects_vit_options_timm_lacks(tmp_path):
    run = make_tiny_run(tmp_path, image={**VIT, "qk_norm": True})
    with pytest.raises(ValueError, match=r"no exact timm VisionTransformer equivalent \(qk_norm=True\)"):
        export(run, "timm", str(tmp_path / "timm"))


@pytest.mark.parametrize("model_name", ["test_vit", "test_resnet"])
def test_timm_tower_trunk_round_trips(tmp_path, model_name):
    run = make_tiny_run(tmp_path, image={"name": "timm", "model_name": model_name, "image_size": 16})
    out = export(run, "timm", str(tmp_path / "timm"))
    assert sorted(os.listdir(out)) == ["config.json", TIMM_HEAD, "model.safetensors"]
    _, ours, _, _ = load_model_from_run(run)
    x = _images(16)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architecture"] == model_name and config["model_args"]["num_classes"] == 0
    by_dir = timm.create_model("local-dir:" + out, pretrained=True).eval()
    # the trunk has no classifier: num_classes=0 (in model_args) is what makes the file load
    overlay = dict(file=os.path.join(out, "model.safetensors"))
    by_file = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay,
                                **config["model_args"]).eval()
    with pytest.raises(RuntimeError, match="Missing key"):
        timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay)
    head = load_file(os.path.join(out, TIMM_HEAD))
    assert sorted(head) == ["proj.weight"]  # open_clip TimmModel head: dropout + linear projection
    with torch.no_grad():
        trunk = ours.visual.trunk(x)
        torch.testing.assert_close(by_dir(x), trunk, atol=1e-5, rtol=0)
        torch.testing.assert_close(by_file(x), trunk, atol=1e-5, rtol=0)
        torch.testing.assert_close(by_dir(x) @ head["proj.weight"].T, ours.encode_image(x), atol=1e-5, rtol=0)
    _assert_timm_pipeline_is_ours(by_dir, head, run)


# ---- hf ---------------------------------------------------------------------------------------


def test_hf_export_names_the_towers_that_are_not_transformers_models(tmp_path, capsys):
    run = make_tiny_run(tmp_path)
    msg = r"none here is: visual \(VisionTransformer\), text \(TextTransformer\)"
    with pytest.raises(ValueError, match=msg):
        export(run, "hf", str(tmp_path / "hf"))
    assert main(["export", "--checkpoint", run, "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "none here is: visual (VisionTransformer)" in capsys.readouterr().err


def test_hf_towers_save_pretrained_round_trip(tmp_path):
    """A transformers tower (open_clip HFTextEncoder layout: .transformer + own head) round-trips."""
    from transformers import AutoModel, BertConfig, BertModel

    class HFTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32))
            self.proj = torch.nn.Linear(16, 8, bias=False)

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.visual, model.text = torch.nn.Linear(4, 4), HFTower().eval()
    with pytest.warns(UserWarning, match=r"visual \(Linear\) is not a transformers model"):
        written = save_hf_towers(model, str(tmp_path / "hf"))
    assert written == {"text": str(tmp_path / "hf" / "text")}
    reloaded = AutoModel.from_pretrained(written["text"]).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).last_hidden_state, model.text.transformer(ids).last_hidden_state,
                                   atol=1e-6, rtol=0)
    head = load_file(os.path.join(written["text"], "head.safetensors"))
    assert torch.equal(head["proj.weight"], model.text.proj.weight)


# ---- a real ZeRO-3 checkpoint: gathered 16-bit weights and consolidated fp32 master weights ----


def make_zero3_runs(out: str) -> None:
    """RUN dirs OUT/{fp32,bf16}: 2 DeepSpeed ZeRO-3 steps of the tiny model, then vlp's checkpoint."""
    from vlp import dist
    from vlp.config import load_config, save_config
    from vlp.engine import checkpoint
    from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
    from vlp.engine.optim import OptimConfig
    from vlp.engine.step import Step
    from vlp.models import ModelConfig, create_model
    from vlp.objectives import build_objective

    quiet_deepspeed()
    dist.init_distributed("gloo")
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=g), "text": torch.randint(1, 49407, (8, 16), generator=g)}
    for precision in ("fp32", "bf16"):
        run = os.path.join(out, precision)
        overrides = ["data.workers=0", f"run.dir={run}", "engine.zero_stage=3", f"engine.precision={precision}"]
        cfg = load_config(None, overrides)
        cfg.model = ModelConfig(**TINY_MODEL)
        torch.manual_seed(0)
        engine, _, _ = build_engine(create_model(cfg.model), cfg.engine, OptimConfig(lr=1e-2, warmup_steps=0), 8)
        step = Step(engine, build_objective({"name": "infonce"}), torch.device("cpu"))
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for _ in range(2):
            step({**batch, "image": batch["image"].to(dtype)})
        os.makedirs(run, exist_ok=True)
        save_config(cfg, os.path.join(run, "config.yaml"))
        checkpoint.save(engine, run, 2, {"step": 2})


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    from tests.tiny import child_env

    env = child_env()
    code = f"from tests.test_export import make_zero3_runs; make_zero3_runs({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p: str(out / p) for p in ("fp32", "bf16")}


def _gathered(run):
    return load_file(os.path.join(run, "checkpoints", "step_00000002", "model.safetensors"))


def _cli_export(run, out, capsys, *flags):
    assert main(["export", "--checkpoint", run, "--format", "safetensors", "--out", out, *flags]) == 0
    assert capsys.readouterr().out.strip() == out  # DeepSpeed's progress lines go to stderr
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.slow
def test_zero3_fp32_run_exports_identical_tensors(zero3_runs, tmp_path, capsys):
    run = zero3_runs["fp32"]
    gathered = _gathered(run)
    plain = _cli_export(run, str(tmp_path / "plain"), capsys)
    master = _cli_export(run, str(tmp_path / "master"), capsys, "--fp32-from-zero")
    assert plain.keys() == master.keys() == gathered.keys()
    for k in gathered:
        assert torch.equal(plain[k], gathered[k]) and torch.equal(master[k], gathered[k]), k


@pytest.mark.slow
def test_zero3_bf16_run_exports_fp32_master_weights(zero3_runs, tmp_path, capsys):
    run = zero3_runs["bf16"]
    gathered = _gathered(run)
    assert {v.dtype for v in gathered.values()} == {torch.bfloat16}
    master = _cli_export(run, str(tmp_path / "master"), capsys, "--fp32-from-zero")
    assert master.keys() == gathered.keys() and {v.dtype for v in master.values()} == {torch.float32}
    # the master weights round to the saved 16-bit ones, and carry bits they lack
    assert all(torch.equal(master[k].to(torch.bfloat16), gathered[k]) for k in gathered)
    assert any(not torch.equal(master[k], gathered[k].float()) for k in gathered)
    # every format takes them: the open_clip folder holds the same fp32 tensors
    oc = export(run, "open_clip", str(tmp_path / "oc"), fp32_from_zero=True)
    exported = load_file(os.path.join(oc, OPEN_CLIP_WEIGHTS))
    assert all(torch.equal(exported[k], master[k]) for k in master)


def test_fp32_from_zero_needs_optimizer_shards(tmp_path, capsys):
    run = make_tiny_run(tmp_path)  # model.safetensors only, as a ZeRO-0 run or an export folder
    assert main(["export", "--checkpoint", run, "--format", "safetensors", "--out", str(tmp_path / "o"),
                 "--fp32-from-zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a DeepSpeed ZeRO 1-3 checkpoint" in err
