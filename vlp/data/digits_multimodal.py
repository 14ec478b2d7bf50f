"""A built-in multimodal classification set where neither modality alone is enough.

Each sample pairs a scan of scikit-learn's handwritten digits (the image shows digit d)
with a short text about it, and the label needs both:

    label = d + 10 · ink,     ink ∈ {red = 0, blue = 1}     (20 classes)

* the **image** shows d but not the ink (the scans are grayscale);
* the **text** always names the ink and, with probability ``hint_prob`` (0.5), adds a
  hint about the digit that is right with probability ``hint_accuracy`` (0.8; a wrong
  hint names one of the other nine digits uniformly): "blue ink, looks like a 7".

Every scan appears ``copies`` (2) times, once per ink (copy k has ink k mod 2) with its own
text, so the ink is independent of the image. Best possible accuracies, then: an image
alone at most ½ (the digit, never the ink); a text alone ½·0.8 + ½·0.1 = 0.45 in
expectation (the ink always; the digit from a hint, else a guess); both together the
digit-recognition accuracy (no ink noise). The texts share information with the images
(the hinted digits) for a contrastive loss to align.

Layout (as ``vlp data digits``)::

    out/{train,val}/0.tar ... nshards.txt       png, txt, cls; the train/val split is the
                                                digits one (by scan, stratified, seed 0)
    out/classnames.txt                          "zero in red ink" ... "nine in blue ink" (label order)
    out/zeroshot_classification_templates.txt   image-only zero-shot is capped at ½ here
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, Iterator

from vlp.data.digits import CLASSNAMES as DIGIT_NAMES
from vlp.data.digits import ZEROSHOT_TEMPLATES, _png, digits_splits
from vlp.data.shards import write_split

INKS = ["red", "blue"]
CLASSNAMES = [f"{w} in {ink} ink" for ink in INKS for w in DIGIT_NAMES]  # label = d + 10·ink
INK_TEXTS = ["{ink} ink", "written in {ink} ink", "a scan in {ink} ink", "{ink} ink on paper"]
# {w}: the hinted digit as a word, {n}: as a numeral
HINTS = ["maybe a {w}", "looks like a {n}", "probably the digit {w}", "the writer says {n}"]


def write_digits_multimodal(
    out: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    size: int = 32,
    shard_size: int = 500,
    copies: int = 2,
    hint_prob: float = 0.5,
    hint_accuracy: float = 0.8,
) -> Dict[str, int]:
    """Write the shards and class files under ``out``; returns sample and shard counts."""
    if copies < 1 or not 0.0 <= hint_prob <= 1.0 or not 0.0 <= hint_accuracy <= 1.0:
        raise ValueError(f"need copies >= 1 and probabilities in [0, 1]; got {copies}, {hint_prob}, {hint_accuracy}")
    digits, splits = digits_splits(val_fraction, seed)
    out = Path(out)
    counts = {}
    for split, idx in splits:
        rng = random.Random(f"multimodal-{seed}-{split}")  # str seeds hash stably
        samples = _samples(digits.images, digits.target, idx, size, copies, hint_prob, hint_accuracy, rng)
        shards = write_split(out / split, samples, shard_size)
        counts[split], counts[f"{split}_shards"] = len(idx) * copies, len(shards)
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return counts


def caption(digit: int, ink: int, hint_prob: float, hint_accuracy: float, rng: random.Random) -> str:
    text = rng.choice(INK_TEXTS).format(ink=INKS[ink])
    if rng.random() < hint_prob:
        hinted = digit if rng.random() < hint_accuracy else rng.choice([d for d in range(10) if d != digit])
        text += ", " + rng.choice(HINTS).format(w=DIGIT_NAMES[hinted], n=hinted)
    return text


def _samples(images, targets, idx, size, copies, hint_prob, hint_accuracy, rng) -> Iterator[Dict]:
    # images: (1797, 8, 8) ink levels 0..16; a scan's copies are adjacent (the stream shuffles)
    for i in idx:
        png = _png(images[i], size)
        for k in range(copies):
            ink, digit = k % 2, int(targets[i])
            yield {"__key__": f"digitsmm-{i:06d}-{k}", "png": png,
                   "txt": caption(digit, ink, hint_prob, hint_accuracy, rng), "cls": digit + 10 * ink}
