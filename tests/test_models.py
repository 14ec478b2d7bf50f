"""Every registered tower builds and embeds; open_clip names and local checkpoints initialise."""
import json

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F

from tests.tiny import tiny_batch, tiny_model_cfg
from vlp.models import ModelConfig, create_model
from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def test_registries_list_towers():
    assert IMAGE_TOWERS.list() == ["open_clip", "timm"] and TEXT_TOWERS.list() == ["hf", "open_clip"]


@pytest.mark.parametrize("image", [
    {"name": "open_clip", "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    {"name": "timm", "model_name": "test_vit", "image_size": 16, "drop_path": 0.1},
    {"name": "timm", "model_name": "test_resnet", "image_size": 16},
])
def test_image_towers(image):
    cfg = tiny_model_cfg(image=image)
    model = create_model(cfg).eval()
    out = model(tiny_batch(3, cfg))
    assert out["image"].shape == (3, 16) and out["text"].shape == (3, 16)
    assert torch.allclose(out["image"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out["logit_scale"].shape == (1,)


@pytest.mark.parametrize("image,timm_kwargs", [
    # open_clip's TimmModel builds the ViT with its default (token) pooling, then resets the
    # classifier to avg: the final norm stays before the pooling (fc_norm=False)
    ({"model_name": "test_vit"}, {"num_classes": 0, "global_pool": "avg", "fc_norm": False}),
    ({"model_name": "test_vit", "drop_path": 0.1, "pool": "token"}, {"num_classes": 0, "global_pool": "token"}),
    ({"model_name": "test_resnet"}, {"num_classes": 0, "global_pool": "avg"}),
    ({"model_name": "test_resnet", "proj_bias": True}, {"num_classes": 0, "global_pool": "avg"}),
], ids=["vit", "vit-token-drop-path", "resnet", "resnet-proj-bias"])
def test_timm_tower_is_timm_model_with_same_weights(image, timm_kwargs):
    """A timm image tower is timm.create_model(name) plus a linear projection: a model timm
    builds on its own, given the tower's trunk weights (strict), then the projection written
    out, embeds the same images to the same features (eval mode: drop path off)."""
    cfg = tiny_model_cfg(image={"name": "timm", "image_size": 16, **image})
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    ref = timm.create_model(image["model_name"], **timm_kwargs).eval()
    ref.load_state_dict(model.visual.trunk.state_dict(), strict=True)
    if "drop_path" in image:  # timm's stochastic depth, rising to the rate in the last block
        assert model.visual.trunk.blocks[-1].drop_path1.drop_prob == pytest.approx(image["drop_path"])
    head = dict(model.visual.head.named_parameters())
    assert sorted(head) == (["proj.bias", "proj.weight"] if image.get("proj_bias") else ["proj.weight"])
    if "proj.bias" in head:
        with torch.no_grad():
            head["proj.bias"].normal_()  # zero-initialised: give it values that show
    batch = tiny_batch(3, cfg)
    with torch.no_grad():
        pooled = ref(batch["image"])  # (3, C)
        want = pooled @ head["proj.weight"].T + (head["proj.bias"] if "proj.bias" in head else 0)  # (3, 16)
        got = model.encode_image(batch["image"])
        out = model(batch)
    assert pooled.shape == (3, ref.num_features) and float(want.std()) > 1e-2  # features that tell images apart
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["image"], F.normalize(want, dim=-1), rtol=1e-5, atol=1e-6)


def _register_tiny(tmp_path):
    path = tmp_path / "vlp-tiny-test.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(path))
    return "vlp-tiny-test"


def test_init_from_open_clip_name_and_local_checkpoint(tmp_path):
    name = _register_tiny(tmp_path)
    torch.manual_seed(1)
    ref = open_clip.create_model(name).eval()  # open_clip's CLIP layout (not custom-text)
    with torch.no_grad():
        ref.logit_scale.fill_(3.0)
    ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": ref.state_dict()}, ckpt)
    torch.manual_seed(2)  # different init: equality below comes from the checkpoint
    ours = create_model(ModelConfig(open_clip=name, pretrained=str(ckpt))).eval()
    batch = tiny_batch(4, tiny_model_cfg())
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(batch["image"]), ref.encode_image(batch["image"]), atol=1e-6)
        assert torch.allclose(ours.encode_text(batch["text"]), ref.encode_text(batch["text"]), atol=1e-6)
    assert float(ours.logit_scale.detach()) == 3.0


def test_unknown_open_clip_name_and_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_model(ModelConfig(open_clip="no-such-model"))
    name = _register_tiny(tmp_path)
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        create_model(ModelConfig(open_clip=name, pretrained="nope"))
    with pytest.raises(FileNotFoundError):
        create_model(tiny_model_cfg(pretrained=str(tmp_path / "missing.pt")))
