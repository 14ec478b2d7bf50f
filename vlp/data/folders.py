"""Image folders (torchvision's ``ImageFolder`` layout) as eval data: zero-shot and linear probe.

    ROOT/<class>/<image>      one folder per class; images at any depth below it

Classes are the sorted folder names (torchvision's ``find_classes``; label = index), images
the files with torchvision's image extensions (``make_dataset``). Class names default to the
folder names with ``_`` read as a space (``golden_retriever`` -> ``golden retriever``); a
``classnames.txt`` by the folder, or given names, replace them in the same order
(``--classnames imagenet1k`` for ImageNet's sorted synset folders).

``build_folder_loader`` gives the batch dicts of the eval stream (``vlp/data/stream.py``):
``image``, ``text`` (an empty caption), ``label``, ``caption``, ``captions`` (empty), ``key``
(the image's path below ROOT) and ``n_skipped`` (undecodable images, skipped and counted).
Rank r of R reads every R-th image, so the ranks' shares partition the folder.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

log = logging.getLogger(__name__)


def is_image_folder(spec: Any) -> bool:
    """Whether ``spec`` is a local folder of class folders holding images (and no ``.tar`` shards)."""
    if not isinstance(spec, (str, os.PathLike)) or not os.path.isdir(spec):
        return False
    entries = list(os.scandir(spec))
    if any(e.is_file() and e.name.endswith(".tar") for e in entries):
        return False
    return any(e.is_dir() and _holds_images(e.path) for e in entries)


def _holds_images(folder: str) -> bool:
    return any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(folder))


def folder_classes(root: str) -> List[str]:
    """The class folder names of ``root``, sorted (label order)."""
    return find_classes(root)[0]


def folder_classnames(root: str) -> List[str]:
    """Class names from the folder names, ``_`` read as a space."""
    return [name.replace("_", " ") for name in folder_classes(root)]


def folder_samples(root: str) -> List[Tuple[str, int]]:
    """(image path, label) of every image under ``root``, in torchvision's order; ValueError if a
    class folder holds no image."""
    _, class_to_idx = find_classes(root)
    try:
        return make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # torchvision: a class folder without a valid file
        raise ValueError(f"image folder {root}: {str(e).splitlines()[0]}") from None


class FolderImages(IterableDataset):
    """This rank's images of an image folder as batch dicts (module docstring); each DataLoader
    worker takes every W-th of them."""

    def __init__(self, root: str, transform: Callable, tokenizer: Callable, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        self.root = root
        self.samples = folder_samples(root)[rank::world_size]
        self.transform, self.tokenizer, self.batch_size = transform, tokenizer, batch_size

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        empty = self.tokenizer([""])[0]  # (L,) every image's caption is empty
        batch: List[Dict[str, Any]] = []
        skipped = 0
        for path, label in self.samples[worker::workers]:
            try:
                with Image.open(path) as im:
                    image = self.transform(im.convert("RGB"))  # (3, H, W)
            except Exception as exn:  # an undecodable image is skipped and counted, as in the shard stream
                skipped += 1
                log.log(logging.WARNING if skipped == 1 else logging.DEBUG, "skipping %s: %s", path, exn)
                continue
            key = os.path.relpath(path, self.root)
            batch.append({"image": image, "text": empty, "label": label, "caption": "", "captions": [], "key": key})
            if len(batch) == self.batch_size:
                yield _collate(batch, skipped)
                batch, skipped = [], 0
        if batch:
            yield _collate(batch, skipped)


def _collate(samples: List[Dict[str, Any]], skipped: int) -> Dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "text": torch.stack([s["text"] for s in samples]),  # (B, L)
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),  # (B,)
        **{k: [s[k] for s in samples] for k in ("caption", "captions", "key")},
        "n_skipped": skipped,
    }


def build_folder_loader(root: str, transform: Optional[Callable], tokenizer: Callable, batch_size: int,
                        workers: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """One pass over this rank's share of the image folder ``root`` (batch dicts, module docstring)."""
    if transform is None:
        raise ValueError(f"image folder {root}: the model has no image tower")
    images = FolderImages(root, transform, tokenizer, batch_size, rank, world_size)
    return DataLoader(images, batch_size=None, num_workers=min(workers, len(images.samples)),
                      pin_memory=torch.cuda.is_available())
