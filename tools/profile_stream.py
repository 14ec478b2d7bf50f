"""CPU time per sample of a recipe's training stream (read, decode, augment, tokenize), in-process
(workers=0), with a cProfile of where it goes: the data side of `vlp bench e2e`'s overhead. Also, per
image, the train transform whole vs split (uint8 per sample + float conversion per batch, as the trainer
streams it) and the per-sample seeding a DataLoader worker does.

    python tools/profile_stream.py configs/quickstart/clip_digits.yaml data/digits/train [--batches 4]
"""
import argparse
import cProfile
import pstats
import time

import torch
import webdataset as wds

from vlp import rng
from vlp.config import load_config
from vlp.data.shards import expand_spec, get_field
from vlp.data.stream import build_loader
from vlp.models import build_tokenizer, build_transforms, create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("train", help="the training shards")
    p.add_argument("--batches", type=int, default=4, help="per measurement (2 x this + 1 must fit one epoch)")
    args = p.parse_args()
    cfg = load_config(args.config, [f"data.train={args.train}", "data.val=null", "data.workers=0"])
    model = create_model(cfg.model)
    transform, _ = build_transforms(cfg.model, model, aug=cfg.data.aug)
    per_sample, per_batch = transform.split()  # as the trainer streams it
    loader = build_loader(cfg.data.train, cfg.data, image_transform=per_sample, batch_transform=per_batch,
                          tokenizer=build_tokenizer(cfg.model, model), rank=0, world_size=1, train=True)
    batches = iter(loader)
    next(batches)  # the shuffle buffer fills on the first batch
    n, start = 0, time.process_time()
    for _ in range(args.batches):
        n += len(next(batches)["image"])
    plain = (time.process_time() - start) / n
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.batches):
        next(batches)
    profile.disable()
    print(f"{plain * 1e3:.2f} ms of CPU per sample over {n} samples (unprofiled)")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    _per_image(transform, cfg, args.train)


def _cpu_us(fn, n: int = 2000) -> float:
    fn()
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e6


def _per_image(transform, cfg, train) -> None:
    """Microseconds of CPU per image: the whole transform vs its split parts; a worker's seeding."""
    sample = next(iter(wds.DataPipeline(wds.SimpleShardList(expand_spec(train)[:1]), wds.tarfile_to_samples(),
                                        wds.decode("pil"))))
    image, b = get_field(sample, cfg.data.image_key, "image"), cfg.data.batch_size
    per_sample, per_batch = transform.split()
    whole = _cpu_us(lambda: transform(image))
    part = _cpu_us(lambda: per_sample(image))
    if per_batch is not None:
        stacked = torch.stack([per_sample(image)] * b)
        part += _cpu_us(lambda: per_batch(stacked), 200) / b
    seed = _cpu_us(lambda: rng.seed_cpu(12345))  # what rng.seeded(..., restore=False) does in a worker
    print(f"train transform per image: whole {whole:.0f} us, split {part:.0f} us (per_batch over {b} images "
          f"{'included' if per_batch is not None else 'n/a: not split'}); a worker's per-sample seeding {seed:.0f} us")


if __name__ == "__main__":
    main()
