"""An eval suite: zero-shot, retrieval and linear probe of one or more models over a list of
datasets, written as one table (``vlp eval suite``).

The datasets file has one dataset per line, like clip_benchmark's ``webdatasets.txt``, with
its task and the evaluator's settings::

    # DATA [TASK] [key=value ...]            (# starts a comment)
    data/digits zeroshot split=val
    data/digits retrieval split=val as=digits_rt
    data/digits linear_probe split=val       # fits on data/digits/train (train_split)
    data/imagenet/val zeroshot classnames=imagenet1k templates=openai
    wds/vtab/cifar10                         # clip_benchmark's name, under --dataset-root

DATA is a clip_benchmark dataset root (its ``split``, default ``test``), a split folder, an
image folder or any shard spec; ``wds/NAME`` is ``--dataset-root`` with ``{dataset}`` /
``{dataset_cleaned}`` filled in, as clip_benchmark's ``--dataset_root``. TASK is ``zeroshot``
(also ``zeroshot_classification``), ``retrieval`` (``zeroshot_retrieval``) or
``linear_probe``; without it, ``retrieval`` where ``dataset_type.txt`` says so, else
``zeroshot``. ``key=value`` pairs are the evaluator's settings (``vlp eval NAME --help``),
checked before any model loads; ``as=LABEL`` names the dataset's columns (default: DATA's
folder name, or NAME of ``wds/NAME``; ``:task`` added where that names two lines, then the
whole path).

A model is a run folder (or a checkpoint, or a safetensors export), an open_clip export
folder (``open_clip_config.json``) or ``open_clip:NAME[:PRETRAINED]``. The results:
``suite.json`` (every metric of every model on every dataset), ``suite.csv`` (one row per
model, a column per dataset and metric) and ``suite.png`` (the headline metric of each
dataset, a bar per model; needs matplotlib).
"""
from __future__ import annotations

import csv
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import open_clip

from vlp.data.clip_benchmark import dataset_type, is_dataset_root
from vlp.data.config import DataConfig
from vlp.eval.registry import EVALUATORS, EvalContext, run_evaluator
from vlp.registry import make_dataclass

TASKS = {"zeroshot": "zeroshot", "zeroshot_classification": "zeroshot", "retrieval": "retrieval",
         "zeroshot_retrieval": "retrieval", "linear_probe": "linear_probe", "linear-probe": "linear_probe"}
# the figures of a task drawn in the chart (clip_benchmark's names where it has them)
HEADLINE = {"zeroshot": ["acc1"], "retrieval": ["image_retrieval_recall@5", "text_retrieval_recall@5"],
            "linear_probe": ["linear_top1"]}
OPEN_CLIP_PREFIX = "open_clip:"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # what `vlp export --format open_clip` writes
WDS_PREFIX = "wds/"


@dataclass
class SuiteDataset:
    data: str  # the eval data (dataset root, split folder, image folder, shard spec)
    task: str  # zeroshot | retrieval | linear_probe
    label: str  # the name of its columns
    settings: Dict[str, Any] = field(default_factory=dict)  # the evaluator's settings from the line
    named: bool = False  # the label was given (as=LABEL)


@dataclass
class SuiteModel:
    name: str  # its row in the table
    model: Any  # an image-text model with encode_image / encode_text
    tokenizer: Callable  # texts -> (n, L) token ids
    transform: Callable  # the eval image transform


