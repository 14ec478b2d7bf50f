"""The training/eval stream: shards -> split by rank and worker -> samples -> batch dicts.

Built from webdataset stages (``tarfile_samples``, ``shuffle``, ``decode``, ``map``, ``batched``);
what is ours is the splitting policy, the seeding, the data position and the skip accounting.
A batch dict (B: batch size, L: tokenizer context length)::

    image      float (B, 3, H, W)  image_transform(PIL image, RGB); absent when cfg.image_key is null
    audio      float (B, 1, M, T)  log-mel features (vlp.data.audio), when cfg.audio_key is set
    text       long  (B, L)        tokenizer([caption])[0]
    label      long  (B,)          the cfg.label_key field, -1 where a sample has none
    caption    list[str]           length B
    key        list[str]           length B, the samples' __key__
    ...                            fields added by registered STREAM_STAGES (MLCD's cluster_ids and
                                   cluster_sims, ``vlp/data/clusters.py``)
    n_skipped  int                 samples this worker skipped since its previous batch
    data_position  dict            train only: where the stream is once this batch is consumed

Training (``TrainStream``, driven by ``TrainData``): an epoch's shards are permuted by (seed, epoch),
identically on every rank, dealt to ranks and, within a rank, to roles (DataLoader workers), so
R ranks x W workers read each sample of the epoch exactly once; each worker drops its last
partial batch. Resampled (``cfg.resampled``): each worker draws shards with replacement, seeded by
(seed, epoch, source, rank, worker), for ``data.epoch_samples / (R W)`` samples an epoch; with
``cfg.train_weights`` the list entries of ``spec`` are sources mixed sample by sample in those
proportions, without, all shards of all entries are drawn uniformly. Every sample's augmentation is
seeded by its place in the epoch, and each batch carries the stream position it reaches, so a
checkpoint resumes the data exactly (``TrainStream``). Eval (``build_eval_loader``): one ordered pass
over the rank's shards, the last partial batch kept.

Skip accounting: every webdataset stage gets the same ``SkipCounter`` as its exception
handler, so a sample that fails (undecodable image or audio, a missing field, a transform
or tokenizer error) is dropped and counted instead of ending the stream; a shard that
cannot be opened or is truncated counts once (see ``vlp.data.shards.read_shards``). The
collate step moves the worker's count into the batch, so summing ``n_skipped`` over all
batches of all ranks gives the total, which equals ``verify(spec)["corrupt"]`` over an
eval pass (webdataset collates a batch only when the next sample or the end arrives, so
a worker's trailing skips land in its last batch). They go unreported only where a
worker emits no last batch: train mode's dropped partial batch, a worker with no good sample.
Training batches are emitted with their last sample (their position is then exact): skips after
it count in the next batch.
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import multiprocessing
import os
import random
import signal
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import make_seed

from vlp import rng
from vlp.data.audio import AudioTransform
from vlp.data.config import DataConfig
from vlp.data.shards import describe, expand_spec, get_field, read_shards
from vlp.data.sizes import shard_sizes
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
    caption_optional: bool = False,
    batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> DataLoader:
    """One pass over this rank's share of ``spec``: with ``train``, epoch ``epoch`` of the training
    stream (``TrainStream``; a trainer uses ``TrainData``, which also resumes); else an ordered eval pass
    (``caption_optional``: clip_benchmark's rules, see ``build_eval_loader``; else a sample needs a caption,
    as ``verify`` checks). ``batch_transform``: train only, see ``TrainData``."""
    _check_args(cfg, rank, world_size)
    if train:
        stream = TrainStream(spec, cfg, image_transform=image_transform, tokenizer=tokenizer, rank=rank,
                             world_size=world_size, seed=seed, batch_transform=batch_transform)
        stream.epoch.value = epoch
        return stream.loader(persistent=False)
    counter = SkipCounter()
    shards = _rank_shards(expand_spec(spec), rank, world_size, order_seed=None)
    if not shards:  # more ranks than shards: this rank reads nothing but still joins the evaluators' collectives
        return DataLoader([], batch_size=None)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.split_by_worker,
        partial(read_shards, handler=counter),
        wds.decode("pil", handler=counter),
        wds.map(partial(_to_sample, cfg=cfg, image_transform=image_transform, tokenizer=tokenizer,
                        audio_transform=AudioTransform(cfg.audio, False) if cfg.audio_key else None,
                        caption_optional=caption_optional),
                handler=counter),
        *(build(cfg, counter, False) for build in STREAM_STAGES.builders()),  # None when a stage is off
        wds.batched(cfg.batch_size, collation_fn=partial(_collate, counter=counter), partial=True),
    )
    return DataLoader(
        pipeline,
        batch_size=None,  # the pipeline batches
        num_workers=min(cfg.workers, len(shards)),  # a worker without a shard would idle
        worker_init_fn=partial(_init_worker, niceness=cfg.worker_niceness),
        pin_memory=torch.cuda.is_available(),
    )


def _init_worker(worker_id: int, niceness: int = 0) -> None:
    """A DataLoader worker's start. A preemption signal sent to the whole job (SLURM --signal) must
    not kill the workers: the trainer finishes its step and saves (vlp/train.py, Preemption); workers
    end with it. ``niceness`` (``data.worker_niceness``) lowers the worker's CPU priority: where
    decoding and the trainer's threads want more cores than there are, the step (the critical path)
    is not preempted by a worker, and workers still take every idle cycle."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if niceness:
        os.nice(niceness)


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
    partial batch kept: over ``world_size`` ranks every sample is read exactly once.

    Eval samples read clip_benchmark's layouts (``_to_sample``): a labelled sample without a
    caption is kept (caption ``""``), and ``captions`` (a list per sample) holds the lines of
    its caption field, one caption per line (``text`` and ``caption``: the first)."""
    if batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    return build_loader(
        spec, cfg, image_transform=image_transform, tokenizer=tokenizer, rank=rank, world_size=world_size,
        train=False, caption_optional=True,
    )


def _check_args(cfg: DataConfig, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.workers < 0:
        raise ValueError(f"data.workers must be >= 0, got {cfg.workers}")


def _rank_shards(urls: List[str], rank: int, world_size: int, order_seed: Optional[int]) -> List[str]:
    """This rank's shards: every rank permutes the same list the same way (by ``order_seed``; None:
    kept in order), then takes every ``world_size``-th, so the ranks' shares partition the shards."""
    urls = list(urls)
    if order_seed is not None:
        random.Random(order_seed).shuffle(urls)
    return urls[rank::world_size]


