"""The training/eval stream: shards -> split by rank and worker -> samples -> batch dicts.

Built from webdataset stages (shard lists, ``tarfile_samples``, ``shuffle``, ``decode``,
``map``, ``batched``, ``RandomMix``); what is ours is the splitting policy, the seeding and
the skip accounting. A batch dict (B: batch size, L: tokenizer context length)::

    image      float (B, 3, H, W)  image_transform(PIL image, RGB); absent when cfg.image_key is null
    audio      float (B, 1, M, T)  log-mel features (vlp.data.audio), when cfg.audio_key is set
    text       long  (B, L)        tokenizer([caption])[0]
    label      long  (B,)          the cfg.label_key field, -1 where a sample has none
    caption    list[str]           length B
    key        list[str]           length B, the samples' __key__
    ...                            fields added by registered STREAM_STAGES (MLCD's cluster_ids and
                                   cluster_sims, ``vlp/data/clusters.py``)
    n_skipped  int                 samples this worker skipped since its previous batch

Modes:

- one pass (default, and always for eval): shards are shuffled by (seed, epoch) in train
  mode, identically on every rank, then dealt to ranks and, within a rank, to DataLoader
  workers, so R ranks x W workers see each sample of the epoch exactly once. Train drops
  each worker's last partial batch; eval keeps it. Call ``build_loader`` again with
  ``epoch + 1`` for the next epoch.
- resampled (``cfg.resampled``, train only): each worker draws shards with replacement,
  seeded by (seed, epoch, source, rank, worker); the stream never ends. With
  ``cfg.train_weights`` the list entries of ``spec`` are sources mixed sample by sample
  in those proportions; without, all shards of all entries are drawn uniformly.

Skip accounting: every webdataset stage gets the same ``SkipCounter`` as its exception
handler, so a sample that fails (undecodable image or audio, a missing field, a transform
or tokenizer error) is dropped and counted instead of ending the stream; a shard that
cannot be opened or is truncated counts once (see ``vlp.data.shards.read_shards``). The
collate step moves the worker's count into the batch, so summing ``n_skipped`` over all
batches of all ranks gives the total, which equals ``verify(spec)["corrupt"]`` over an
eval pass (webdataset collates a batch only when the next sample or the end arrives, so
a worker's trailing skips land in its last batch). They go unreported only where a
worker emits no last batch: train mode's dropped partial batch, a worker with no good sample.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import signal
from functools import partial
from typing import Any, Callable, Dict, List, Optional

import torch
import webdataset as wds
from torch.utils.data import DataLoader
from webdataset.utils import make_seed

from vlp.data.audio import AudioTransform
from vlp.data.config import DataConfig
from vlp.data.shards import describe, expand_spec, get_field, read_shards
from vlp.registry import Registry

log = logging.getLogger(__name__)

# Per-sample stages a method adds after decoding (e.g. MLCD's cluster-label join, vlp/data/clusters.py):
# builder(cfg: DataConfig, handler: SkipCounter, train: bool) -> a webdataset stage, or None when off.
# A stage's failures go to ``handler`` (skipped and counted like any bad sample).
STREAM_STAGES: Registry = Registry("stream stage")


class SkipCounter:
    """A webdataset exception handler that skips the failing sample and counts it.

    The pipeline, and so this object, is copied into each DataLoader worker: the count
    is per worker, and ``take`` (called when a batch is collated) reads and resets it.
    """

    def __init__(self) -> None:
        self.count = 0
        self.seen = 0  # this worker's total, so only its first skip is a warning

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        self.seen += 1
        log.log(logging.WARNING if self.seen == 1 else logging.DEBUG, "skipping: %s", describe(exn))
        return True  # webdataset: continue with the next sample

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def build_loader(
    spec: Any,
    cfg: DataConfig,
    *,
    image_transform: Optional[Callable[[Any], torch.Tensor]],
    tokenizer: Callable[[List[str]], torch.Tensor],
    rank: int,
    world_size: int,
    train: bool,
    epoch: int = 0,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of batch dicts (module docstring) over the shards ``spec`` names."""
    _check_args(cfg, rank, world_size)
    counter = SkipCounter()
    if train and cfg.resampled:
        source, workers = _resampled_source(spec, cfg.train_weights, counter, rank, epoch, seed), cfg.workers
    else:
        if cfg.train_weights is not None and train:
            log.warning("data.train_weights is ignored without data.resampled")
        shards = _rank_shards(spec, rank, world_size, order_seed=make_seed(seed, epoch) if train else None,
                              train=train)
        source = [wds.SimpleShardList(shards), wds.split_by_worker, partial(read_shards, handler=counter)]
        workers = min(cfg.workers, len(shards))  # a worker without a shard would idle
    shuffle = train and cfg.shuffle_buffer > 0
    pipeline = wds.DataPipeline(
        *source,
        partial(_shuffle, bufsize=cfg.shuffle_buffer, seed=(seed, epoch, rank)) if shuffle else None,
        wds.decode("pil", handler=counter),
        wds.map(partial(_to_sample, cfg=cfg, image_transform=image_transform, tokenizer=tokenizer,
                        audio_transform=AudioTransform(cfg.audio, train) if cfg.audio_key else None),
                handler=counter),
        *(build(cfg, counter, train) for build in STREAM_STAGES.builders()),  # None when a stage is off
        wds.batched(cfg.batch_size, collation_fn=partial(_collate, counter=counter), partial=not train),
    )
    return DataLoader(
        pipeline,
        batch_size=None,  # the pipeline batches
        num_workers=workers,
        # Seeds each worker's torch and python RNGs (augmentations, RandomMix) from (seed, epoch, rank).
        generator=torch.Generator().manual_seed(make_seed(seed, epoch, rank)),
        worker_init_fn=_ignore_preemption,
        pin_memory=torch.cuda.is_available(),
    )


