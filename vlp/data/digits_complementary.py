"""A built-in multimodal set whose image and text each carry part of the label.

Each sample is one scan of scikit-learn's handwritten digits (label: its digit d, 10
classes), degraded, paired with a text that names noisy attributes of d:

* **image**: a band of rows or of columns (even odds) is blanked over a fraction s of the
  8x8 scan, s ~ U(``occlusion_min``, ``occlusion_max``) per sample (0.25..0.6: 2 to 5 of 8
  lines), then Gaussian noise of standard deviation ``noise`` · s · 16 ink levels is added
  (clipped to 0..16). The image alone leaves digits confused whose visible parts agree.
* **text**: each of three attributes of d is named with probability ``attribute_prob``
  (0.5), independently; a named attribute is wrong with probability ``attribute_noise``
  (0.1; a wrong value is one of the others, uniformly). No attribute named (1/8 of the
  texts at 0.5): a text without information ("a handwritten digit").

      parity      even | odd
      magnitude   small (0-4) | large (5-9)
      shape       round (0 6 8 9) | straight (1 4 7) | curved (2 3 5)

  "an odd digit, five or more": the text alone narrows d to a group (all three attributes,
  right, single out every digit but 6 and 8), the image alone to the digits its visible
  part fits; together they name d far more often than either (measured in
  tests/test_digits_complementary.py: image alone about 0.6, text alone about 0.3, both
  about 0.75 with simple classifiers).

Every scan appears ``copies`` (2) times with its own degradation and text. Everything is
drawn from ``random.Random`` seeded by (``seed``, split): the same arguments write the same
samples. Layout (as ``vlp data digits``)::

    out/{train,val}/0.tar ... nshards.txt       png, txt, cls; the digits train/val split (by scan)
    out/classnames.txt                          "zero" ... "nine"
    out/zeroshot_classification_templates.txt
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from vlp.data.digits import CLASSNAMES, ZEROSHOT_TEMPLATES, _png, digits_splits
from vlp.data.shards import write_split

SHAPES = {0: 0, 6: 0, 8: 0, 9: 0, 1: 1, 4: 1, 7: 1, 2: 2, 3: 2, 5: 2}  # round, straight, curved
ATTRIBUTES = {  # name -> (value of digit d, the phrase of each value)
    "parity": (lambda d: d % 2, ["an even digit", "an odd digit"]),
    "magnitude": (lambda d: int(d >= 5), ["less than five", "five or more"]),
    "shape": (SHAPES.__getitem__, ["drawn with round loops", "drawn with straight strokes",
                                   "drawn with open curves"]),
}
NO_ATTRIBUTE = ["a handwritten digit", "a scanned digit", "a digit written by hand"]


@dataclass
class Params:
    """The generation parameters (module docstring)."""

    occlusion_min: float = 0.25
    occlusion_max: float = 0.6
    noise: float = 0.3
    attribute_prob: float = 0.5
    attribute_noise: float = 0.1
    copies: int = 2

    def check(self) -> None:
        if not 0.0 <= self.occlusion_min <= self.occlusion_max <= 1.0:
            raise ValueError(f"need 0 <= occlusion_min <= occlusion_max <= 1, got {self.occlusion_min}, "
                             f"{self.occlusion_max}")
        probs = (self.attribute_prob, self.attribute_noise)
        if self.noise < 0 or not all(0.0 <= p <= 1.0 for p in probs) or self.copies < 1:
            raise ValueError(f"need noise >= 0, probabilities in [0, 1] and copies >= 1; got {self}")


@dataclass
class Sample:
    key: str
    image: np.ndarray  # (8, 8) degraded ink levels 0..16
    text: str
    label: int


def degrade(image: np.ndarray, p: Params, rng: random.Random) -> np.ndarray:
    """(8, 8) ink levels -> a copy with a blanked band of rows or columns and noise."""
    s = rng.uniform(p.occlusion_min, p.occlusion_max)
    width = int(round(8 * s))
    out = image.astype(np.float64).copy()
    start = rng.randint(0, 8 - width)
    if rng.random() < 0.5:
        out[start:start + width, :] = 0.0
    else:
        out[:, start:start + width] = 0.0
    noise = np.array([rng.gauss(0.0, p.noise * s * 16.0) for _ in range(64)]).reshape(8, 8)
    return np.clip(out + noise, 0.0, 16.0)


def caption(digit: int, p: Params, rng: random.Random) -> str:
    """The named attributes of ``digit`` (each maybe wrong), or a text without information."""
    phrases = []
    for value_of, words in ATTRIBUTES.values():
        if rng.random() >= p.attribute_prob:
            continue
        value = value_of(digit)
        if rng.random() < p.attribute_noise:
            value = rng.choice([v for v in range(len(words)) if v != value])
        phrases.append(words[value])
    return ", ".join(phrases) if phrases else rng.choice(NO_ATTRIBUTE)


def generate(p: Params, val_fraction: float = 0.2, seed: int = 0) -> Iterator[Tuple[str, List[Sample]]]:
    """(split, samples) for train and val; the same arguments give the same samples."""
    p.check()
    digits, splits = digits_splits(val_fraction, seed)
    for split, idx in splits:
        rng = random.Random(f"complementary-{seed}-{split}")  # str seeds hash stably
        yield split, [Sample(f"digitscp-{i:06d}-{k}", degrade(digits.images[i], p, rng),
                             caption(int(digits.target[i]), p, rng), int(digits.target[i]))
                      for i in idx for k in range(p.copies)]


def write_digits_complementary(out: str | Path, params: Params | None = None, val_fraction: float = 0.2,
                               seed: int = 0, size: int = 32, shard_size: int = 500) -> Dict[str, int]:
    """Write the shards and class files under ``out``; returns sample and shard counts."""
    out = Path(out)
    counts = {}
    for split, samples in generate(params or Params(), val_fraction, seed):
        rows = ({"__key__": s.key, "png": _png(s.image, size), "txt": s.text, "cls": s.label} for s in samples)
        shards = write_split(out / split, rows, shard_size)
        counts[split], counts[f"{split}_shards"] = len(samples), len(shards)
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return counts
