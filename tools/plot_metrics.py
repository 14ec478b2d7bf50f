#!/usr/bin/env python
"""Plot a run's training loss and zero-shot top-1 against step, from RUN_DIR/metrics.jsonl.

    python tools/plot_metrics.py RUN_DIR [--out PNG]      # default PNG: RUN_DIR/metrics.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: works on headless nodes
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEY = "loss"
TOP1_KEY = "zeroshot_top1"


def read_records(path: str) -> Tuple[List[Dict], int]:
    """(records, unreadable line count): a run still being written may end in a partial line."""
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return records, bad


def series(records: Sequence[Dict], key: str) -> Tuple[List[float], List[float]]:
    """(steps, values) of the records that have both ``step`` and a numeric ``key``."""
    points = [(r["step"], r[key]) for r in records if "step" in r and isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _panel(ax, steps, values, ylabel: str, empty: str, **style) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if steps:
        ax.plot(steps, values, **style)
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)


def plot(records: Sequence[Dict], out: str, title: str) -> None:
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(11, 4))
    _panel(loss_ax, *series(records, LOSS_KEY), "training loss", "no loss logged", linewidth=1)
    _panel(top1_ax, *series(records, TOP1_KEY), "zero-shot top-1", "no zero-shot eval logged", marker="o")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder holding metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    path = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"plot_metrics: error: no metrics file {path} (is {args.run_dir} a vlp run folder?)", file=sys.stderr)
        return 2
    records, bad = read_records(path)
    if bad:
        print(f"plot_metrics: skipped {bad} unreadable line(s) in {path}", file=sys.stderr)
    if not any(series(records, key)[0] for key in (LOSS_KEY, TOP1_KEY)):
        print(f"plot_metrics: error: no '{LOSS_KEY}' or '{TOP1_KEY}' with a 'step' in {path}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "metrics.png")
    plot(records, out, title=os.path.basename(os.path.abspath(args.run_dir)))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