def _weighted_sources(spec: Any, weights: List[float]) -> List[List[str]]:
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if len(weights) != len(specs):
        raise ValueError(f"data.train_weights has {len(weights)} entries but the shard spec has {len(specs)} sources")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.train_weights must be >= 0 with a positive sum, got {list(weights)}")
    return [expand_spec(s) for s in specs]


def _to_sample(sample: Dict[str, Any], cfg: DataConfig, image_transform: Optional[Callable], tokenizer: Callable,
               audio_transform: Optional[Callable] = None, caption_optional: bool = False) -> dict:
    # A missing field raises ValueError, which the map stage's handler counts as a skip;
    # so does undecodable audio (decoded here, not by webdataset).
    out = {}
    if cfg.image_key:
        out["image"] = image_transform(get_field(sample, cfg.image_key, "image"))  # (3, H, W)
    if audio_transform is not None:
        out["audio"] = audio_transform(get_field(sample, cfg.audio_key, "audio"))  # (1, M, T)
    label = wds.getfirst(sample, cfg.label_key, default=-1, missing_is_error=False) if cfg.label_key else -1
    if caption_optional:
        # clip_benchmark's layouts: a labelled sample needs no caption (classification), and a
        # caption field holds one caption per line (retrieval): ``captions``, ``text`` the first one
        text = wds.getfirst(sample, cfg.text_key, missing_is_error=False)
        if text is None and int(label) < 0:
            get_field(sample, cfg.text_key, "caption")  # raises: neither caption nor label
        out["captions"] = [] if text is None else text.splitlines()
        caption = out["captions"][0] if out["captions"] else ""
    else:
        caption = get_field(sample, cfg.text_key, "caption")
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


