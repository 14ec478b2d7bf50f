"""The training/eval stream: exact epoch coverage across ranks x workers, seeding, skip
accounting (agreeing with ``verify``), resampled mixing."""
import io
import tarfile
from collections import Counter

import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import ToTensor

from vlp.data.config import DataConfig
from vlp.data.shards import verify, write_shards
from vlp.data.stream import build_eval_loader, build_loader

TOKENIZER = open_clip.tokenizer.SimpleTokenizer(context_length=16)
TRANSFORM = ToTensor()  # 8x8 PIL -> (3, 8, 8)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key: str, label: int = 0) -> dict:
    return {"__key__": key, "png": _png(label), "txt": f"caption of {key}", "cls": label}


def _write(folder, n_shards: int, per_shard: int, prefix: str = "s", label: int = 0):
    samples = (_sample(f"{prefix}{i:04d}", label) for i in range(n_shards * per_shard))
    write_shards(folder, samples, shard_size=per_shard)
    return {f"{prefix}{i:04d}" for i in range(n_shards * per_shard)}


def _loader(spec, train, rank=0, world_size=1, epoch=0, **cfg):
    cfg = DataConfig(**{"batch_size": 4, "workers": 0, "shuffle_buffer": 16, **cfg})
    return build_loader(
        spec, cfg, image_transform=TRANSFORM, tokenizer=TOKENIZER, rank=rank, world_size=world_size, train=train,
        epoch=epoch,
    )


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


@pytest.mark.parametrize("train, batch_size", [(True, 4), (False, 5)])
def test_epoch_covers_every_sample_once_across_ranks_and_workers(tmp_path, train, batch_size):
    # 6 shards x 8: each of 2 ranks gets 3 shards, its 2 workers 2 and 1 (16 and 8 samples),
    # multiples of 4, so train mode's dropped partial batches drop nothing; eval keeps them.
    everything = _write(tmp_path, n_shards=6, per_shard=8)
    seen = []
    for rank in range(2):
        loader = _loader(tmp_path, train, rank=rank, world_size=2, workers=2, batch_size=batch_size)
        assert loader.num_workers == 2
        seen += _keys(loader)
    assert len(seen) == len(set(seen))  # no duplicates
    assert set(seen) == everything  # none missing


def test_batch_fields(tmp_path):
    _write(tmp_path, n_shards=1, per_shard=6, label=3)
    batches = list(_loader(tmp_path, train=False))
    assert [len(b["key"]) for b in batches] == [4, 2]  # eval keeps the partial batch
    b = batches[0]
    assert b["image"].shape == (4, 3, 8, 8) and b["image"].dtype == torch.float32
    assert b["text"].shape == (4, 16) and b["text"].dtype == torch.long
    assert torch.equal(b["text"][0], TOKENIZER([b["caption"][0]])[0])
    assert b["label"].tolist() == [3] * 4
    assert b["caption"][0] == f"caption of {b['key'][0]}"
    assert b["n_skipped"] == 0
    assert list(_loader(tmp_path, train=False, label_key=""))[0]["label"].tolist() == [-1] * 4


def test_eval_order_is_shard_order(tmp_path):
    _write(tmp_path, n_shards=3, per_shard=5)
    assert _keys(_loader(tmp_path, train=False, batch_size=3)) == [f"s{i:04d}" for i in range(15)]


def test_train_order_is_seeded_by_epoch(tmp_path):
    _write(tmp_path, n_shards=4, per_shard=8)
    first, again, other = (_keys(_loader(tmp_path, train=True, workers=2, epoch=e)) for e in (0, 0, 1))
    assert first == again  # reproducible (shard order, per-worker sample shuffle)
    assert first != other and sorted(first) == sorted(other)
    assert first != sorted(first)  # shuffled within the epoch


def test_sample_shuffle_differs_between_workers(tmp_path):
    _write(tmp_path, n_shards=2, per_shard=16)  # one shard per worker, one batch each
    first, second = (b["key"] for b in _loader(tmp_path, train=True, workers=2, batch_size=16))
    positions = [[int(k[1:]) % 16 for k in keys] for keys in (first, second)]
    assert positions[0] != positions[1]  # a seed shared by workers would repeat the permutation


def test_train_drops_partial_batches(tmp_path):
    _write(tmp_path, n_shards=1, per_shard=10)
    assert [len(b["key"]) for b in _loader(tmp_path, train=True)] == [4, 4]


def test_shard_count_limits(tmp_path):
    _write(tmp_path, n_shards=2, per_shard=2)
    with pytest.raises(ValueError, match="2 shards cannot feed 3 ranks"):
        _loader(tmp_path, train=True, world_size=3)
    assert _loader(tmp_path, train=True, workers=8).num_workers == 2  # one shard per worker at most


def _truncate(path, key: str, where: str) -> None:
    """Cut ``path`` inside ``key``'s png: 10 bytes into its data, or inside its tar header."""
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{key}.png")
    cut = member.offset_data + 10 if where == "data" else member.offset + 100
    data = open(path, "rb").read()
    open(path, "wb").write(data[:cut])


