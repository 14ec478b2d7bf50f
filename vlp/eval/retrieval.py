"""Image-text retrieval recall@k, one or several captions per image (clip_benchmark's metric).

Shapes: N images (samples), T captions, D embedding dim, Q queries in a block.

A sample's caption field may hold several captions, one per line (clip_benchmark's retrieval
shards); every caption counts. The positives of image i are the captions of the *same
sample* i, and the positive of a caption is its sample's image: retrieval is by sample
identity, not by caption text. Where captions repeat across samples (the digits set has
eight caption patterns per class), other samples' identical captions are not positives.

- text -> image (clip_benchmark's ``image_retrieval_recall@k``): a caption finds its image
  when fewer than k images score strictly higher than it; averaged over the T captions.
- image -> text (``text_retrieval_recall@k``): an image finds a caption when fewer than k
  captions score strictly higher than its best caption (at least one of its captions is in
  its top k); averaged over the N images, an image without captions counting as a miss.

Exact ties (identical captions embed identically) resolve in the positive's favour, so the
result does not depend on sample order; without ties it equals
``clip_benchmark.metrics.zeroshot_retrieval.evaluate``, which ranks by ``topk``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from tqdm import tqdm

from vlp import dist
from vlp.eval.common import encode, eval_mode, zeroshot_modality
from vlp.eval.registry import EVALUATORS, EvalContext

RECALL_AT = (1, 5, 10)


def embed_all(
    model, loader: Iterable[Dict[str, Any]], device: Any = "cpu", progress: bool = False, modality: str = "image",
    tokenizer: Optional[Callable] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, D) image (or audio) and (T, D) caption unit-norm embeddings, and (T,) each caption's image
    index, on the CPU, in loader order; over several ranks, every rank's samples (rank after rank) on
    every rank. With ``tokenizer`` every line of a sample's ``captions`` is a caption; without, or
    where batches carry no ``captions``, each sample's ``text`` is its one caption."""
    images, texts, owners = [], [], []
    n = 0
    with eval_mode(model):
        for batch in tqdm(loader, desc="retrieval", unit="batch", disable=not progress):
            images.append(encode(model, modality, batch[modality], device).float().cpu())
            if tokenizer is not None and "captions" in batch:
                lines = [c for caps in batch["captions"] for c in caps]
                owner = [n + i for i, caps in enumerate(batch["captions"]) for _ in caps]
                tokens = tokenizer(lines) if lines else None
            else:
                tokens, owner = batch["text"], list(range(n, n + len(images[-1])))
            if tokens is not None:
                texts.append(model.encode_text(tokens.to(device), normalize=True).float().cpu())
            owners.append(torch.tensor(owner, dtype=torch.long))
            n += len(images[-1])
    parts = dist.all_gather_object((images, texts, owners, n))  # recall@k does not depend on the sample order
    images, texts, owners, offset = [], [], [], 0
    for part_images, part_texts, part_owners, part_n in parts:
        images += part_images
        texts += part_texts
        owners += [o + offset for o in part_owners]
        offset += part_n
    if not images:
        raise ValueError("no samples in the eval data")
    if not texts:
        raise ValueError("no captions in the eval data (retrieval needs a caption field: data.text_key)")
    return torch.cat(images), torch.cat(texts), torch.cat(owners)


def positive_ranks(queries: torch.Tensor, keys: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """(N,) 0-based rank of key i among all keys for query i (the diagonal is the positive).

    Computed in blocks of queries so memory is O(block * N), not O(N^2)."""
    assert queries.shape == keys.shape, "one positive key per query"
    return text_to_image_ranks(queries, keys, torch.arange(len(queries)), block)


def text_to_image_ranks(text_emb: torch.Tensor, image_emb: torch.Tensor, owner: torch.Tensor,
                        block: int = 1024) -> torch.Tensor:
    """(T,) 0-based rank of each caption's image ``owner[t]`` among all images: those scoring strictly higher."""
    ranks = []
    for start in range(0, len(text_emb), block):
        scores = text_emb[start : start + block] @ image_emb.T  # (Q, N)
        positive = scores.gather(1, owner[start : start + block, None])  # (Q, 1)
        ranks.append((scores > positive).sum(dim=1))  # (Q,)
    return torch.cat(ranks)


def image_to_text_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor,
                        block: int = 1024) -> torch.Tensor:
    """(N,) 0-based rank of each image's best caption among all captions: those scoring strictly
    higher than it (T for an image without captions)."""
    ranks = []
    for start in range(0, len(image_emb), block):
        scores = image_emb[start : start + block] @ text_emb.T  # (Q, T)
        mine = owner[None, :] == torch.arange(start, start + len(scores))[:, None]  # (Q, T) its captions
        best = scores.masked_fill(~mine, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
        rank = (scores > best).sum(dim=1)  # (Q,)
        ranks.append(torch.where(mine.any(dim=1), rank, torch.full_like(rank, text_emb.shape[0])))
    return torch.cat(ranks)


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, modality: str = "image",
                owner: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Recall@k for k in 1, 5, 10 both ways from (N, D) image (or audio) and (T, D) caption embeddings,
    ``owner`` (T,) the image of each caption (default: caption i is image i's): ``image_to_text_R@k`` and
    ``text_to_image_R@k`` (``audio_...`` with ``modality="audio"``) and clip_benchmark's names for the
    same figures, ``text_retrieval_recall@k`` and ``image_retrieval_recall@k``."""
    owner = torch.arange(len(image_emb)) if owner is None else owner
    metrics: Dict[str, float] = {}
    for name, cb_name, ranks in (
        (f"{modality}_to_text", "text_retrieval", image_to_text_ranks(image_emb, text_emb, owner)),
        (f"text_to_{modality}", f"{modality}_retrieval", text_to_image_ranks(text_emb, image_emb, owner)),
    ):
        for k in RECALL_AT:
            metrics[f"{name}_R@{k}"] = metrics[f"{cb_name}_recall@{k}"] = float((ranks < k).double().mean())
    return metrics


def evaluate_retrieval(
    model, loader: Iterable[Dict[str, Any]], device: Any = "cpu", progress: bool = False, modality: str = "image",
    tokenizer: Optional[Callable] = None,
) -> Dict[str, Any]:
    """Recall@{1,5,10} both ways over every sample and caption of ``loader`` (module docstring), plus
    num_samples (images) and num_texts (captions)."""
    image_emb, text_emb, owner = embed_all(model, loader, device, progress, modality, tokenizer)
    return {**recall_at_k(image_emb, text_emb, modality, owner), "num_samples": len(image_emb),
            "num_texts": len(text_emb)}


@dataclass
class RetrievalSettings:
    data: Any = None  # shards, clip_benchmark root or split folder; default: data.val (training) or --data
    split: Optional[str] = None  # the split of a clip_benchmark dataset root given as data (default: test)
    modality: Optional[str] = None  # image | audio; default eval.modality, else image when the model has it


@EVALUATORS.register("retrieval", RetrievalSettings)
def run_retrieval(settings: RetrievalSettings, ctx: EvalContext) -> Dict[str, Any]:
    """Retrieval recall@k of the model on the eval data, every caption line counted (every rank its shards)."""
    loader = ctx.loader(ctx.data_for(settings))
    modality = zeroshot_modality(ctx.model, settings.modality if settings.modality is not None else ctx.modality)
    return evaluate_retrieval(ctx.model, loader, ctx.device, progress=ctx.progress, modality=modality,
                              tokenizer=ctx.tokenizer)