# --- the training stream: epochs that stop at any batch and resume there ------------------------------

DONE = -1  # a stream's position once it has been read to its end


@dataclass
class DataPosition:
    """Where one rank is in the training stream; checkpoints hold every rank's (see ``TrainStream``)."""

    epoch: int = 0  # the epoch being read
    layout: Tuple[int, int] = (1, 1)  # (ranks, roles) the epoch's streams were dealt for
    consumed: Dict[str, int] = field(default_factory=dict)  # stream "r/w" -> raw samples consumed; DONE: all
    next_role: int = 0  # the role whose batch this rank takes next (the DataLoader's round-robin)

    @classmethod
    def from_dict(cls, saved: Dict[str, Any]) -> "DataPosition":
        return cls(int(saved["epoch"]), tuple(saved["layout"]), dict(saved["consumed"]), int(saved["next_role"]))


@dataclass
class Plan:
    """What this rank's workers read in one epoch."""

    layout: Tuple[int, int]  # (ranks, roles) the epoch's streams are defined by
    roles: List[List[Tuple[str, int]]]  # per role of this rank: [(stream "r/w", first position)], read in order
    offset: int = 0  # DataLoader worker j plays role (j + offset) % roles
    done: List[str] = field(default_factory=list)  # streams of the epoch read to their end before a resume


