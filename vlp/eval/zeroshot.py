"""Zero-shot classification: class-name prompts -> text classifier -> top-k on labelled images or audio.

Shapes: B batch, D embedding dim, C classes, T templates.

Class names and templates follow clip_benchmark's webdataset layout: ``classnames.txt``
(one name per line, in label order) and ``zeroshot_classification_templates.txt`` (one
prompt per line with a ``{c}`` placeholder) sit beside the shard folder or one level up
(``digits/val/*.tar`` + ``digits/classnames.txt``). Given ones win: a file, or a built-in
name: class names ``imagenet1k``, templates ``openai`` (CLIP's 80 ImageNet prompts) or
``simple`` (open_clip's 7), all from ``open_clip.zero_shot_metadata``. An image folder's
class names default to its folder names (``vlp/data/folders.py``).

Besides ``top1``/``top5`` the result carries clip_benchmark's names: ``acc1``, ``acc5`` (with
5 classes or more, as clip_benchmark) and ``mean_per_class_recall`` (balanced accuracy over
the classes present), equal to ``clip_benchmark.metrics.zeroshot_classification.evaluate``.

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
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from tqdm import tqdm

from vlp import dist
from vlp.data.clip_benchmark import dataset_type
from vlp.data.folders import folder_classes, folder_classnames, is_image_folder
from vlp.data.shards import expand_spec
from vlp.eval.common import encode, eval_mode, zeroshot_modality
from vlp.eval.registry import EVALUATORS, EvalContext

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"

NamesOrFile = Optional[Union[str, Sequence[str]]]  # a one-per-line file, a built-in name, or the names

BUILTIN_CLASSNAMES = {"imagenet1k": IMAGENET_CLASSNAMES}  # --classnames NAME
BUILTIN_TEMPLATES = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}  # --templates NAME


def _read_lines(path: str) -> List[str]:
    with open(path) as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path} is empty")
    return lines


def _data_dirs(data_spec: Any) -> List[str]:
    """Where the zero-shot files of ``data_spec`` may live: its shard (or image) folder and that folder's parent."""
    if is_image_folder(data_spec):
        folder = os.path.abspath(str(data_spec))
        return [folder, os.path.dirname(folder)]
    first = expand_spec(data_spec)[0]  # validates the spec: a clear error for missing data
    if first.startswith("pipe:") or "://" in first:
        return []  # remote shards: the files must be given explicitly
    folder = os.path.dirname(os.path.abspath(first))
    return [folder, os.path.dirname(folder)]


def _resolve(given: NamesOrFile, filename: str, dirs: List[str], what: str, builtin: Dict[str, Sequence[Any]],
             fallback: Optional[List[str]] = None) -> List[Any]:
    if given is not None and not isinstance(given, (str, os.PathLike)):
        return list(given)  # already the names/templates
    if given is not None:
        if os.path.isfile(given):
            return _read_lines(str(given))
        if str(given) in builtin:
            return list(builtin[str(given)])
        if os.sep in str(given) or "." in os.path.basename(str(given)):
            raise FileNotFoundError(f"{what} file not found: {given}")
        raise ValueError(f"unknown built-in {what} {str(given)!r} (and no such file); built-in: {', '.join(builtin)}")
    for folder in dirs:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return _read_lines(path)
    if fallback is not None:
        return fallback
    where = " or ".join(dirs) if dirs else "(remote data: no folder to look in)"
    raise FileNotFoundError(f"no {filename} in {where}; pass --{what} FILE or a built-in name "
                            f"({', '.join(builtin)})")


def read_classnames_templates(
    data_spec: Any, classnames: NamesOrFile = None, templates: NamesOrFile = None
) -> Tuple[List[str], List[Any]]:
    """(classnames, templates): given ones (a file path, a built-in name or a list) win; else the files
    ``classnames.txt`` / ``zeroshot_classification_templates.txt`` beside ``data_spec``'s shards or one
    level up; an image folder's class names, else, are its folder names. A template is a string with
    ``{c}`` (or ``{}``) or a callable (open_clip's built-in ones)."""
    need_dirs = classnames is None or templates is None
    dirs = _data_dirs(data_spec) if need_dirs else []
    folder_names = folder_classnames(str(data_spec)) if classnames is None and is_image_folder(data_spec) else None
    names = _resolve(classnames, CLASSNAMES_FILE, dirs, "classnames", BUILTIN_CLASSNAMES, folder_names)
    prompts = _resolve(templates, TEMPLATES_FILE, dirs, "templates", BUILTIN_TEMPLATES)
    for t in prompts:
        if isinstance(t, str):
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
        result = {"top1": self.top1 / n, "top5": self.topk / n, "mean_per_class_recall": float(recall.mean()),
                  "num_samples": n, "acc1": self.top1 / n}  # acc1, acc5: clip_benchmark's names
        if self.per_class_total.numel() >= 5:  # clip_benchmark reports no acc5 below 5 classes (NaN)
            result["acc5"] = self.topk / n
        return result


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
    data: Any = None  # shards, clip_benchmark root or split folder, image folder; default: data.val or --data
    split: Optional[str] = None  # the split of a clip_benchmark dataset root given as data (default: test)
    classnames: Optional[str] = None  # file or built-in (imagenet1k); default eval.classnames, classnames.txt, folders
    templates: Optional[str] = None  # file of {c} prompts or built-in (openai, simple); default eval.templates, file
    modality: Optional[str] = None  # image | audio; default eval.modality, else image when the model has it


@EVALUATORS.register("zeroshot", ZeroshotSettings)
def run_zeroshot(settings: ZeroshotSettings, ctx: EvalContext) -> Dict[str, Any]:
    """top1, top5, mean_per_class_recall, num_samples of zero-shot classification on the eval data.

    Class names and templates: the settings' (files or built-in names), else the run's
    (``eval.classnames`` / ``eval.templates``), else the files beside the data. Every rank reads
    its share of the data and the counts are added up."""
    model = ctx.model
    modality = zeroshot_modality(model, settings.modality if settings.modality is not None else ctx.modality)
    data_spec = ctx.data_for(settings)
    kind = dataset_type(data_spec)
    if kind != "classification":
        raise ValueError(f"zero-shot classification needs a classification dataset; {data_spec} is {kind} "
                         f"(its dataset_type.txt)")
    names, prompts = read_classnames_templates(
        data_spec,
        settings.classnames if settings.classnames is not None else ctx.classnames,
        settings.templates if settings.templates is not None else ctx.templates,
    )
    if is_image_folder(data_spec) and len(folder_classes(str(data_spec))) != len(names):
        raise ValueError(f"image folder {data_spec} has {len(folder_classes(str(data_spec)))} class folders "
                         f"but {len(names)} class names are given")
    classifier = zeroshot_classifier(model, ctx.tokenizer, names, prompts, ctx.device)  # (D, C)
    loader = ctx.loader(data_spec)
    return evaluate_zeroshot(model, loader, classifier, ctx.device, progress=ctx.progress, modality=modality)
