"""Turn a CSV of local image paths and captions into WebDataset shards.

The image bytes are stored as they are (no re-encoding) under their extension, so a
``.jpg`` row becomes ``{key}.jpg`` + ``{key}.txt`` (+ ``{key}.cls``) in the tar.

Rows that cannot become a sample (image file missing, extension the stream does not
decode, empty caption) are skipped and counted, with a warning naming the first few:
a few dead links should not abort the conversion of a million-row CSV. A label that is
not an integer is a ValueError, because it means ``label_col`` names the wrong column.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tqdm import tqdm

from vlp.data.shards import write_shards

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what the stream's default image_key decodes

Row = Tuple[Path, str, Optional[int]]  # image path, caption, label


def from_csv(
    csv_path: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    image_col: str = "filepath",
    caption_col: str = "caption",
    label_col: Optional[str] = None,
    sep: str = ",",
) -> Dict[str, int]:
    """Write ``out/shard-000000.tar``, ... from ``csv_path`` (header row required).

    Relative image paths are resolved against the CSV's folder. Returns
    ``{"samples", "shards", "skipped"}``.
    """
    csv_path = Path(csv_path)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if len(sep) != 1:
        raise ValueError(f"sep must be one character, got {sep!r}")
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    rows, skipped = _read_rows(csv_path, image_col, caption_col, label_col, sep)
    if not rows:
        raise ValueError(f"{csv_path}: no usable rows ({skipped} skipped)")
    progress = tqdm(rows, desc=f"writing {out}", unit="img")
    shards = write_shards(out, (_sample(i, *row) for i, row in enumerate(progress)), shard_size)
    return {"samples": len(rows), "shards": len(shards), "skipped": skipped}


def _read_rows(
    csv_path: Path, image_col: str, caption_col: str, label_col: Optional[str], sep: str
) -> Tuple[List[Row], int]:
    """The usable rows of the CSV, and how many were skipped (warned about)."""
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        _check_columns(csv_path, reader.fieldnames or [], [image_col, caption_col] + ([label_col] if label_col else []))
        rows, problems = [], []
        for record in reader:
            where = f"{csv_path}:{reader.line_num}"  # the record's last line (quoted fields may span lines)
            row, problem = _parse_row(csv_path.parent, record, image_col, caption_col, label_col, where)
            if problem:
                problems.append(problem)
            else:
                rows.append(row)
    if problems:
        examples = "; ".join(problems[:3])
        log.warning("%s: skipped %d of %d rows, e.g. %s", csv_path, len(problems), len(problems) + len(rows), examples)
    return rows, len(problems)


def _check_columns(csv_path: Path, header: List[str], needed: List[str]) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{csv_path}: no column {missing[0]!r} in the header; columns: {', '.join(header)}")


def _parse_row(root: Path, record: dict, image_col: str, caption_col: str, label_col: Optional[str], where: str):
    """(row, None) for a usable record, (None, why) for one to skip."""
    path = root / (record[image_col] or "").strip()
    caption = (record[caption_col] or "").strip()
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        return None, f"{where}: {path.name!r} is not one of {'/'.join(IMAGE_EXTENSIONS)}"
    if not path.is_file():
        return None, f"{where}: image file not found: {path}"
    if not caption:
        return None, f"{where}: empty caption"
    label = None
    if label_col:
        try:
            label = int(record[label_col])
        except (TypeError, ValueError):
            value = record[label_col]
            raise ValueError(f"{where}: label {value!r} in column {label_col!r} is not an integer") from None
    return (path, caption, label), None


def _sample(i: int, path: Path, caption: str, label: Optional[int]) -> dict:
    # Keys are row numbers: file names may repeat across folders or contain dots, and
    # webdataset splits a member name at its first dot into key and extension.
    sample = {"__key__": f"{i:09d}", path.suffix.lower().lstrip("."): path.read_bytes(), "txt": caption}
    if label is not None:
        sample["cls"] = label
    return sample
