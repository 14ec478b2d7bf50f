"""Captioning eval of a CoCa checkpoint: caption loss / perplexity and generated captions.

Shapes: B batch, L-1 caption positions, V vocabulary.

- ``caption_loss``: the mean cross-entropy of the reference captions' tokens (teacher
  forcing, pad ignored; the end token counts), ``perplexity`` = exp of it;
- with labels and class names (``classnames.txt`` beside or above the data, as zero-shot):
  ``names_class``, the fraction of generated captions that name their image's class and
  no other. A caption names a class when it holds the class name as whole words, or, on the
  built-in digits (class names ``zero`` ... ``nine``), the digit as a numeral ("a handwritten
  7"), since the digits captions use both;
- ``bleu``: corpus BLEU (sacreBLEU, 0-100) of the generated captions against each image's
  reference caption (decoded from the same tokens), when ``sacrebleu`` is installed
  (``pip install vlp[caption]``).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch.nn.functional as F
from tqdm import tqdm

from vlp import dist
from vlp.data.digits import CLASSNAMES as DIGITS
from vlp.eval.common import eval_mode, image_dtype
from vlp.eval.registry import EVALUATORS, EvalContext
from vlp.eval.zeroshot import read_classnames_templates
from vlp.models.generate import GenerationConfig, SpecialIds, decode, generate, special_ids


def class_patterns(classnames: Sequence[str]) -> List[re.Pattern]:
    """One whole-word pattern per class; the digits' numerals join their words."""
    numerals = [name.lower() for name in classnames] == DIGITS
    pats = []
    for i, name in enumerate(classnames):
        alts = [re.escape(name.lower())] + ([str(i)] if numerals else [])
        pats.append(re.compile(r"(?<!\w)(" + "|".join(alts) + r")(?!\w)"))
    return pats


def named_classes(caption: str, patterns: Sequence[re.Pattern]) -> List[int]:
    text = caption.lower()
    return [i for i, p in enumerate(patterns) if p.search(text)]


def corpus_bleu(hyps: List[str], refs: List[str]) -> Optional[float]:
    """sacreBLEU corpus BLEU of ``hyps`` against one reference each; None without sacrebleu."""
    try:
        import sacrebleu
    except ImportError:
        return None
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def evaluate_captions(
    model, loader: Iterable[Dict[str, Any]], tokenizer: Callable, special: SpecialIds,
    gen: GenerationConfig = GenerationConfig(), classnames: Optional[Sequence[str]] = None,
    device: Any = "cpu", progress: bool = False, examples: int = 5, use_cache: bool = True,
) -> Dict[str, Any]:
    """caption_loss, perplexity, num_samples, num_tokens, and with ``classnames`` and labels
    names_class; generation_seconds and seconds_per_token (per generated caption token, the
    end token included); ``examples`` first generated captions with their labels."""
    patterns = class_patterns(classnames) if classnames else None
    ce_sum, n_tokens, n, right, judged, shown = 0.0, 0, 0, 0, 0, []
    gen_seconds, gen_tokens, hyps, refs = 0.0, 0, [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc="caption", unit="batch", disable=not progress):
            images = batch["image"].to(device, image_dtype(model))  # (B, 3, H, W)
            out = model({"image": images, "text": batch["text"].to(device)})
            logits, labels = out["caption_logits"].float(), out["caption_labels"]  # (B, L-1, V), (B, L-1)
            ce_sum += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
            n_tokens += int((labels != -100).sum())
            t0 = time.perf_counter()
            ids = generate(model, images, special, gen, use_cache=use_cache)  # (B, T)
            gen_seconds += time.perf_counter() - t0
            gen_tokens += int(((ids[:, 1:] != special.pad) & (ids[:, 1:] != special.sot)).sum())
            captions = [decode(tokenizer, row, special) for row in ids.tolist()]
            hyps += captions
            refs += [decode(tokenizer, row, special) for row in batch["text"].tolist()]
            n += len(captions)
            label_list = batch["label"].tolist() if "label" in batch else [-1] * len(captions)
            for caption, label in zip(captions, label_list):
                if patterns is not None and label >= 0:
                    judged += 1
                    right += named_classes(caption, patterns) == [label]
                if len(shown) < examples:
                    shown.append({"caption": caption, "label": label})
    # every rank scored its own shards: add the counts up, keep the captions in rank order
    parts = dist.all_gather_object((ce_sum, n_tokens, n, right, judged, gen_seconds, gen_tokens, hyps, refs, shown))
    ce_sum, n_tokens, n, right, judged, gen_seconds, gen_tokens = (sum(p[i] for p in parts) for i in range(7))
    hyps, refs = [h for p in parts for h in p[7]], [r for p in parts for r in p[8]]
    shown = [s for p in parts for s in p[9]][:examples]
    loss = ce_sum / max(n_tokens, 1)
    result: Dict[str, Any] = {"caption_loss": loss, "perplexity": math.exp(loss), "num_samples": n,
                              "num_tokens": n_tokens, "generation_seconds": gen_seconds,
                              "seconds_per_token": gen_seconds / max(gen_tokens, 1)}
    if judged:
        result.update(names_class=right / judged, num_judged=judged)
    bleu = corpus_bleu(hyps, refs)
    if bleu is not None:
        result["bleu"] = bleu
    result["examples"] = shown
    return result


@dataclass
class CaptionSettings:
    data: Any = None  # shards; default: the run's data.val (training) or --data
    classnames: Optional[str] = None  # one class name per line; default: classnames.txt by the data, if there
    strategy: str = "beam"  # decoding: beam | greedy | top_k | top_p
    num_beams: int = field(default=6, metadata={"flags": ["--beams"]})  # beam search width
    top_k: int = 10  # top_k: sample among the k likeliest tokens
    top_p: float = 0.9  # top_p: sample within probability mass p
    temperature: float = 1.0  # sampling temperature
    min_length: int = 1  # tokens before the end token may come
    max_length: int = 0  # new tokens at most; 0: the model's context
    repetition_penalty: float = 1.0  # > 1 discourages repeats
    length_penalty: float = 1.0  # beam: hypotheses ranked by sum log p / length ** length_penalty
    seed: Optional[int] = None  # sampling seed
    use_cache: bool = field(default=True, metadata={"flags": ["--no-cache"]})  # key/value cache while decoding

    def generation(self) -> GenerationConfig:
        return GenerationConfig(**{f.name: getattr(self, f.name) for f in fields(GenerationConfig)})


@EVALUATORS.register("caption", CaptionSettings)
def run_caption_eval(settings: CaptionSettings, ctx: EvalContext) -> Dict[str, Any]:
    """``evaluate_captions`` on the eval data; class names from ``settings.classnames`` (a file),
    else beside/above the data when there (else no names_class)."""
    model = ctx.model
    if not hasattr(model, "text_decoder"):  # the CoCa decoder (vlp/models/coca.py)
        raise ValueError("the caption evaluator needs a captioning model (model.kind: coca)")
    data_spec = ctx.data_for(settings)
    names = None
    try:
        names, _ = read_classnames_templates(data_spec, settings.classnames, templates=["{c}"])
    except FileNotFoundError:
        if settings.classnames is not None:
            raise
    loader = ctx.loader(data_spec)
    special = special_ids(ctx.tokenizer, pad_id=getattr(model, "pad_id", 0))
    return evaluate_captions(model, loader, ctx.tokenizer, special, settings.generation(), names, ctx.device,
                             ctx.progress, use_cache=settings.use_cache)
