"""``vlp eval NAME``: one subcommand per registered evaluator, plus ``vlp eval continual``.

The subcommands are generated from ``vlp.eval.EVALUATORS``: every field of an evaluator's
settings dataclass becomes an option (``knn_k`` -> ``--knn-k``; a field's ``flags``
metadata adds aliases, e.g. ``--C`` or ``--no-cache``), with the field's comment as help.
Every subcommand also takes the model (``--checkpoint RUN_DIR`` or ``--config RECIPE``: the
recipe's model at random init), ``--data`` (default: the run's data.val), ``--batch-size``, ``--workers``,
``--device`` and ``--json``.

``vlp eval suite --model M [M ...] --datasets FILE [--out DIR] [--json]`` runs zero-shot,
retrieval and linear probe over a list of datasets for each model (``vlp/eval/suite.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any, Dict

import torch

from vlp import dist
from vlp.config import check_shards
from vlp.data.config import DataConfig
from vlp.eval import EVALUATORS, run_evaluator
from vlp.eval.continual import METRICS, run_continual_eval
from vlp.eval.suite import (
    SuiteModel,
    evaluate_suite,
    format_table,
    is_open_clip_model,
    load_open_clip,
    model_names,
    read_datasets,
    write_suite,
)
from vlp.objectives import build_objective
from vlp.registry import field_comments
from vlp.runs import eval_context, load_model_from_recipe, load_model_from_run, read_tasks, task_weights

CHECKPOINT_HELP = "RUN_DIR (its latest checkpoint), a checkpoint tag dir or a model.safetensors"
COMMON = ("data",)  # settings fields served by the common options (never an option of their own)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    names = [name.replace("_", "-") for name in EVALUATORS.list()]
    parser = subparsers.add_parser("eval", help=f"evaluate a checkpoint: {', '.join(names)}, continual, suite")
    tasks = parser.add_subparsers(dest="eval_task", required=True,
                                  metavar="{" + ",".join(names + ["continual", "suite"]) + "}")
    for name in EVALUATORS.list():
        entry = EVALUATORS.get(name)
        doc = (entry.builder.__doc__ or name).strip().splitlines()[0]
        p = tasks.add_parser(name.replace("_", "-"), help=doc, description=doc)
        _add_common(p)
        add_settings_options(p, entry.settings)
        p.set_defaults(func=_evaluate, evaluator=name)
    _add_continual_parser(tasks)
    _add_suite_parser(tasks)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    src.add_argument("--config", help="a recipe YAML: its model at random init (run.seed)")
    p.add_argument("--data", help="shard folder or brace pattern (default: the run's data.val)")
    p.add_argument("--batch-size", type=int, help="eval batch size (default: the run's eval.batch_size)")
    p.add_argument("--workers", type=int, help="data loader processes per rank (default: the run's data.workers)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a readable line")


def add_settings_options(p: argparse.ArgumentParser, settings: type, skip=()) -> None:
    """One option per settings field (but ``skip``); ``dest`` is ``setting_<field>`` (``settings_values``)."""
    hints = typing.get_type_hints(settings)
    helps = field_comments(settings)
    for f in dataclasses.fields(settings):
        if f.name in COMMON or f.name in skip:
            continue
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", ())]
        kind = _scalar(hints[f.name])
        dest, text = f"setting_{f.name}", helps.get(f.name) or f.name
        if kind is bool:  # a flag; one that is on by default is turned off by its last alias (--no-cache)
            on = f.default is True
            p.add_argument(*flags[-1:] if on else flags, dest=dest, action="store_false" if on else "store_true",
                           default=f.default, help=f"turn off: {text}" if on else text)
        else:
            p.add_argument(*flags, dest=dest, type=kind, default=f.default, metavar=f.name.upper(),
                           help=f"{text} (default: {f.default})" if f.default is not None else text)


def _scalar(hint) -> type:
    """The argparse type of a field: the non-None member of Optional[X]; str for Any."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    return hint if hint in (int, float, bool) else str


