"""The built-in quickstart dataset: scikit-learn's 8x8 handwritten digits as WebDataset shards.

1797 real scans (UCI optdigits) need no download, write in about a second, and are enough
for a CPU run to learn zero-shot classification. Layout (clip_benchmark's webdataset one:
``clip_benchmark eval --dataset wds/digits --dataset_root out --split val`` reads it as is)::

    out/train/0.tar ... nshards.txt  training split (the folder is a shard spec: data/digits/train)
    out/val/0.tar ... nshards.txt    held-out images, every class present
    out/classnames.txt               "zero" ... "nine", one per line (label order)
    out/zeroshot_classification_templates.txt   prompts with a {c} placeholder

Each sample: ``__key__`` ``digits-000123`` (index in ``load_digits``), ``png`` (RGB),
``txt`` (a caption, words and numerals mixed), ``cls`` (the label).
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
from PIL import Image

from vlp.data.shards import write_split

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# {w}: the digit as a word, {n}: as a numeral; mixing both teaches the text tower that
# "7" and "seven" mean the same image, which the word-only zero-shot prompts rely on.
CAPTIONS = [
    "a handwritten {w}",
    "a photo of the digit {w}",
    "the number {n} written by hand",
    "a scan of a handwritten {n}",
    "a low resolution image of the digit {n}",
    "a blurry {w} drawn by hand",
    "the digit {w}",
    "a black and white picture of the number {n}",
]

ZEROSHOT_TEMPLATES = [
    "a handwritten {c}.",
    "a photo of the digit {c}.",
    "a scan of a handwritten {c}.",
    "the number {c} written by hand.",
    "a low resolution image of the digit {c}.",
]


def digits_splits(val_fraction: float, seed: int):
    """scikit-learn's digits and the sorted (name, indices) of a stratified train/val split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, stratify=digits.target, random_state=seed)
    return digits, (("train", np.sort(train_idx)), ("val", np.sort(val_idx)))


def write_digits(
    out: str | Path, val_fraction: float = 0.2, seed: int = 0, size: int = 32, shard_size: int = 200
) -> Dict[str, int]:
    """Write the digits shards and zero-shot files under ``out``; returns sample and shard counts.

    The train/val split is stratified and fixed by ``seed``; so are the captions.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 (the scans are 8x8), got {size}")
    digits, splits = digits_splits(val_fraction, seed)
    out = Path(out)
    counts = {}
    for split, idx in splits:
        rng = random.Random(f"{seed}-{split}")  # str seeds are hashed stably (sha512), unlike hash()
        samples = _samples(digits.images[idx], digits.target[idx], idx, size, rng)
        shards = write_split(out / split, samples, shard_size)
        counts[split], counts[f"{split}_shards"] = len(idx), len(shards)
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return counts


def _samples(images: np.ndarray, labels: np.ndarray, index: np.ndarray, size: int, rng: random.Random) -> Iterator:
    # images: (N, 8, 8) floats in 0..16 (ink level)
    for image, label, i in zip(images, labels, index):
        caption = rng.choice(CAPTIONS).format(w=CLASSNAMES[label], n=int(label))
        yield {"__key__": f"digits-{i:06d}", "png": _png(image, size), "txt": caption, "cls": int(label)}


def _png(image: np.ndarray, size: int) -> bytes:
    """(8, 8) ink levels 0..16 -> (size, size) RGB PNG bytes."""
    gray = Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8))  # 2-D uint8 -> mode "L"
    buf = io.BytesIO()
    gray.resize((size, size), Image.BICUBIC).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