def read_datasets(path: str, dataset_root: Optional[str] = None) -> List[SuiteDataset]:
    """The datasets of a suite file (module docstring); one-line ValueError / FileNotFoundError
    naming the line for a bad one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"datasets file not found: {path}")
    found: List[SuiteDataset] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            tokens = shlex.split(line, comments=True)
            if tokens:
                found.append(_parse_line(tokens, f"{path}:{lineno}", dataset_root))
    if not found:
        raise ValueError(f"{path} names no dataset (one per line: DATA [TASK] [key=value ...])")
    for longer in (lambda ds: f"{ds.label}:{ds.task}", lambda ds: f"{ds.data}:{ds.task}"):
        labels = [ds.label for ds in found]
        for ds in found:  # the same name twice (two tasks, two folders of one name): a longer one
            if labels.count(ds.label) > 1 and not ds.named:
                ds.label = longer(ds)
    labels = [ds.label for ds in found]
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise ValueError(f"{path}: dataset label {dupes[0]!r} appears twice; name one with as=LABEL")
    return found


def _parse_line(tokens: List[str], where: str, dataset_root: Optional[str]) -> SuiteDataset:
    data, task, settings, label = tokens[0], None, {}, None
    for token in tokens[1:]:
        if "=" in token:
            key, value = token.split("=", 1)
            if key == "as":
                label = value
            else:
                settings[key] = value or None  # typed (and checked) by the settings dataclass
        elif token in TASKS and task is None:
            task = TASKS[token]
        else:
            raise ValueError(f"{where}: {token!r} is neither a task ({', '.join(TASKS)}) nor key=value")
    name = data[len(WDS_PREFIX):] if data.startswith(WDS_PREFIX) else os.path.basename(os.path.normpath(data))
    if data.startswith(WDS_PREFIX):
        if not dataset_root:
            raise ValueError(f"{where}: {data} is a clip_benchmark name: pass --dataset-root (e.g. 'data/{{dataset}}')")
        short = data[len(WDS_PREFIX):]
        data = dataset_root.format(dataset=short, dataset_cleaned=short.replace("/", "-"))
    if not (data.startswith("pipe:") or "://" in data or "{" in data or os.path.exists(data)):
        raise FileNotFoundError(f"{where}: dataset not found: {data}")
    if task is None:
        task = "retrieval" if dataset_type(data) == "retrieval" else "zeroshot"
    try:
        make_dataclass(EVALUATORS.get(task).settings, settings, where=f"{where} ({task} settings)")
    except ValueError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    return SuiteDataset(data=data, task=task, label=label or name, settings=settings, named=label is not None)


def is_open_clip_model(spec: str) -> bool:
    """``open_clip:NAME[:PRETRAINED]`` or an open_clip export folder."""
    return spec.startswith(OPEN_CLIP_PREFIX) or os.path.isfile(os.path.join(spec, OPEN_CLIP_CONFIG))


def load_open_clip(spec: str, device: Any = "cpu") -> Tuple[Any, Callable, Callable]:
    """(model, tokenizer, eval transform) of ``open_clip:NAME[:PRETRAINED]`` (no PRETRAINED: random
    init) or of an open_clip export folder, in eval mode."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        name, _, pretrained = spec[len(OPEN_CLIP_PREFIX):].partition(":")
        if name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {name!r} (open_clip.list_models() names them)")
    else:
        name, pretrained = f"local-dir:{spec}", ""
    try:
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained or None,
                                                                    device=device)
    except RuntimeError as e:  # open_clip: an unknown pretrained tag, weights it cannot fetch
        raise ValueError(f"cannot load {spec}: {str(e).splitlines()[0][:300]}") from None
    return model.eval(), open_clip.get_tokenizer(name), transform


def model_names(specs: Sequence[str]) -> List[str]:
    """Row names: each model's folder or open_clip name, the full spec where two would coincide."""
    short = [s if s.startswith(OPEN_CLIP_PREFIX) else os.path.basename(os.path.normpath(s)) for s in specs]
    return [n if short.count(n) == 1 else s for n, s in zip(short, specs)]


def evaluate_suite(model: SuiteModel, datasets: Sequence[SuiteDataset], data_cfg: Optional[DataConfig] = None,
                   device: Any = "cpu", batch_size: int = 256, rank: int = 0, world_size: int = 1,
                   progress: bool = False, log: Optional[Callable[[str], None]] = None) -> Dict[str, Dict[str, Any]]:
    """``{label: metrics}`` of one model on every dataset (every rank its share of each dataset)."""
    data_cfg = data_cfg or DataConfig()
    results: Dict[str, Dict[str, Any]] = {}
    for ds in datasets:
        if log:
            log(f"{model.name}: {ds.task} on {ds.label}")
        ctx = EvalContext(model=model.model, tokenizer=model.tokenizer, transform=model.transform, data_cfg=data_cfg,
                          data=ds.data, train_data=ds.data if is_dataset_root(ds.data) else None, device=device,
                          batch_size=batch_size, progress=progress, rank=rank, world_size=world_size)
        results[ds.label] = run_evaluator({"name": ds.task, **ds.settings}, ctx)
    return results


