"""Zero-shot classification: class-name prompts -> text classifier -> top-k on labelled images or audio.

Shapes: B batch, D embedding dim, C classes, T templates.

Class names and templates follow clip_benchmark's webdataset layout: ``classnames.txt``
(one name per line, in label order) and ``zeroshot_classification_templates.txt`` (one
prompt per line with a ``{c}`` placeholder) sit beside the shard folder or one level up
(``digits/val/*.tar`` + ``digits/classnames.txt``).

The classified input (``modality``) is ``image`` or ``audio`` (the batch field and the
model's ``encode_image`` / ``encode_audio``); by default the image when the model has an
image tower, else the audio (zero-shot keyword classification of ``vlp data tones``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import open_clip
import torch
from tqdm import tqdm

from vlp import dist
from vlp.data.shards import expand_spec
from vlp.eval.common import encode, eval_mode, zeroshot_modality
from vlp.eval.registry import EVALUATORS, EvalContext

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"

NamesOrFile = Optional[Union[str, Sequence[str]]]  # a path to a one-per-line file, or the names


def _read_lines(path: str) -> List[str]:
    with open(path) as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} is empty")
    return lines


def _data_dirs(data_spec: Any) -> List[str]:
    """Where the zero-shot files of ``data_spec`` may live: its shard folder and that folder's parent."""
    first = expand_spec(data_spec)[0]  # validates the spec: a clear error for missing data
    if first.startswith("pipe:") or "://" in first:
        return []  # remote shards: the files must be given explicitly
    folder = os.path.dirname(os.path.abspath(first))
    return [folder, os.path.dirname(folder)]


def _resolve(given: NamesOrFile, filename: str, dirs: List[str], what: str) -> List[str]:
    if given is not None and not isinstance(given, (str, os.PathLike)):
        return list(given)  # already the names/templates
    if given is not None:
        if not os.path.isfile(given):
            raise FileNotFoundError(f"{what} file not found: {given}")
        return _read_lines(str(given))
    for folder in dirs:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return _read_lines(path)
    where = " or ".join(dirs) if dirs else "(remote data: no folder to look in)"
    raise FileNotFoundError(f"no {filename} in {where}; pass the {what} file explicitly")


def read_classnames_templates(
    data_spec: Any, classnames: NamesOrFile = None, templates: NamesOrFile = None
) -> Tuple[List[str], List[str]]:
    """(classnames, templates): given ones (a file path or a list) win; else the files
    ``classnames.txt`` / ``zeroshot_classification_templates.txt`` beside ``data_spec``'s shards or one level up."""
    need_dirs = classnames is None or templates is None
    dirs = _data_dirs(data_spec) if need_dirs else []
    names = _resolve(classnames, CLASSNAMES_FILE, dirs, "classnames")
    prompts = _resolve(templates, TEMPLATES_FILE, dirs, "templates")
    for t in prompts:
        _check_template(t)
    return names, prompts


def _check_template(template: str) -> None:
    if "{c}" not in template and "{}" not in template:
        raise ValueError(f"template {template!r} has no {{c}} placeholder for the class name")


def _as_callable(template: str) -> Callable[[str], str]:
    # clip_benchmark's files use "{c}"; open_clip formats str templates positionally ("{}"),
    # so each template becomes a callable that fills either placeholder.
    _check_template(template)
    if "{c}" in template:
        return lambda c: template.format(c=c)
    return lambda c: template.format(c)


def zeroshot_classifier(
    model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[Any], device: Any = "cpu"
) -> torch.Tensor:
    """(D, C) unit-norm class embeddings: each class's template embeddings averaged (open_clip's builder)."""
    if not classnames or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    prompts = [_as_callable(t) if isinstance(t, str) else t for t in templates]
    with eval_mode(model):
        return open_clip.build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=list(classnames), templates=prompts, device=device
        )


