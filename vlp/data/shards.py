"""Shard specs, shard writing, and ``verify``: what is in a set of WebDataset shards.

A *shard spec* names tar shards in one of these forms:

- a brace pattern ``"data/train/shard-{000000..000009}.tar"`` (every file must exist),
- a folder: all its ``*.tar`` files, sorted; a clip_benchmark split folder (one with an
  ``nshards.txt``) names exactly its ``0.tar`` ... ``N-1.tar``, in that order,
- a ``pipe:`` command or a URL (``s3://``, ``https://``...): brace-expanded, passed through,
- a list of any of these.

Reading goes through ``read_shards``, which both the training stream and ``verify`` use,
so ``verify`` reports exactly what the stream will skip: an eval pass yields
``verify(spec)["total"]`` samples and its ``n_skipped`` add up to ``verify(spec)["corrupt"]``.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import braceexpand
import webdataset as wds
from webdataset.autodecode import Decoder, DecodingError

from vlp.data.audio import decode
from vlp.data.config import DataConfig

SHARD_NAME = "shard-%06d.tar"
SPLIT_SHARD_NAME = "%d.tar"  # clip_benchmark's shard names in a split folder
NSHARDS_FILE = "nshards.txt"  # clip_benchmark: the number of shards of a split folder


def expand_spec(spec: Any) -> List[str]:
    """The shard URLs a spec names (see the module docstring); ValueError if it names none."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("empty list of shard specs")
        return [url for s in spec for url in expand_spec(s)]
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"a shard spec is a string, a path or a list of those; got {type(spec).__name__}")
    spec = str(spec)
    if spec.startswith("pipe:") or "://" in spec:
        return list(braceexpand.braceexpand(spec))  # remote: existence is checked on read
    path = os.path.expanduser(spec)
    if os.path.isfile(os.path.join(path, NSHARDS_FILE)):
        return split_shards(path)
    if os.path.isdir(path):
        urls = sorted(str(p) for p in Path(path).glob("*.tar"))
        if not urls:
            raise ValueError(f"shard folder {spec!r} has no .tar files")
        return urls
    urls = list(braceexpand.braceexpand(path))
    missing = [u for u in urls if not os.path.isfile(u)]
    if len(missing) == len(urls):
        raise ValueError(f"shard spec {spec!r} matches no file")
    if missing:
        raise ValueError(f"shard spec {spec!r}: {len(missing)} of {len(urls)} shards are missing, e.g. {missing[0]!r}")
    return urls


def split_shards(folder: str) -> List[str]:
    """``folder/0.tar`` ... ``folder/N-1.tar`` of a clip_benchmark split folder (N from its ``nshards.txt``);
    ValueError if the count is not a positive integer or a shard is missing."""
    text = Path(folder, NSHARDS_FILE).read_text().strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{os.path.join(folder, NSHARDS_FILE)} must hold a positive number of shards, got {text!r}")
    urls = [os.path.join(folder, SPLIT_SHARD_NAME % i) for i in range(int(text))]
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise ValueError(f"split folder {folder!r}: {NSHARDS_FILE} says {len(urls)} shards but "
                         f"{len(missing)} are missing, e.g. {os.path.basename(missing[0])!r}")
    return urls


def write_split(folder: str | Path, samples: Iterable[Dict[str, Any]], shard_size: int) -> List[str]:
    """Write ``samples`` as a clip_benchmark split folder: ``folder/0.tar``, ``1.tar``, ... (at most
    ``shard_size`` samples each) and ``folder/nshards.txt``; returns the shard paths.

    Earlier shards in ``folder`` (``N.tar`` and ``shard-*.tar``) are removed first, as by ``write_shards``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tar"):
        if stale.stem.isdigit() or stale.name.startswith("shard-"):
            stale.unlink()
    (folder / NSHARDS_FILE).unlink(missing_ok=True)
    written: List[str] = []
    with wds.ShardWriter(str(folder / SPLIT_SHARD_NAME), maxcount=shard_size, verbose=0, post=written.append,
                         mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    (folder / NSHARDS_FILE).write_text(f"{len(written)}\n")
    return written


def write_shards(folder: str | Path, samples: Iterable[Dict[str, Any]], shard_size: int) -> List[str]:
    """Write ``samples`` (dicts with ``__key__`` and bytes/str/int fields) as
    ``folder/shard-000000.tar``, ... with at most ``shard_size`` samples each; returns the paths.

    Earlier ``shard-*.tar`` files in ``folder`` are removed first: a folder spec reads every
    ``.tar`` in it, so stale shards from a previous, larger write would leak into the data.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("shard-*.tar"):
        stale.unlink()
    written: List[str] = []
    # mtime=0 makes the tar bytes a function of the samples only (reproducible shards).
    pattern = str(folder / SHARD_NAME)
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=written.append, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    return written