def suite_table(results: Dict[str, Dict[str, Dict[str, Any]]], datasets: Sequence[SuiteDataset]
                ) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows) of the CSV: one row per model, a ``LABEL/metric`` column per number."""
    columns: List[str] = []
    for ds in datasets:
        for metrics in results.values():
            for key, value in metrics.get(ds.label, {}).items():
                column = f"{ds.label}/{key}"
                if _number(value) and column not in columns:
                    columns.append(column)
    rows = []
    for name, per_data in results.items():
        row: List[Any] = [name]
        for column in columns:
            label, key = column.rsplit("/", 1)
            row.append(per_data.get(label, {}).get(key, ""))
        rows.append(row)
    return ["model", *columns], rows


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def headlines(results: Dict[str, Dict[str, Dict[str, Any]]], datasets: Sequence[SuiteDataset]
              ) -> List[Tuple[str, Dict[str, float]]]:
    """[(``LABEL metric``, {model: value})] of each dataset's headline figures (``HEADLINE``)."""
    out = []
    for ds in datasets:
        for key in HEADLINE[ds.task]:
            values = {m: per[ds.label][key] for m, per in results.items() if key in per.get(ds.label, {})}
            if values:
                out.append((f"{ds.label} {key}", values))
    return out


def write_suite(results: Dict[str, Dict[str, Dict[str, Any]]], datasets: Sequence[SuiteDataset], out_dir: str
                ) -> Dict[str, Any]:
    """Write ``suite.json``, ``suite.csv`` and ``suite.png`` (without matplotlib: no PNG, a note) under
    ``out_dir``; returns the JSON object."""
    os.makedirs(out_dir, exist_ok=True)
    header, rows = suite_table(results, datasets)
    csv_path = os.path.join(out_dir, "suite.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    png_path = os.path.join(out_dir, "suite.png")
    note = plot_suite(headlines(results, datasets), png_path)
    report = {
        "models": list(results),
        "datasets": [{"label": d.label, "data": d.data, "task": d.task, "settings": d.settings} for d in datasets],
        "results": results,
        "files": {"json": os.path.join(out_dir, "suite.json"), "csv": csv_path, "png": None if note else png_path},
    }
    if note:
        report["note"] = note
    with open(report["files"]["json"], "w") as f:
        json.dump(report, f, indent=1)
    return report


def plot_suite(bars: List[Tuple[str, Dict[str, float]]], path: str) -> Optional[str]:
    """A grouped bar chart of ``bars`` (a group per figure, a bar per model) at ``path``; the reason
    when there is none (no matplotlib, nothing to draw), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no suite.png: matplotlib is not installed (pip install matplotlib)"
    if not bars:
        return "no suite.png: no figure to draw"
    models = list(dict.fromkeys(m for _, values in bars for m in values))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(bars) * max(1, len(models)) ** 0.5 + 2), 4.5))
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(bars))]
        ax.bar(xs, [values.get(model, 0.0) for _, values in bars], width, label=model)
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([name.replace(" ", "\n", 1) for name, _ in bars], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("eval suite")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def format_table(results: Dict[str, Dict[str, Dict[str, Any]]], datasets: Sequence[SuiteDataset]) -> str:
    """The headline figures as a readable table: a row per model."""
    bars = headlines(results, datasets)
    names = list(results)
    width = max(len("model"), *(len(n) for n in names))
    head = "model".ljust(width) + "".join(f"  {name}" for name, _ in bars)
    lines = [head]
    for n in names:
        cells = "".join(f"  {values[n]:.4f}".ljust(len(name) + 2) if n in values else "  -".ljust(len(name) + 2)
                        for name, values in bars)
        lines.append(n.ljust(width) + cells)
    return "\n".join(lines)
