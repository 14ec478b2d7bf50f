"""How many samples shards hold, without decoding them: for budgets in epochs and resampled epochs.

A shard's count comes from a ``sizes.json`` beside it (open_clip's convention: ``{"shard-000000.tar": 100, ...}``)
when that names it, else from its tar headers (a local file: members are counted by their ``__key__``
as webdataset groups them, seeking over the data). A remote shard (``pipe:``, ``s3://``...) without a
``sizes.json`` entry cannot be counted: the error says which setting to give instead.
"""
from __future__ import annotations

import json
import os
import tarfile
from functools import lru_cache
from typing import Dict, List

from webdataset.tariterators import base_plus_ext

SIZES_FILE = "sizes.json"


def shard_sizes(urls: List[str], instead: str = "data.epoch_samples") -> List[int]:
    """Samples per shard of ``urls`` (in order); ``instead`` names the setting that makes counting unneeded."""
    return [_size(url, instead) for url in urls]


def _size(url: str, instead: str) -> int:
    folder = os.path.dirname(url)
    sizes = os.path.join(folder, SIZES_FILE)
    local = "://" not in url and not url.startswith("pipe:") and os.path.isfile(sizes)
    listed = _listed(sizes, os.path.getmtime(sizes)).get(os.path.basename(url)) if local else None
    if listed is not None:
        return int(listed)
    if url.startswith("pipe:") or "://" in url:
        raise ValueError(f"cannot count the samples of remote shard {url!r} (no {SIZES_FILE} beside it names it); "
                         f"set {instead}")
    return _count(url, os.path.getmtime(url))


@lru_cache(maxsize=None)
def _listed(path: str, mtime: float) -> Dict[str, int]:  # mtime: a rewritten file is read again
    with open(path) as f:
        return json.load(f)


@lru_cache(maxsize=None)
def _count(path: str, mtime: float) -> int:  # mtime: a rewritten shard is counted again
    keys, last = 0, None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is not None and prefix != last:
                    keys, last = keys + 1, prefix
    except (tarfile.TarError, OSError):
        pass  # a damaged shard: what was read before the damage counts (the stream reads as much)
    return keys
