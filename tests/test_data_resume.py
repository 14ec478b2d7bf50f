"""The training stream resumes exactly (vlp/data/stream.py, TrainStream): from a saved DataPosition
it yields the same batches, images bit for bit, as the uninterrupted stream; in one-pass and
resampled mode, across epoch ends, with 2 workers and the shuffle buffer on. Fast-forward reads the
samples before the position without decoding them. On another number of ranks, no sample of the
interrupted epoch is read twice."""
import io
import time

import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms

from vlp.data.config import DataConfig
from vlp.data.shards import write_shards
from vlp.data.stream import TrainData

TOKENIZER = open_clip.tokenizer.SimpleTokenizer(context_length=8)


class Augment:
    """A random crop (draws from torch's global RNG, as timm / open_clip transforms do); counts its calls
    when it runs in this process."""

    def __init__(self):
        self.calls = 0
        self.crop = transforms.Compose([transforms.RandomResizedCrop(6, scale=(0.3, 1.0)), transforms.ToTensor()])

    def __call__(self, image):
        self.calls += 1
        return self.crop(image)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (8, 8), bytes((i * 7 + j) % 256 for j in range(192))).save(buf, format="PNG")
    return buf.getvalue()


def _write(folder, n_shards: int, per_shard: int) -> set:
    keys = [f"s{i:05d}" for i in range(n_shards * per_shard)]
    write_shards(folder, ({"__key__": k, "png": _png(i), "txt": f"caption {i}", "cls": i % 10}
                          for i, k in enumerate(keys)), shard_size=per_shard)
    return set(keys)


def _data(spec, rank=0, world_size=1, resume=None, transform=None, **cfg) -> TrainData:
    cfg = DataConfig(**{"batch_size": 4, "workers": 2, "shuffle_buffer": 16, **cfg})
    return TrainData(spec, cfg, image_transform=transform or Augment(), tokenizer=TOKENIZER, rank=rank,
                     world_size=world_size, seed=3, resume=resume)


def _read(data: TrainData, n: int, epochs: int = 99) -> list:
    """``n`` batches as a trainer reads them (consumed; the next epoch when one ends)."""
    out = []
    while len(out) < n and data.epoch < epochs:
        batch = data.next()
        if batch is None:
            data.next_epoch()
            continue
        data.consume(batch)
        out.append(batch)
    return out


def _same(a: list, b: list) -> None:
    assert [x["key"] for x in a] == [y["key"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])  # the augmentation too


@pytest.mark.parametrize("mode, stop", [("epoch", 3), ("epoch", 8), ("epoch", 13), ("resampled", 7), ("resampled", 11)])
def test_resume_yields_the_uninterrupted_batches(tmp_path, mode, stop):
    # one-pass: 5 shards of 10 -> 2 roles of 30 and 20 samples -> 7 + 5 batches of 4 = 12 per epoch;
    # resampled: 48 samples per epoch -> 2 roles x 6 batches = 12. Stops fall mid-epoch, on role 1's
    # turn (the DataLoader's round-robin must go on with it), and after an epoch end.
    _write(tmp_path, n_shards=5, per_shard=10)
    opts = {"resampled": True, "epoch_samples": 48} if mode == "resampled" else {}
    straight = _read(_data(tmp_path, **opts), 20)
    first = _data(tmp_path, **opts)
    head = _read(first, stop)
    resumed = _data(tmp_path, resume=[first.state()], **opts)
    _same(head + _read(resumed, 20 - stop), straight)
    if mode == "epoch":  # an epoch: every sample once, but the 2 dropped from role 1's partial batch
        assert len({k for b in straight[:12] for k in b["key"]}) == 48


def test_fast_forward_does_not_decode(tmp_path):
    _write(tmp_path, n_shards=2, per_shard=50)
    first = _data(tmp_path, workers=0)
    _read(first, 20)  # 80 samples in
    augment = Augment()
    resumed = _data(tmp_path, workers=0, resume=[first.state()], transform=augment)
    batch = resumed.next()
    assert augment.calls == 4 and len(batch["key"]) == 4  # the 80 samples before the position were not decoded


def test_resume_on_fewer_ranks_reads_no_sample_twice(tmp_path):
    everything = _write(tmp_path, n_shards=8, per_shard=10)  # 2 ranks x 2 roles x 2 shards
    ranks = [_data(tmp_path, rank=r, world_size=2) for r in range(2)]
    seen = [k for r, d in enumerate(ranks) for b in _read(d, 3 + r) for k in b["key"]]  # ranks stop apart
    one = _data(tmp_path, world_size=1, resume=[d.state() for d in ranks])
    assert one.epoch == 0
    rest = [k for b in _read(one, 99, epochs=1) for k in b["key"]]
    assert len(seen + rest) == len(set(seen + rest))  # no sample of the interrupted epoch twice
    # and none lost but what a worker's last partial batch drops (2 roles x 4 unfinished streams chained)
    assert len(everything - set(seen + rest)) < 2 * 4
    assert one.epoch == 1 and tuple(one.position.layout) == (1, 2)  # the next epoch: the new layout


def test_position_survives_a_second_resume_on_another_layout(tmp_path):
    everything = _write(tmp_path, n_shards=8, per_shard=10)
    ranks = [_data(tmp_path, rank=r, world_size=2) for r in range(2)]
    seen = [k for d in ranks for b in _read(d, 3) for k in b["key"]]
    one = _data(tmp_path, world_size=1, workers=1, resume=[d.state() for d in ranks])
    seen += [k for b in _read(one, 6) for k in b["key"]]
    again = _data(tmp_path, world_size=1, workers=2, resume=[one.state()])
    seen += [k for b in _read(again, 99, epochs=1) for k in b["key"]]
    assert len(seen) == len(set(seen)) and len(everything - set(seen)) < 2 * 4


@pytest.mark.slow
def test_fast_forward_of_10000_samples_is_faster_than_reading_them(tmp_path):
    _write(tmp_path, n_shards=10, per_shard=1000)
    cfg = {"workers": 0, "batch_size": 100, "shuffle_buffer": 1000}
    first = _data(tmp_path, **cfg)
    t0 = time.perf_counter()
    _read(first, 100)  # 10,000 samples, decoded and augmented
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _data(tmp_path, resume=[first.state()], **cfg).next()  # fast-forward 10,000, then one batch
    forward_s = time.perf_counter() - t0
    print(f"10,000 samples: read {read_s:.2f} s, fast-forward + 1 batch {forward_s:.2f} s")
    assert forward_s < 0.5 * read_s
