"""data.aug (open_clip's AugmentationCfg), model.image_* preprocessing and model.force_* (issue #15 h)."""
import random

import numpy as np
import pytest
import torch
from open_clip.transform import AugmentationCfg, image_transform
from PIL import Image

from vlp.config import load_config
from vlp.models import build_transforms, create_model
from vlp.models.factory import open_clip_model_cfg

TINY = ["model.embed_dim=16", "model.image.image_size=32", "model.image.patch_size=8", "model.image.width=32",
        "model.image.layers=1", "model.image.head_width=16", "model.text.width=32", "model.text.heads=2",
        "model.text.layers=1", "model.text.context_length=8", "model.text.vocab_size=64"]
AUG = ["data.aug.scale=[0.5,1.0]", "data.aug.color_jitter=[0.4,0.4,0.4,0.1]",
       "data.aug.color_jitter_prob=0.8", "data.aug.gray_scale_prob=0.3"]


def _image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))


def _seeded(transform, image, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return transform(image)


@pytest.mark.parametrize("timm", [False, True])
def test_train_transform_is_open_clips(timm):
    # ratio, re_prob and re_count are timm's (open_clip warns that torchvision's transform ignores them)
    extra = ["data.aug.use_timm=true", "data.aug.ratio=[0.8,1.25]", "data.aug.re_prob=0.5",
             "data.aug.re_count=2"] if timm else []
    pre = ["model.image_mean=[0.5,0.5,0.5]", "model.image_std=[0.25,0.25,0.25]", "model.image_interpolation=bilinear",
           "model.image_resize_mode=squash"]
    cfg = load_config("configs/quickstart/clip_digits.yaml", TINY + AUG + extra + pre)
    model = create_model(cfg.model)
    train, _ = build_transforms(cfg.model, model)  # open_clip's default augmentation
    ours, _ = build_transforms(cfg.model, model, aug=cfg.data.aug)
    aug = AugmentationCfg(scale=(0.5, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8,
                          gray_scale_prob=0.3, **(dict(use_timm=True, ratio=(0.8, 1.25), re_prob=0.5, re_count=2)
                                                  if timm else {}))
    theirs = image_transform(32, True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize_mode="squash",
                             interpolation="bilinear", aug_cfg=aug)
    assert [type(t).__name__ for t in ours.transform.transforms] == [type(t).__name__ for t in theirs.transforms]
    image = _image()
    for seed in range(3):
        a, b = _seeded(ours, image, seed), _seeded(theirs, image, seed)
        assert a.shape == (3, 32, 32) and torch.equal(a, b)
    # the augmentation does something: the default AugmentationCfg gives another image
    assert not torch.equal(_seeded(train, image, 0), _seeded(ours, image, 0))


@pytest.mark.parametrize("extra", [[], AUG, ["data.aug.use_timm=true", "data.aug.re_prob=0.5"]])
def test_split_train_transform_gives_the_same_batch(extra, tmp_path):
    """Training batches made per sample as uint8 and normalized per batch (TrainTransform.split, what the
    trainer uses) equal those of the whole transform per sample, bit for bit; timm's pipeline (random
    erasing after the normalization) is not split."""
    from tests.test_data_resume import TOKENIZER, _write
    from vlp.data.config import DataConfig
    from vlp.data.stream import TrainData

    cfg = load_config("configs/quickstart/clip_digits.yaml", TINY + extra)
    transform, _ = build_transforms(cfg.model, create_model(cfg.model), aug=cfg.data.aug)
    if "data.aug.use_timm=true" in extra:
        assert transform.split() == (transform.transform, None)  # not split: the whole transform per sample
        return
    per_sample, per_batch = transform.split()
    _write(tmp_path, n_shards=2, per_shard=24)
    data_cfg = DataConfig(batch_size=8, workers=2, shuffle_buffer=4)
    batches = []
    for kwargs in ({"image_transform": transform}, {"image_transform": per_sample, "batch_transform": per_batch}):
        data = TrainData(tmp_path, data_cfg, tokenizer=TOKENIZER, rank=0, world_size=1, seed=3, **kwargs)
        batches.append([data.next() for _ in range(3)])
        data.close()
    for whole, split in zip(*batches):
        assert whole["image"].dtype == split["image"].dtype == torch.float32 and whole["image"].shape[0] == 8
        assert whole["key"] == split["key"] and torch.equal(whole["image"], split["image"])
    assert per_sample(_image()).dtype == torch.uint8


def test_force_keys_reach_the_model():
    cfg = load_config("configs/quickstart/clip_digits.yaml", [
        "model.open_clip=ViT-B-32", "model.force_image_size=64", "model.force_context_length=16",
        "model.force_patch_dropout=0.5", "model.force_quick_gelu=true"])
    with torch.device("meta"):
        model = create_model(cfg.model)
    assert model.visual.positional_embedding.shape[0] == 1 + (64 // 32) ** 2
    assert model.text.positional_embedding.shape[0] == 16 and model.context_length == 16
    assert model.visual.patch_dropout.prob == 0.5
    assert open_clip_model_cfg(cfg.model)["quick_gelu"] is True
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


@pytest.mark.parametrize("override, key", [
    ("data.aug.foo=1", "data.aug.foo"), ("data.aug.gray_scale_prob=2", "data.aug.gray_scale_prob"),
    ("data.aug.scale=[0,2]", "data.aug.scale"), ("data.aug.color_jitter_prob=0.5", "data.aug.color_jitter"),
    ("model.image_resize_mode=crop", "model.image_resize_mode"),
    ("model.force_image_size=64", "model.force_image_size"),  # own towers: not a named architecture
])
def test_bad_aug_and_preprocess_keys(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as e:
        load_config("configs/quickstart/clip_digits.yaml", [override])
    assert "\n" not in str(e.value)


def test_the_trainer_streams_data_aug(tmp_path):
    from tests.helpers import noise_png
    from vlp.data.shards import write_shards
    from vlp.train import Trainer

    write_shards(tmp_path / "train", ({"__key__": f"s{i}", "png": noise_png(i), "txt": "x"} for i in range(4)), 4)
    cfg = load_config("configs/quickstart/clip_digits.yaml", TINY + AUG + [
        f"data.train={tmp_path / 'train'}", "data.val=null", "data.workers=0", f"run.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    try:
        assert trainer.train_transform.aug == cfg.data.aug
        # the stream applies its two parts: uint8 per sample, normalized per batch (same values)
        assert trainer.data.stream.image_transform == trainer.train_transform.split()[0]
        assert trainer.data.stream.batch_transform == trainer.train_transform.split()[1] is not None
    finally:
        trainer.data.close()