def read_shards(shards: Iterable[Dict[str, str]], handler: Callable[[Exception], Any]) -> Iterator[Dict[str, Any]]:
    """Pipeline stage: ``{"url": ...}`` dicts in, raw samples (``{"__key__", ext: bytes}``) out.

    Each shard is read on its own with webdataset's ``tarfile_samples``. A shard that cannot
    be opened or read to its end (truncated, malformed) calls ``handler`` once, and its last
    sample read is dropped as well, because the damage may have cut it short (a truncated
    member can read as a short but valid-looking caption). The samples before it are kept;
    how many were lost after it cannot be known. A cut that falls inside a tar header reads
    as a normal end of archive (that is how ``tarfile`` behaves); then only the incomplete
    last sample, which the stream skips and counts for its missing field, shows it.
    Reading shard by shard also keeps a half-read sample from merging with the next
    shard's first one.
    """
    for shard in shards:
        errors: List[Exception] = []
        last = None
        for sample in wds.tarfile_samples([dict(shard)], handler=partial(_stop_shard, errors)):
            if last is not None:
                yield last
            last = sample
        if errors:
            handler(ShardError(f"{shard['url']}: {describe(errors[0])}"))
        elif last is not None:
            yield last


def _stop_shard(errors: List[Exception], exn: Exception) -> bool:
    errors.append(exn)
    return False  # webdataset: stop reading this shard


class ShardError(Exception):
    """A shard that could not be opened or read to its end."""


def describe(exn: BaseException) -> str:
    """One line saying what went wrong, with the root cause webdataset wraps."""
    if isinstance(exn, DecodingError):
        cause = exn.__cause__
        return f"sample {exn.key!r}: cannot decode {exn.k!r} ({type(cause).__name__}: {cause})"
    return f"{type(exn).__name__}: {exn}".splitlines()[0][:300]


def check_sample(sample: Dict[str, Any], decoder: Decoder, image_key: Optional[str], text_key: str,
                 audio_key: Optional[str] = None) -> Optional[str]:
    """Why the stream would skip ``sample`` (None if it would not): decode errors, missing fields.
    A null ``image_key`` checks no image; an ``audio_key`` requires audio soundfile can decode."""
    try:
        decoded = decoder(sample)
    except DecodingError as exn:
        return describe(exn)
    try:
        if image_key:
            get_field(decoded, image_key, "image")
        get_field(decoded, text_key, "caption")
        if audio_key:
            decode(get_field(decoded, audio_key, "audio"))
    except ValueError as exn:  # a missing field
        return str(exn)
    except Exception as exn:  # undecodable audio (soundfile's errors)
        return describe(exn)
    return None


def get_field(sample: Dict[str, Any], keys: str, what: str) -> Any:
    """The first of the ``;``-separated ``keys`` present in ``sample``; ValueError naming the sample if none is."""
    value = wds.getfirst(sample, keys, missing_is_error=False)
    if value is None:
        raise ValueError(f"sample {sample.get('__key__')!r}: no {what} (looked for {keys!r})")
    return value


def verify(spec: Any, image_key: Optional[str] = DataConfig.image_key, text_key: str = DataConfig.text_key,
           audio_key: Optional[str] = None) -> Dict[str, Any]:
    """Read every sample of ``spec`` as the stream would and report what it would skip.

    Returns ``{"shards": [{"path", "samples", "corrupt": [{"key", "error"}]}], "total", "corrupt"}``
    where ``samples`` counts the good samples and each ``corrupt`` entry is one thing the
    stream skips: a sample with an undecodable field or without image/caption (``key`` set),
    or a damaged shard (``key`` None, counted once however much of it is lost).
    """
    decoder = Decoder([wds.autodecode.imagehandler("pil")])  # the stream's decoding
    report = [_verify_shard(url, decoder, image_key, text_key, audio_key) for url in expand_spec(spec)]
    return {
        "shards": report,
        "total": sum(s["samples"] for s in report),
        "corrupt": sum(len(s["corrupt"]) for s in report),
    }


def _verify_shard(url: str, decoder: Decoder, image_key: Optional[str], text_key: str,
                  audio_key: Optional[str] = None) -> Dict[str, Any]:
    corrupt: List[Dict[str, Optional[str]]] = []
    good = 0
    for sample in read_shards([{"url": url}], handler=lambda e: corrupt.append({"key": None, "error": str(e)})):
        error = check_sample(sample, decoder, image_key, text_key, audio_key)
        if error is None:
            good += 1
        else:
            corrupt.append({"key": sample["__key__"], "error": error})
    return {"path": url, "samples": good, "corrupt": corrupt}
