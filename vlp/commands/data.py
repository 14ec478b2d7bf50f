"""``vlp data``: write built-in datasets, import a CSV, verify shards.

``vlp data digits [--out data/digits]``, one such command per built-in dataset
``vlp data from-csv --csv FILE --out DIR [--shard-size N] [--image-col C] [--caption-col C] [--label-col C] [--sep S]``
``vlp data verify SPEC [SPEC ...] [--json] [--audio-key flac;wav]``: exit code 1 when something is corrupt.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict

from vlp.data.builtin import DATASETS
from vlp.data.csv_import import from_csv
from vlp.data.shards import verify


def add_data_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="write, import and verify WebDataset shards")
    sub = data.add_subparsers(dest="data_command", required=True)
    for name in DATASETS.list():
        p = sub.add_parser(name, help=(DATASETS.get(name).builder.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--out", default=f"data/{name}", help="output folder (default: %(default)s)")
        p.set_defaults(func=_builtin, dataset=name)

    p = sub.add_parser("from-csv", help="shards from a CSV of local image paths and captions")
    p.add_argument("--csv", required=True, help="CSV with a header row; relative paths are resolved against its folder")
    p.add_argument("--out", required=True, help="output folder for shard-000000.tar, ...")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    p.add_argument("--image-col", default="filepath", help="default: %(default)s")
    p.add_argument("--caption-col", default="caption", help="default: %(default)s")
    p.add_argument("--label-col", default=None, help="optional integer label column")
    p.add_argument("--sep", default=",", help="field separator (default: %(default)r)")
    p.set_defaults(func=_from_csv)

    p = sub.add_parser("verify", help="count samples per shard and list corrupt ones")
    p.add_argument("spec", nargs="+", help="shard folder, brace pattern or pipe: command (several: all of them)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--audio-key", help="samples must carry decodable audio under this key (e.g. 'flac;wav'); "
                   "then no image is required")
    p.set_defaults(func=_verify)


def _builtin(args: argparse.Namespace) -> int:
    counts = DATASETS.get(args.dataset).builder(args.out)
    print(f"wrote {args.dataset} to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _from_csv(args: argparse.Namespace) -> int:
    counts = from_csv(
        args.csv, args.out, args.shard_size, args.image_col, args.caption_col, args.label_col, args.sep
    )
    samples, shards, skipped = counts["samples"], counts["shards"], counts["skipped"]
    print(f"wrote {samples} samples in {shards} shards to {args.out} ({skipped} rows skipped)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.spec, image_key=None, audio_key=args.audio_key) if args.audio_key else verify(args.spec)
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(report)
    return 1 if report["corrupt"] else 0


def _print_report(report: Dict[str, Any]) -> None:
    for shard in report["shards"]:
        bad = f", {len(shard['corrupt'])} corrupt" if shard["corrupt"] else ""
        print(f"{shard['path']}: {shard['samples']} samples{bad}")
        for item in shard["corrupt"]:
            print(f"  {item['key'] or '(shard)'}: {item['error']}")
    print(f"total: {report['total']} samples in {len(report['shards'])} shards, {report['corrupt']} corrupt")
