"""clip_benchmark's webdataset layout, and the eval data of every layout vlp reads.

A clip_benchmark dataset (``clip_benchmark eval --dataset wds/NAME --dataset_root ROOT``)::

    ROOT/test/0.tar ... N-1.tar     a split folder (any split name: train, val, test ...)
    ROOT/test/nshards.txt           N
    ROOT/classnames.txt             one class name per line, in label order (classification)
    ROOT/zeroshot_classification_templates.txt   one prompt per line with a {c} placeholder
    ROOT/dataset_type.txt           classification (the default when absent) | retrieval | multilabel

Samples: an image under ``webp``, ``png``, ``jpg`` or ``jpeg``; a classification sample has
its label in ``cls`` and needs no caption; a retrieval sample's ``txt`` holds its captions,
one per line. vlp reads the split folder as a shard spec (``expand_spec``: ``0.tar`` ...
``N-1.tar`` as ``nshards.txt`` says), and ``ROOT`` with a split (``--data ROOT --split test``,
``resolve_split``). A folder of class folders of images (``vlp/data/folders.py``) is eval
data too: ``eval_loader`` reads either.
"""
from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

from torch.utils.data import DataLoader

from vlp.data.config import DataConfig
from vlp.data.folders import build_folder_loader, is_image_folder
from vlp.data.shards import NSHARDS_FILE
from vlp.data.stream import build_eval_loader

DATASET_TYPE_FILE = "dataset_type.txt"
DATASET_TYPES = ("classification", "retrieval", "multilabel")
DEFAULT_SPLIT = "test"  # clip_benchmark's default split


def _local_dir(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and not str(spec).startswith("pipe:") and "://" not in str(spec) \
        and os.path.isdir(spec)


def splits(root: Any) -> List[str]:
    """The split folders of a dataset root (sorted): subfolders with an ``nshards.txt``, or image folders."""
    if not _local_dir(root):
        return []
    return sorted(e.name for e in os.scandir(root)
                  if e.is_dir() and (os.path.isfile(os.path.join(e.path, NSHARDS_FILE)) or is_image_folder(e.path)))


def is_dataset_root(spec: Any) -> bool:
    """Whether ``spec`` is a local folder of split folders (no shards or class folders of its own)."""
    if not _local_dir(spec) or is_image_folder(spec) or os.path.isfile(os.path.join(spec, NSHARDS_FILE)):
        return False
    return not any(name.endswith(".tar") for name in os.listdir(spec)) and bool(splits(spec))


def resolve_split(spec: Any, split: Optional[str] = None) -> Any:
    """The eval data ``spec`` names with ``split``: ``ROOT/split`` of a dataset root (without a split,
    ``test`` where the root has it); any other spec as it is. Bad input is one-line ValueError /
    FileNotFoundError: a split of something that is not a dataset root, an unknown split, a split
    folder without ``nshards.txt`` (nor class folders)."""
    if split is None:
        if not is_dataset_root(spec):
            return spec
        have = splits(spec)
        if DEFAULT_SPLIT not in have:
            raise ValueError(f"{spec} is a dataset root with splits {', '.join(have)}: pass --split "
                             f"(split: NAME in eval.tasks)")
        return os.path.join(str(spec), DEFAULT_SPLIT)
    if not _local_dir(spec):
        raise ValueError(f"split {split!r} needs a local dataset root folder (ROOT/{split}/nshards.txt), got {spec!r}")
    folder = os.path.join(str(spec), split)
    if not os.path.isdir(folder):
        have = splits(spec)
        raise FileNotFoundError(f"no split {split!r} in {spec} (" + (f"splits: {', '.join(have)})" if have else
                                                                     "no split folders with nshards.txt there)"))
    if not os.path.isfile(os.path.join(folder, NSHARDS_FILE)) and not is_image_folder(folder):
        raise ValueError(f"split folder {folder} has no {NSHARDS_FILE} (clip_benchmark's shard count) "
                         f"nor class folders of images")
    return folder


def dataset_type(spec: Any) -> str:
    """``dataset_type.txt`` beside the eval data's folder or one level up (clip_benchmark's root);
    ``classification`` when there is none."""
    if not _local_dir(spec):
        return "classification"
    folder = os.path.abspath(str(spec))
    for d in (folder, os.path.dirname(folder)):
        path = os.path.join(d, DATASET_TYPE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                kind = f.read().strip().lower()
            if kind not in DATASET_TYPES:
                raise ValueError(f"{path}: unknown dataset type {kind!r}; known: {', '.join(DATASET_TYPES)}")
            return kind
    return "classification"


def eval_loader(spec: Any, cfg: DataConfig, transform: Optional[Callable], tokenizer: Callable,
                batch_size: Optional[int] = None, rank: int = 0, world_size: int = 1) -> DataLoader:
    """One ordered pass over this rank's share of the eval data ``spec``: an image folder
    (``vlp/data/folders.py``) or shards (``build_eval_loader``: a split folder, a shard folder,
    pattern or list). Every sample is read by exactly one of ``world_size`` ranks."""
    if is_image_folder(spec):
        return build_folder_loader(str(spec), transform, tokenizer, batch_size or cfg.batch_size, cfg.workers,
                                   rank, world_size)
    return build_eval_loader(spec, cfg, transform, tokenizer, batch_size=batch_size, rank=rank,
                             world_size=world_size)
