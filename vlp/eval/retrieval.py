"""Image-text retrieval recall@k, one caption per image (open_clip's / clip_benchmark's metric).

Shapes: N samples, D embedding dim, Q queries in a block.

The positive of image i is the caption of the *same sample* i, and vice versa: retrieval
is by sample identity, not by caption text. Where captions repeat across samples (the
digits set has eight caption patterns per class), other samples' identical captions are
not positives. A positive's rank is 1 + the number of candidates scoring *strictly*
higher, so exact ties (identical captions embed identically) resolve in the positive's
favour and the result does not depend on sample order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from tqdm import tqdm

from vlp import dist
from vlp.eval.common import encode, eval_mode, zeroshot_modality
from vlp.eval.registry import EVALUATORS, EvalContext

RECALL_AT = (1, 5, 10)


def embed_all(
    model, loader: Iterable[Dict[str, Any]], device: Any = "cpu", progress: bool = False, modality: str = "image"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, D) image (or audio) and (N, D) text unit-norm embeddings of every sample, in loader order, on
    the CPU; over several ranks, every rank's samples (rank after rank) on every rank."""
    images, texts = [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc="retrieval", unit="batch", disable=not progress):
            images.append(encode(model, modality, batch[modality], device).float().cpu())
            texts.append(model.encode_text(batch["text"].to(device), normalize=True).float().cpu())
    parts = dist.all_gather_object((images, texts))  # recall@k does not depend on the sample order
    images, texts = [x for p in parts for x in p[0]], [t for p in parts for t in p[1]]
    if not images:
        raise ValueError("no samples in the eval data")
    return torch.cat(images), torch.cat(texts)


def positive_ranks(queries: torch.Tensor, keys: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """(N,) 0-based rank of key i among all keys for query i (the diagonal is the positive).

    Computed in blocks of queries so memory is O(block * N), not O(N^2)."""
    assert queries.shape == keys.shape, "one positive key per query"
    ranks = []
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ keys.T  # (Q, N)
        rows = torch.arange(scores.shape[0])
        positive = scores[rows, rows + start]  # (Q,)
        ranks.append((scores > positive[:, None]).sum(dim=1))  # (Q,) candidates strictly better
    return torch.cat(ranks)


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, modality: str = "image") -> Dict[str, float]:
    """image_to_text_R@k and text_to_image_R@k for k in 1, 5, 10, from (N, D) paired embeddings
    (``audio_to_text_R@k`` ... with ``modality="audio"``)."""
    metrics: Dict[str, float] = {}
    for name, ranks in (
        (f"{modality}_to_text", positive_ranks(image_emb, text_emb)),
        (f"text_to_{modality}", positive_ranks(text_emb, image_emb)),
    ):
        for k in RECALL_AT:
            metrics[f"{name}_R@{k}"] = float((ranks < k).double().mean())
    return metrics


def evaluate_retrieval(
    model, loader: Iterable[Dict[str, Any]], device: Any = "cpu", progress: bool = False, modality: str = "image"
) -> Dict[str, Any]:
    """Recall@{1,5,10} both ways over every sample of ``loader`` (see the module docstring), plus num_samples."""
    image_emb, text_emb = embed_all(model, loader, device, progress, modality)
    return {**recall_at_k(image_emb, text_emb, modality), "num_samples": len(image_emb)}


@dataclass
class RetrievalSettings:
    data: Any = None  # shards; default: the run's data.val (training) or --data
    modality: Optional[str] = None  # image | audio; default eval.modality, else image when the model has it


@EVALUATORS.register("retrieval", RetrievalSettings)
def run_retrieval(settings: RetrievalSettings, ctx: EvalContext) -> Dict[str, Any]:
    """Retrieval metrics of the model on the eval data (every rank its shards, features gathered)."""
    loader = ctx.loader(ctx.data_for(settings))
    modality = zeroshot_modality(ctx.model, settings.modality if settings.modality is not None else ctx.modality)
    return evaluate_retrieval(ctx.model, loader, ctx.device, progress=ctx.progress, modality=modality)
