"""Built-in datasets, by name: each writes its shards (and zero-shot files) into a folder.

``vlp data NAME --out DIR`` is generated for every entry, so adding a dataset here adds
its command. A builder takes the output folder and returns counts to print.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

from vlp.registry import Registry

DATASETS: Registry[Callable[[Path], Dict[str, int]]] = Registry("dataset")


@DATASETS.register("digits")
def _digits(out: Path) -> Dict[str, int]:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), upscaled to 32x32."""
    from vlp.data.digits import write_digits

    return write_digits(out)