class _Tally:
    """Running top-1/top-k hits and per-class counts over the labelled samples."""

    def __init__(self, num_classes: int, k: int):
        self.k = k
        self.top1 = 0
        self.topk = 0
        self.per_class_hits = torch.zeros(num_classes, dtype=torch.long)  # (C,)
        self.per_class_total = torch.zeros(num_classes, dtype=torch.long)  # (C,)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        # logits: (B, C), labels: (B,) all >= 0
        ranked = logits.topk(self.k, dim=1).indices  # (B, k)
        hit = ranked == labels[:, None]  # (B, k)
        self.top1 += int(hit[:, 0].sum())
        self.topk += int(hit.any(dim=1).sum())
        num_classes = self.per_class_total.numel()
        self.per_class_hits += torch.bincount(labels[hit[:, 0]], minlength=num_classes)
        self.per_class_total += torch.bincount(labels, minlength=num_classes)

    def reduce(self) -> None:
        """Add up every rank's counts (each rank tallied its own shards)."""
        counts = torch.cat([torch.tensor([self.top1, self.topk]), self.per_class_hits, self.per_class_total])
        counts = dist.all_reduce_sum(counts)
        c = self.per_class_hits.numel()
        self.top1, self.topk = int(counts[0]), int(counts[1])
        self.per_class_hits, self.per_class_total = counts[2 : 2 + c], counts[2 + c :]

    def result(self) -> Dict[str, Any]:
        n = int(self.per_class_total.sum())
        if n == 0:
            raise ValueError("no labelled samples in the eval data (zero-shot needs a class label per sample)")
        present = self.per_class_total > 0  # clip_benchmark: balanced accuracy over classes in the data
        recall = self.per_class_hits[present].double() / self.per_class_total[present]
        return {
            "top1": self.top1 / n,
            "top5": self.topk / n,
            "mean_per_class_recall": float(recall.mean()),
            "num_samples": n,
        }


def evaluate_zeroshot(
    model, loader: Iterable[Dict[str, Any]], classifier: torch.Tensor, device: Any = "cpu", progress: bool = False,
    modality: str = "image",
) -> Dict[str, Any]:
    """top1, top5 (top-min(5, C)), mean_per_class_recall, num_samples of the ``modality`` inputs;
    label -1 samples are ignored."""
    num_classes = classifier.shape[1]
    tally = _Tally(num_classes, k=min(5, num_classes))
    classifier = classifier.to(device)  # (D, C)
    with eval_mode(model):
        for batch in tqdm(loader, desc="zero-shot", unit="batch", disable=not progress):
            labels = batch["label"]  # (B,) on the CPU
            keep = labels >= 0
            if not keep.any():
                continue
            if int(labels.max()) >= num_classes:
                raise ValueError(f"label {int(labels.max())} out of range for {num_classes} class names")
            features = encode(model, modality, batch[modality][keep], device)  # (b, D)
            tally.add((features @ classifier).float().cpu(), labels[keep])  # logits (b, C)
    tally.reduce()  # every rank: the counts of all ranks' shards
    return tally.result()


@dataclass
class ZeroshotSettings:
    data: Any = None  # shards; default: the run's data.val (training) or --data
    classnames: Optional[str] = None  # a one-per-line file; default eval.classnames, else classnames.txt by the data
    templates: Optional[str] = None  # a file of prompts with {c}; default eval.templates, else the file by the data
    modality: Optional[str] = None  # image | audio; default eval.modality, else image when the model has it


@EVALUATORS.register("zeroshot", ZeroshotSettings)
def run_zeroshot(settings: ZeroshotSettings, ctx: EvalContext) -> Dict[str, Any]:
    """top1, top5, mean_per_class_recall, num_samples of zero-shot classification on the eval data.

    Class names and templates: the settings' files, else the run's (``eval.classnames`` /
    ``eval.templates``), else the files beside the data. One process reads every shard."""
    model = ctx.model
    modality = zeroshot_modality(model, settings.modality if settings.modality is not None else ctx.modality)
    data_spec = ctx.data_for(settings)
    names, prompts = read_classnames_templates(
        data_spec,
        settings.classnames if settings.classnames is not None else ctx.classnames,
        settings.templates if settings.templates is not None else ctx.templates,
    )
    classifier = zeroshot_classifier(model, ctx.tokenizer, names, prompts, ctx.device)  # (D, C)
    loader = ctx.loader(data_spec)
    return evaluate_zeroshot(model, loader, classifier, ctx.device, progress=ctx.progress, modality=modality)