class TrainStream(IterableDataset):
    """This rank's training samples, an epoch per pass, resumable at any batch.

    A *stream* is one role's share of an epoch in the layout (R ranks, W roles per rank) the epoch
    began with: stream "r/w" reads the shards of rank r's share (shards permuted by (seed, epoch),
    every R-th) that fall to role w (every W-th), through a sample shuffle buffer seeded by
    (seed, epoch, r, w); in resampled mode it draws ``epoch_samples / (R W)`` samples from shards
    picked with replacement (and mixed by ``data.train_weights``). Its samples are numbered by their
    position in it, and a sample's augmentation is seeded by (seed, epoch, r, w, position): what a
    sample becomes does not depend on the process that makes it or on what that process made before.

    Resuming from the ranks' ``DataPosition`` s (``resume``):

    - same layout: every role continues its stream from the position its last consumed batch
      reached. Fast-forward re-reads the raw samples before it (tar reads and the shuffle buffer,
      no decoding); DataLoader worker j takes role (j + next_role) % W, so the round-robin goes on
      with the role whose batch was next. The batches are those of the uninterrupted run.
    - another layout (other ranks or workers): the epoch's unfinished streams are dealt to this
      run's ranks and roles, each read on from its position: no sample of the interrupted epoch is
      read twice or lost (their order differs). Later epochs use the new layout.

    DataLoader workers may persist across epochs: ``epoch`` is shared memory the trainer sets
    before each pass, read at the start of each worker's pass.
    """

    def __init__(self, spec: Any, cfg: DataConfig, *, image_transform: Optional[Callable], tokenizer: Callable,
                 rank: int, world_size: int, seed: int, resume: Optional[List[DataPosition]] = None,
                 batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        _check_args(cfg, rank, world_size)
        self.cfg, self.rank, self.seed, self.resume = cfg, rank, seed, resume
        self.image_transform, self.tokenizer = image_transform, tokenizer
        self.batch_transform = batch_transform  # the stacked images' last transform (see TrainData)
        self.audio_transform = AudioTransform(cfg.audio, True) if cfg.audio_key else None
        self.epoch = multiprocessing.Value("i", 0)
        if cfg.resampled:
            weights = cfg.train_weights
            self.sources = [expand_spec(spec)] if weights is None else _weighted_sources(spec, weights)
            self.epoch_samples = cfg.epoch_samples or sum(shard_sizes([u for s in self.sources for u in s]))
            roles = max(1, cfg.workers)
            if self.epoch_samples < world_size * roles:
                raise ValueError(f"data.epoch_samples={self.epoch_samples} cannot feed {world_size} ranks x {roles} "
                                 "workers")
        else:
            if cfg.train_weights is not None:
                log.warning("data.train_weights is ignored without data.resampled")
            self.sources = [expand_spec(spec)]
            self.epoch_samples = None
            n = len(self.sources[0])
            if n < world_size:
                raise ValueError(f"{n} shards cannot feed {world_size} ranks; write more shards")
            if n % world_size and rank == 0:
                log.warning("%d shards do not divide among %d ranks: each epoch ends when the rank with the "
                            "fewest samples runs out", n, world_size)
            roles = max(1, min(cfg.workers, len(self.sources[0]) // world_size))  # every role has a shard
        self.layout = (world_size, roles)

    def loader(self, persistent: bool) -> DataLoader:
        workers = self.layout[1] if self.cfg.workers > 0 else 0
        return DataLoader(
            self,
            batch_size=None,  # the stream batches
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            worker_init_fn=partial(_init_worker, niceness=self.cfg.worker_niceness),
            pin_memory=torch.cuda.is_available(),
        )

    # --- which streams this rank reads --------------------------------------------------------------
    def plan(self, epoch: int) -> Plan:
        ranks, roles = self.layout
        saved = self.resume if self.resume and self.resume[0].epoch == epoch else None
        if saved is None:
            return Plan(self.layout, [[(f"{self.rank}/{w}", 0)] for w in range(roles)])
        if len(saved) == ranks and all(tuple(p.layout) == self.layout for p in saved):
            mine = saved[self.rank]
            return Plan(self.layout, [[(key, mine.consumed.get(key, 0))] for key in
                                      (f"{self.rank}/{w}" for w in range(roles))], mine.next_role % roles)
        layout = tuple(saved[0].layout)  # another layout: deal the unfinished streams
        consumed: Dict[str, int] = {}
        for p in saved:
            for key, pos in p.consumed.items():
                old = consumed.get(key, 0)
                consumed[key] = DONE if DONE in (old, pos) else max(old, pos)
        keys = [f"{r}/{w}" for r in range(layout[0]) for w in range(layout[1])]
        done = [k for k in keys if consumed.get(k) == DONE]
        per_role: List[List[Tuple[str, int]]] = [[] for _ in range(roles)]
        for i, key in enumerate(k for k in keys if k not in done):
            j = i % (ranks * roles)
            if j % ranks == self.rank:
                per_role[j // ranks].append((key, consumed.get(key, 0)))
        return Plan(layout, per_role, 0, done)

    # --- one pass -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.epoch.value
        plan = self.plan(epoch)
        info = torch.utils.data.get_worker_info()
        role = 0 if info is None else (info.id + plan.offset) % len(plan.roles)
        counter = SkipCounter()
        samples = self._chain(epoch, plan.layout, plan.roles[role], counter)
        stages = [
            wds.decode("pil", handler=counter),
            wds.map(partial(self._sample, epoch=epoch, restore=info is None), handler=counter),
            *(build(self.cfg, counter, True) for build in STREAM_STAGES.builders()),
        ]
        for stage in stages:
            if stage is not None:  # a stream stage that is off
                samples = stage(samples)
        batch: List[Dict[str, Any]] = []
        for sample in samples:  # a batch is emitted with its last sample: its position is exact
            batch.append(sample)
            if len(batch) == self.cfg.batch_size:
                yield _positioned(batch, counter, role, self.batch_transform)
                batch = []
        # train drops the partial batch

    def _chain(self, epoch: int, layout: Tuple[int, int], streams: List[Tuple[str, int]],
               counter: SkipCounter) -> Iterator[Dict[str, Any]]:
        """Raw samples of ``streams`` one after the other, each from its first position, tagged with
        ``__stream__``, ``__pos__`` and ``__done__`` (streams finished since the previous sample)."""
        finished: List[str] = []
        for key, start in streams:
            if start == DONE:
                continue
            raw = self._stream(epoch, layout, key, counter)
            if start:
                t0, quiet = time.perf_counter(), counter.count
                for _ in itertools.islice(raw, start):  # fast-forward: read, not decoded
                    pass
                counter.count = quiet  # what was skipped there was counted before the resume
                log.info("data: stream %s of epoch %d fast-forwarded %d samples in %.2f s", key, epoch, start,
                         time.perf_counter() - t0)
            for pos, sample in enumerate(raw, start=start):
                sample["__stream__"], sample["__pos__"], sample["__done__"] = key, pos, tuple(finished)
                finished = []
                yield sample
            finished.append(key)

    def _stream(self, epoch: int, layout: Tuple[int, int], key: str, counter: SkipCounter) -> Iterator[dict]:
        """The raw samples of stream ``key`` ("r/w") of ``epoch`` in ``layout`` (class docstring)."""
        (ranks, roles), (r, w) = layout, map(int, key.split("/"))
        if self.cfg.resampled:
            raw = self._draws(epoch, r, w, counter)
        else:
            shards = _rank_shards(self.sources[0], r, ranks, make_seed(self.seed, epoch))[w::roles]
            raw = read_shards(({"url": url} for url in shards), handler=counter)
        if self.cfg.shuffle_buffer > 0:
            size = self.cfg.shuffle_buffer
            raw = wds.shuffle(size, initial=size, seed=make_seed(self.seed, epoch, r, w))(raw)
        if self.cfg.resampled:
            raw = itertools.islice(raw, self.epoch_samples // (ranks * roles))
        return iter(raw)

    def _draws(self, epoch: int, r: int, w: int, counter: SkipCounter) -> Iterator[dict]:
        """Resampled: shards drawn with replacement per source, sources mixed sample by sample."""

        def shards(i: int) -> Iterator[Dict[str, str]]:
            pick = random.Random(make_seed(self.seed, epoch, i, r, w))
            while True:
                yield {"url": pick.choice(self.sources[i])}

        readers = [read_shards(shards(i), handler=counter) for i in range(len(self.sources))]
        if len(readers) == 1:
            yield from readers[0]
            return
        mix, weights = random.Random(make_seed(self.seed, epoch, r, w, len(readers))), list(self.cfg.train_weights)
        while True:
            yield next(readers[mix.choices(range(len(readers)), weights)[0]])

    def _sample(self, sample: Dict[str, Any], epoch: int, restore: bool) -> Dict[str, Any]:
        r, w = map(int, sample["__stream__"].split("/"))
        with rng.seeded(make_seed(self.seed, epoch, r, w, sample["__pos__"]), restore=restore):
            out = _to_sample(sample, self.cfg, self.image_transform, self.tokenizer, self.audio_transform)
        out["_at"] = (sample["__stream__"], sample["__pos__"], sample["__done__"])
        return out


def _close_at_exit(ref: "weakref.ReferenceType[TrainData]") -> None:
    data = ref()
    if data is not None:
        data.close()


def _positioned(samples: List[Dict[str, Any]], counter: SkipCounter, role: int,
                batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, Any]:
    """Collate a training batch (``batch_transform`` on its stacked images) and say where the stream is
    once it is consumed (``data_position``: the role that made it, raw samples consumed per stream,
    streams finished)."""
    consumed: Dict[str, int] = {}
    done: set = set()
    for stream, pos, finished in (s.pop("_at") for s in samples):
        consumed[stream] = pos + 1
        done.update(finished)
    batch = _collate(samples, counter)
    if batch_transform is not None and "image" in batch:
        batch["image"] = batch_transform(batch["image"])
    batch["data_position"] = {"role": role, "consumed": consumed, "done": sorted(done)}
    return batch


class TrainData:
    """A trainer's data: this rank's batches epoch after epoch through one DataLoader (workers persist
    with ``data.persistent_workers``), and the ``DataPosition`` to checkpoint. ``next()`` gives the next
    batch or None at the end of this rank's epoch; ``consume(batch)`` records a batch as trained on;
    ``next_epoch()`` moves on (the trainer decides when, so that every rank takes the same steps).
    ``batch_transform``: applied in the worker to each batch's stacked images after ``image_transform``
    made each sample's (a transform's per-sample and per-batch parts, ``TrainTransform.split``)."""

    def __init__(self, spec: Any, cfg: DataConfig, *, image_transform: Optional[Callable], tokenizer: Callable,
                 rank: int, world_size: int, seed: int, resume: Optional[List[Dict[str, Any]]] = None,
                 batch_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.stream = TrainStream(spec, cfg, image_transform=image_transform, tokenizer=tokenizer, rank=rank,
                                  world_size=world_size, seed=seed, batch_transform=batch_transform)
        self.loader = self.stream.loader(persistent=cfg.persistent_workers)
        self._batches: Optional[Iterator[Dict[str, Any]]] = None
        self.restore(resume)
        atexit.register(_close_at_exit, weakref.ref(self))  # before multiprocessing joins the workers

    def close(self) -> None:
        """Stop the DataLoader workers. Persistent ones would otherwise wait for work until the process
        exits, where multiprocessing joins them forever (they ignore SIGTERM: see ``_init_worker``)."""
        for it in (self._batches, getattr(self.loader, "_iterator", None)):
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
        self.loader._iterator = None
        self._batches = None

    def restore(self, resume: Optional[List[Dict[str, Any]]]) -> None:
        """Continue from the ranks' saved positions (``state()`` of each rank, in rank order; None: the
        start). Before the first ``next()`` only: workers read the plan when they start."""
        if self._batches is not None:
            raise RuntimeError("TrainData.restore after reading began")
        positions = [DataPosition.from_dict(p) for p in resume] if resume else []
        epoch = max((p.epoch for p in positions), default=0)
        if len({p.epoch for p in positions}) > 1:  # a continual run's ranks change epochs at their own steps
            log.warning("the checkpoint's ranks were in different epochs; starting epoch %d afresh", epoch)
            positions = []
        self.stream.resume = positions or None
        self.position = self._start(epoch)

    def started(self) -> bool:
        """Whether any batch of this epoch has been consumed, by this run or the one it resumes."""
        return any(pos != 0 for pos in self.position.consumed.values())

    def _start(self, epoch: int) -> DataPosition:
        plan = self.stream.plan(epoch)
        consumed = {key: start for role in plan.roles for key, start in role}
        return DataPosition(epoch, plan.layout, {**consumed, **{key: DONE for key in plan.done}}, plan.offset)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def next(self) -> Optional[Dict[str, Any]]:
        if self._batches is None:
            self.stream.epoch.value = self.position.epoch
            self._batches = iter(self.loader)
        return next(self._batches, None)

    def consume(self, batch: Dict[str, Any]) -> None:
        at = batch.get("data_position")
        if at is None:
            return
        self.position.consumed.update(at["consumed"])
        self.position.consumed.update({key: DONE for key in at["done"]})
        self.position.next_role = (at["role"] + 1) % self.stream.layout[1]

    def next_epoch(self) -> None:
        self.position = self._start(self.position.epoch + 1)
        self._batches = None

    def state(self) -> Dict[str, Any]:
        return dataclasses.asdict(self.position)

    def batches_per_epoch(self, epoch: int) -> int:
        """Full batches every rank yields in ``epoch`` from a fresh start, if no sample is bad (the
        fewest of any rank): what a budget in epochs counts."""
        b, (ranks, roles) = self.stream.cfg.batch_size, self.stream.layout
        if self.stream.epoch_samples is not None:
            return roles * (self.stream.epoch_samples // (ranks * roles) // b)
        urls = self.stream.sources[0]
        sizes = dict(zip(urls, shard_sizes(urls, instead="optim.steps")))
        order = _rank_shards(urls, 0, 1, make_seed(self.stream.seed, epoch))
        return min(sum(sum(sizes[u] for u in order[r::ranks][w::roles]) // b for w in range(roles))
                   for r in range(ranks))
