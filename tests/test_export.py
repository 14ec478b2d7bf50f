"""Export round-trips: what `vlp export` writes loads in open_clip (and back in vlp) unchanged."""
import json
import os
import uuid

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.helpers import TAG, make_tiny_run
from vlp.cli import main
from vlp.engine.checkpoint import load_model_from_run
from vlp.export import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, export, export_open_clip

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
