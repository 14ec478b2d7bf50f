"""CPU time per sample of a recipe's training stream (read, decode, augment, tokenize), in-process
(workers=0), with a cProfile of where it goes: the data side of `vlp bench e2e`'s overhead.

    python tools/profile_stream.py configs/quickstart/clip_digits.yaml data/digits/train [--batches 4]
"""
import argparse
import cProfile
import pstats
import time

from vlp.config import load_config
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
    per_sample, per_batch = transform.split() or (transform, None)  # as the trainer streams it
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


if __name__ == "__main__":
    main()