def settings_values(args) -> Dict[str, Any]:
    """The values of the options ``add_settings_options`` added."""
    return {k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_")}


def _settings(args) -> Dict[str, Any]:
    return {"name": args.evaluator, **settings_values(args)}


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(args):
    """(cfg, model, tokenizer, eval_transform) of --checkpoint or --config."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.checkpoint is not None:
        if not os.path.exists(args.checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        loaded = load_model_from_run(args.checkpoint, device=_device(args))
    else:
        loaded = load_model_from_recipe(args.config, device=_device(args))
    if args.batch_size is not None:
        loaded[0].eval.batch_size = args.batch_size
    if args.workers is not None:
        loaded[0].data.workers = args.workers
    return loaded


def _evaluate(args) -> int:
    """One process, or every rank of a launcher (torchrun ... -m vlp eval NAME): each rank reads
    its share of the shards and rank 0 prints the combined result."""
    distributed = dist.env_info().world_size > 1
    if distributed:
        info = dist.init_distributed()
        args.device = args.device or str(dist.device_for(info))
    try:
        metrics, cfg = _run_evaluator(args)
    finally:
        if distributed:
            dist.shutdown()
    if dist.env_info().rank == 0:
        _print(args, metrics, cfg)
    return 0


def _run_evaluator(args):
    for name in ("train", "val"):  # an evaluator's own data (linear probe): checked before any model loads
        value = settings_values(args).get(name)
        if value:
            check_shards(f"--{name}", value, other_forms=True)
    cfg, model, tokenizer, transform = _load(args)
    ctx = eval_context(cfg, model, tokenizer, transform, _device(args), data=args.data,
                       progress=sys.stderr.isatty() and dist.rank() == 0)
    if args.evaluator == "val_loss":
        ctx.objective = build_objective(cfg.objective)
    return run_evaluator(_settings(args), ctx), cfg


def _print(args, metrics: Dict[str, Any], cfg) -> None:
    if args.json:
        print(json.dumps(metrics))
        return
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    where = getattr(args, "setting_val", None) or args.data or cfg.data.val
    if getattr(args, "setting_split", None):
        where = f"{where} (split {args.setting_split})"
    print(f"{args.eval_task} on {where}: {shown}  (n={metrics.get('num_samples', metrics.get('num_val'))})")
    for example in metrics.get("examples", []):
        print(f"  label {example['label']}: {example['caption']}")


# ---- vlp eval continual: a run folder of task snapshots, not one model ------------------------------


def _add_continual_parser(tasks) -> None:
    ct = tasks.add_parser("continual", help="class-incremental accuracy and forgetting of a continual run's tasks")
    ct.add_argument("--checkpoint", required=True, help="RUN_DIR of a continual run (its tasks/ snapshots)")
    ct.add_argument("--data", help="shard folder or brace pattern (default: the run's data.val)")
    ct.add_argument("--classnames", help="one class name per line (default: classnames.txt beside or above --data)")
    ct.add_argument("--templates", help="zero-shot prompts with {c} (default: the file beside or above --data)")
    ct.add_argument("--batch-size", type=int, help="eval batch size (default: the run's eval.batch_size)")
    ct.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    ct.add_argument("--json", action="store_true", help="print one JSON object instead of readable lines")
    ct.set_defaults(func=_continual)


def _continual(args) -> int:
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"run folder not found: {args.checkpoint}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = _device(args)
    meta = read_tasks(args.checkpoint)
    load = lambda t: load_model_from_run(task_weights(args.checkpoint, t), device=device)  # noqa: E731
    metrics = run_continual_eval(meta, load, args.data, args.classnames, args.templates, args.batch_size,
                                 device=device, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"continual on {args.data or 'data.val'}: {metrics['tasks_done']} of {len(metrics['tasks'])} tasks "
          f"(n={metrics['num_samples']})")
    for name in (m for m in METRICS if m in metrics):
        m = metrics[name]
        per_task = " ".join(f"{a:.3f}" for a in m["accuracy"])
        print(f"  {name}: average_accuracy {m['average_accuracy']:.4f}  final_accuracy {m['final_accuracy']:.4f}  "
              f"average_forgetting {m['average_forgetting']:.4f}  (accuracy after each task: {per_task})")
    return 0


# ---- vlp eval suite: several models over a list of datasets, one table ----------------------------


def _add_suite_parser(tasks) -> None:
    st = tasks.add_parser("suite", help="zero-shot, retrieval and linear probe of models over a datasets file",
                          description="zero-shot, retrieval and linear probe of models over a datasets file "
                                      "(one dataset per line: DATA [TASK] [key=value ...]; docs/eval.md)")
    st.add_argument("--model", required=True, nargs="+", action="extend",
                    help="RUN_DIR (or a checkpoint / safetensors export), an open_clip export folder, or "
                         "open_clip:NAME[:PRETRAINED]; several: one row each")
    st.add_argument("--datasets", required=True, help="one dataset per line: DATA [TASK] [key=value ...]")
    st.add_argument("--dataset-root", help="where wds/NAME lines live: a folder template with {dataset} or "
                    "{dataset_cleaned}, as clip_benchmark's --dataset_root")
    st.add_argument("--out", default="eval_suite", help="folder for suite.json, suite.csv, suite.png "
                    "(default: %(default)s)")
    st.add_argument("--batch-size", type=int, default=256, help="eval batch size (default: %(default)s)")
    st.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    st.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    st.add_argument("--json", action="store_true", help="print the JSON report instead of a readable table")
    st.set_defaults(func=_suite)


def _suite_model(spec: str, name: str, device: str) -> SuiteModel:
    if is_open_clip_model(spec):
        model, tokenizer, transform = load_open_clip(spec, device)
        return SuiteModel(name, model, tokenizer, transform)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"model not found: {spec} (a run folder, an export folder or open_clip:NAME)")
    _, model, tokenizer, transform = load_model_from_run(spec, device=device)
    return SuiteModel(name, model, tokenizer, transform)


def _suite(args) -> int:
    """Every model on every dataset; over a launcher every rank evaluates its share, rank 0 writes."""
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"need --batch-size >= 1 and --workers >= 0, got {args.batch_size}, {args.workers}")
    datasets = read_datasets(args.datasets, args.dataset_root)  # checked before any model loads
    distributed = dist.env_info().world_size > 1
    if distributed:
        info = dist.init_distributed()
        args.device = args.device or str(dist.device_for(info))
    device = _device(args)
    main_rank = dist.env_info().rank == 0
    say = (lambda text: print(text, file=sys.stderr)) if main_rank and not args.json else None  # noqa: E731
    results = {}
    try:
        for spec, name in zip(args.model, model_names(args.model)):
            model = _suite_model(spec, name, device)
            results[name] = evaluate_suite(model, datasets, DataConfig(workers=args.workers), device,
                                           args.batch_size, dist.rank(), dist.world_size(),
                                           progress=sys.stderr.isatty() and main_rank, log=say)
    finally:
        if distributed:
            dist.shutdown()
    if not main_rank:
        return 0
    report = write_suite(results, datasets, args.out)
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_table(results, datasets))
    files = report["files"]
    print(f"wrote {files['csv']}, {files['json']}" + (f", {files['png']}" if files["png"] else ""))
    if "note" in report:
        print(report["note"])
    return 0