@pytest.fixture(params=["data", "header"])
def damaged(tmp_path, request):
    """Three shards, 12 good samples and 3 things the stream must skip. Returns the spec,
    the good keys and the keys ``verify`` reports as corrupt (None: a damaged shard)."""
    good = {f"a{i}" for i in range(5)}
    write_shards(tmp_path / "a", (_sample(k) for k in sorted(good)), shard_size=100)
    bad_image = {**_sample("b_bad_png"), "png": b"these bytes are not a png"}
    no_caption = {k: v for k, v in _sample("b_no_txt").items() if k != "txt"}
    b = [_sample("b0"), bad_image, _sample("b1"), no_caption, _sample("b2"), _sample("b3")]
    write_shards(tmp_path / "b", b, shard_size=100)
    # 5 samples cut inside c3's png; c0..c2 come out and c4 is lost either way. Cut in the
    # data, tarfile raises: the shard counts once, c3 (read last) is dropped with it. Cut in
    # a header, tarfile sees a normal end: c3 comes out without its png and counts once.
    write_shards(tmp_path / "c", (_sample(f"c{i}") for i in range(5)), shard_size=100)
    _truncate(tmp_path / "c/shard-000000.tar", "c3", request.param)
    good |= {"b0", "b1", "b2", "b3", "c0", "c1", "c2"}
    spec = [str(tmp_path / d / "shard-000000.tar") for d in "abc"]
    return spec, good, ["b_bad_png", "b_no_txt", None if request.param == "data" else "c3"]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(damaged, workers):
    spec, good, skipped = damaged
    batches = list(_loader(spec, train=False, workers=workers, batch_size=3))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(good)
    assert sum(b["n_skipped"] for b in batches) == len(skipped)


def test_verify_reports_what_the_stream_skips(damaged):
    spec, good, skipped = damaged
    report = verify(spec)
    assert report["total"] == len(good) and report["corrupt"] == len(skipped)
    assert [s["samples"] for s in report["shards"]] == [5, 4, 3]
    corrupt = [c for s in report["shards"] for c in s["corrupt"]]
    assert [c["key"] for c in corrupt] == skipped
    assert "no caption" in corrupt[1]["error"]
    assert spec[2] in corrupt[2]["error"] if corrupt[2]["key"] is None else "no image" in corrupt[2]["error"]


def test_resampled_mixes_sources_by_weight(tmp_path):
    _write(tmp_path / "a", n_shards=3, per_shard=10, prefix="a", label=0)
    _write(tmp_path / "b", n_shards=2, per_shard=10, prefix="b", label=1)
    spec = [str(tmp_path / "a"), str(tmp_path / "b")]
    loader = _loader(spec, train=True, resampled=True, train_weights=[0.9, 0.1], workers=2, batch_size=20,
                     epoch_samples=600)
    labels = torch.cat([b["label"] for b in loader])  # 600 draws of 50 samples
    assert len(labels) == 600  # an epoch is data.epoch_samples draws, more than exist
    share_a = (labels == 0).float().mean().item()
    assert 0.82 < share_a < 0.97, share_a  # 0.9 expected, sd ~0.012


def test_resampled_without_weights_draws_all_shards(tmp_path):
    everything = _write(tmp_path, n_shards=4, per_shard=5)
    loader = _loader(tmp_path, train=True, resampled=True, batch_size=10, shuffle_buffer=0, epoch_samples=200)
    keys = Counter(k for b in loader for k in b["key"])
    assert sum(keys.values()) == 200 and set(keys) == everything  # 200 draws hit all 20 samples


def test_resampled_epoch_defaults_to_the_samples_the_shards_hold(tmp_path):
    _write(tmp_path, n_shards=3, per_shard=5)
    # open_clip's sizes.json is believed (here it overstates the shards)
    (tmp_path / "sizes.json").write_text('{"shard-000000.tar": 7, "shard-000001.tar": 7, "shard-000002.tar": 7}')
    assert len(_keys(_loader(tmp_path, train=True, resampled=True, batch_size=1))) == 21
    (tmp_path / "sizes.json").unlink()  # counted from the tar headers instead
    assert len(_keys(_loader(tmp_path, train=True, resampled=True, batch_size=1))) == 15


def test_resampled_weights_must_match_sources(tmp_path):
    _write(tmp_path / "a", n_shards=1, per_shard=2)
    with pytest.raises(ValueError, match="train_weights has 2 entries but the shard spec has 1 sources"):
        _loader([str(tmp_path / "a")], train=True, resampled=True, train_weights=[0.5, 0.5])


def test_eval_loader_is_one_ordered_pass(tmp_path):
    _write(tmp_path, n_shards=2, per_shard=3)
    cfg = DataConfig(workers=2, resampled=True)  # resampling never applies to eval
    loader = build_eval_loader(tmp_path, cfg, TRANSFORM, TOKENIZER, batch_size=4)
    assert _keys(loader) == [f"s{i:04d}" for i in range(6)]