def _ignore_preemption(worker_id: int) -> None:
    """A preemption signal sent to the whole job (SLURM --signal) must not kill the workers: the
    trainer finishes its step and saves (vlp/train.py, Preemption); workers end with it."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_eval_loader(
    spec: Any,
    cfg: DataConfig,
    image_transform: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[List[str]], torch.Tensor],
    batch_size: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """One ordered pass over this rank's share of ``spec`` (every shard by default), last
    partial batch kept: over ``world_size`` ranks every sample is read exactly once."""
    if batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    return build_loader(
        spec, cfg, image_transform=image_transform, tokenizer=tokenizer, rank=rank, world_size=world_size,
        train=False,
    )


def _check_args(cfg: DataConfig, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.workers < 0:
        raise ValueError(f"data.workers must be >= 0, got {cfg.workers}")


def _rank_shards(spec: Any, rank: int, world_size: int, order_seed: Optional[int], train: bool = True) -> List[str]:
    """This rank's shards: every rank permutes the same list the same way, then takes every
    ``world_size``-th, so the ranks' shares partition the shards. An eval pass may leave a rank
    without shards (it then yields nothing); a training stream may not."""
    urls = expand_spec(spec)
    if len(urls) < world_size and train:
        raise ValueError(f"{len(urls)} shards cannot feed {world_size} ranks; write more shards")
    if order_seed is not None:
        random.Random(order_seed).shuffle(urls)
    if len(urls) % world_size and rank == 0 and train:
        log.warning("%d shards do not divide among %d ranks: their batch counts differ", len(urls), world_size)
    return urls[rank::world_size]


def _resampled_source(
    spec: Any, weights: Optional[List[float]], counter: SkipCounter, rank: int, epoch: int, seed: int
) -> list:
    """Pipeline stages yielding raw samples forever, from one source or a weighted mix."""
    sources = [expand_spec(spec)] if weights is None else _weighted_sources(spec, weights)

    def draw(i: int, urls: List[str]) -> wds.DataPipeline:
        shards = wds.ResampledShards(
            urls, seed=make_seed(seed, epoch, i), worker_seed=partial(_worker_seed, rank), deterministic=True
        )
        return wds.DataPipeline(shards, partial(read_shards, handler=counter))

    if len(sources) == 1:
        return [draw(0, sources[0])]
    return [wds.RandomMix([draw(i, urls) for i, urls in enumerate(sources)], probs=list(weights))]


def _weighted_sources(spec: Any, weights: List[float]) -> List[List[str]]:
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if len(weights) != len(specs):
        raise ValueError(f"data.train_weights has {len(weights)} entries but the shard spec has {len(specs)} sources")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.train_weights must be >= 0 with a positive sum, got {list(weights)}")
    return [expand_spec(s) for s in specs]


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def _worker_seed(rank: int) -> int:
    # webdataset's default reads the rank from the environment; ours is passed in.
    return make_seed(rank, _worker_id())


def _shuffle(samples, bufsize: int, seed: tuple):
    """webdataset's buffer shuffle, seeded per worker (a seed fixed in the main process
    would give every worker the same permutation)."""
    return wds.shuffle(bufsize, initial=bufsize, seed=make_seed(*seed, _worker_id()))(samples)


def _to_sample(sample: Dict[str, Any], cfg: DataConfig, image_transform: Optional[Callable], tokenizer: Callable,
               audio_transform: Optional[Callable] = None) -> dict:
    # A missing field raises ValueError, which the map stage's handler counts as a skip;
    # so does undecodable audio (decoded here, not by webdataset).
    out = {}
    if cfg.image_key:
        out["image"] = image_transform(get_field(sample, cfg.image_key, "image"))  # (3, H, W)
    if audio_transform is not None:
        out["audio"] = audio_transform(get_field(sample, cfg.audio_key, "audio"))  # (1, M, T)
    caption = get_field(sample, cfg.text_key, "caption")
    label = wds.getfirst(sample, cfg.label_key, default=-1, missing_is_error=False) if cfg.label_key else -1
    return {
        **out,
        "text": tokenizer([caption])[0],  # (L,)
        "label": int(label),
        "caption": caption,
        "key": sample["__key__"],
    }


def _collate(samples: List[Dict[str, Any]], counter: SkipCounter) -> Dict[str, Any]:
    """Stack per-sample fields: tensors -> (B, ...), ints/floats -> (B,), anything else
    (captions, keys) -> a list. New fields a sample builder adds need no change here."""
    batch: Dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [s[key] for s in samples]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, (bool, int)):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    batch["n_skipped"] = counter.take()
    return batch
