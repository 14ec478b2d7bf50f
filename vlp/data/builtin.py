"""Built-in datasets, by name: each writes its shards (and zero-shot files) into a folder, in
clip_benchmark's layout where it can (``DIR/train``, ``DIR/val``: split folders written by
``vlp.data.shards.write_split``, ``0.tar ...`` + ``nshards.txt``; ``vlp/data/clip_benchmark.py``).

``vlp data NAME --out DIR`` is generated for every entry, so adding a dataset here adds
its command. A builder takes the output folder and returns counts to print.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

from vlp.data.digits import write_digits
from vlp.data.digits_complementary import write_digits_complementary
from vlp.data.digits_multimodal import write_digits_multimodal
from vlp.data.spoken_digits import write_spoken_digits
from vlp.data.tones import write_tones
from vlp.registry import Registry

DATASETS: Registry[Callable[[Path], Dict[str, int]]] = Registry("dataset")


@DATASETS.register("digits")
def _digits(out: Path) -> Dict[str, int]:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), upscaled to 32x32."""
    return write_digits(out)


@DATASETS.register("tones")
def _tones(out: Path) -> Dict[str, int]:
    """Telephone DTMF digit tones with captions (audio-text; 1500 train, 400 val clips, FLAC at 8 kHz)."""
    return write_tones(out)


@DATASETS.register("spoken-digits")
def _spoken_digits(out: Path) -> Dict[str, int]:
    """The digit words spoken by espeak-ng in several voices and speeds (needs espeak-ng on PATH)."""
    return write_spoken_digits(out)


@DATASETS.register("digits-multimodal")
def _digits_multimodal(out: Path) -> Dict[str, int]:
    """Digit scans + texts naming the ink (and a noisy digit hint): 20 classes that need both modalities."""
    return write_digits_multimodal(out)


@DATASETS.register("digits-complementary")
def _digits_complementary(out: Path) -> Dict[str, int]:
    """Occluded, noisy digit scans + texts naming noisy digit attributes: each modality holds part of the label."""
    return write_digits_complementary(out)
