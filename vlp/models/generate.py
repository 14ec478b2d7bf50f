"""Caption generation for CoCa models: greedy, beam search, top-k and top-p sampling.

Shapes: B images, N = B·beams rows being decoded, T tokens so far, Q image tokens,
W decoder width, V vocabulary.

open_clip's ``CoCa.generate`` needs ``transformers.BeamSearchScorer``, which transformers 5
removed, and recomputes the whole prefix at every step. Here the decoding loop is ours,
the logits processing is transformers' (repetition penalty, min length, top-k/top-p,
temperature), and the decoder runs with a key/value cache (``KVDecoder``): each new token
costs one query through the unimodal and multimodal layers instead of T; the image's
cross-attention keys/values are computed once. ``Recompute`` (``use_cache=False``) runs
the model's own forward on the whole prefix at every step: the reference the cache is
tested against, and the timing baseline (``vlp caption --no-cache``).

Generated captions never contain the start or pad token (they are suppressed), so the
prefix needs no padding mask; a row ends at the end token or ``max_length`` new tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from vlp.registry import Registry

# name -> decode(step, ids (N, 1) start tokens, GenerationConfig, SpecialIds, max new tokens) -> (B, T) ids
STRATEGIES: Registry = Registry("generation strategy")
DEAD = -1e9  # score of a beam that must never be extended


@dataclass
class GenerationConfig:
    strategy: str = "beam"  # beam | greedy | top_k | top_p
    num_beams: int = 6
    top_k: int = 10
    top_p: float = 0.9
    temperature: float = 1.0  # sampling only
    min_length: int = 1  # new tokens before the end token may come
    max_length: int = 0  # new tokens at most; 0 = up to the model's context
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the caption (CTRL's rule)
    length_penalty: float = 1.0  # beam: hypotheses ranked by sum log p / length ** length_penalty
    seed: Optional[int] = None  # sampling: a fixed torch seed


@dataclass(frozen=True)
class SpecialIds:
    sot: int
    eot: int
    pad: int


def special_ids(tokenizer, pad_id: int = 0) -> SpecialIds:
    """Start/end ids of an open_clip tokenizer (CLIP BPE or HF)."""
    if hasattr(tokenizer, "sot_token_id"):
        return SpecialIds(tokenizer.sot_token_id, tokenizer.eot_token_id, pad_id)
    hf = getattr(tokenizer, "tokenizer", None)
    sot = getattr(hf, "bos_token_id", None) or getattr(hf, "cls_token_id", None)
    eot = getattr(hf, "eos_token_id", None) or getattr(hf, "sep_token_id", None)
    if sot is None or eot is None:
        raise ValueError(f"cannot tell the start/end tokens of {type(tokenizer).__name__}; captioning needs both")
    pad = hf.pad_token_id if getattr(hf, "pad_token_id", None) is not None else pad_id
    return SpecialIds(sot, eot, pad)


def decode(tokenizer, ids: List[int], special: SpecialIds) -> str:
    """Text of one generated row (start token first), cut at the end token."""
    ids = [int(i) for i in ids[1:]]
    if special.eot in ids:
        ids = ids[: ids.index(special.eot)]
    ids = [i for i in ids if i != special.pad]
    if hasattr(tokenizer, "decode"):  # open_clip's SimpleTokenizer
        return tokenizer.decode(ids).strip()
    return tokenizer.tokenizer.decode(ids, skip_special_tokens=True).strip()


# ---- the decoder: next-token logits for a batch of prefixes --------------------------------


class Recompute:
    """No cache: the whole prefix through the unimodal and multimodal decoders every step."""

    def __init__(self, model, image_tokens: torch.Tensor):
        self.model, self.image_tokens = model, image_tokens  # (N, Q, D)
        self.tokens: Optional[torch.Tensor] = None

    def __call__(self, new: torch.Tensor) -> torch.Tensor:
        """Append ``new`` (N, 1) to the prefix; logits (N, V) for the token after it."""
        self.tokens = new if self.tokens is None else torch.cat([self.tokens, new], 1)  # (N, T)
        return self.model.caption_logits(self.image_tokens, self.tokens)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.tokens, self.image_tokens = self.tokens[index], self.image_tokens[index]


def _heads_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, t, w = x.shape
    return x.view(n, t, heads, w // heads).transpose(1, 2)  # (N, H, t, W/H)


def _attend(attn: torch.nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's output for queries (N, H, 1, W/H) over keys/values (N, H, t, W/H)."""
    o = F.scaled_dot_product_attention(q, k, v)  # the query may see every cached key: they are all earlier
    n, h, t, d = o.shape
    return attn.out_proj(o.transpose(1, 2).reshape(n, t, h * d))


class KVDecoder:
    """Incremental decoding with cached keys/values, computing exactly what the model's
    forward computes at the last position (tests/test_coca.py checks it against ``Recompute``)."""

    def __init__(self, model, image_tokens: torch.Tensor):
        from open_clip.transformer import ResidualAttentionBlock

        self.text, self.dec = model.text, model.text_decoder
        blocks = [*self.text.transformer.resblocks, *self.dec.resblocks, *self.dec.cross_attn]
        if not all(type(b) is ResidualAttentionBlock for b in blocks):
            raise ValueError("the key/value cache supports open_clip's default attention blocks; use use_cache=False")
        self.pos = 0
        self.self_kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # id(block) -> (N, H, T, W/H) each
        self.cross_kv = []  # per decoder layer: the image tokens' keys/values, computed once
        for block in self.dec.cross_attn:
            kv = block.ln_1_kv(image_tokens)  # (N, Q, D)
            w = block.attn.embed_dim
            k = F.linear(kv, block.attn.in_proj_weight[w : 2 * w], block.attn.in_proj_bias[w : 2 * w])
            v = F.linear(kv, block.attn.in_proj_weight[2 * w :], block.attn.in_proj_bias[2 * w :])
            self.cross_kv.append((_heads_split(k, block.attn.num_heads), _heads_split(v, block.attn.num_heads)))

    def _self_block(self, block, x: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        q, k, v = (_heads_split(t, attn.num_heads) for t in
                   F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1))
        if id(block) in self.self_kv:
            k0, v0 = self.self_kv[id(block)]
            k, v = torch.cat([k0, k], 2), torch.cat([v0, v], 2)  # (N, H, T, W/H)
        self.self_kv[id(block)] = (k, v)
        x = x + block.ls_1(_attend(attn, q, k, v))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _cross_block(self, block, x: torch.Tensor, kv) -> torch.Tensor:
        attn, w = block.attn, block.attn.embed_dim
        q = F.linear(block.ln_1(x), attn.in_proj_weight[:w], attn.in_proj_bias[:w])
        x = x + block.ls_1(_attend(attn, _heads_split(q, attn.num_heads), *kv))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def __call__(self, new: torch.Tensor) -> torch.Tensor:
        """Append ``new`` (N, 1) to the prefix; logits (N, V) for the token after it."""
        text = self.text
        x = text.token_embedding(new).to(text.transformer.get_cast_dtype())  # (N, 1, W)
        x = x + text.positional_embedding[self.pos : self.pos + 1].to(x.dtype)
        self.pos += 1
        for block in text.transformer.resblocks:  # unimodal: causal self-attention
            x = self._self_block(block, x)
        if text.cls_emb is None:  # open_clip returns LayerNorm'd tokens without a CLS token
            x = text.ln_final(x)
        for block, cross, kv in zip(self.dec.resblocks, self.dec.cross_attn, self.cross_kv):
            x = self._cross_block(cross, self._self_block(block, x), kv)
        x = self.dec.ln_final(x)
        return (x @ self.dec.text_projection)[:, -1]  # (N, V)

    def reorder(self, index: torch.Tensor) -> None:
        self.self_kv = {k: (a[index], b[index]) for k, (a, b) in self.self_kv.items()}
        self.cross_kv = [(a[index], b[index]) for a, b in self.cross_kv]


# ---- logits processing (transformers' processors) ------------------------------------------


def _processors(cfg: GenerationConfig, special: SpecialIds, sampling: bool):
    from transformers import (
        LogitsProcessorList,
        MinLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList([SuppressTokensLogitsProcessor(sorted({special.sot, special.pad}))])
    if cfg.min_length > 0:  # counts the start token: min_length new tokens before the end token
        procs.append(MinLengthLogitsProcessor(cfg.min_length + 1, special.eot))
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if sampling:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.strategy == "top_k":
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.strategy == "top_p":
            procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


def _validate(cfg: GenerationConfig) -> None:
    STRATEGIES.get(cfg.strategy)
    checks = [
        (cfg.num_beams >= 1, f"num_beams must be >= 1, got {cfg.num_beams}"),
        (cfg.top_k >= 1, f"top_k must be >= 1, got {cfg.top_k}"),
        (0.0 < cfg.top_p <= 1.0, f"top_p must be in (0, 1], got {cfg.top_p}"),
        (cfg.temperature > 0, f"temperature must be > 0, got {cfg.temperature}"),
        (cfg.min_length >= 0 and cfg.max_length >= 0, "min_length and max_length must be >= 0"),
        (cfg.repetition_penalty > 0, f"repetition_penalty must be > 0, got {cfg.repetition_penalty}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


# ---- strategies -----------------------------------------------------------------------------


@STRATEGIES.register("greedy")
def _greedy(step, ids: torch.Tensor, cfg: GenerationConfig, special: SpecialIds, steps: int) -> torch.Tensor:
    return _sample_loop(step, ids, cfg, special, steps, pick=lambda scores: scores.argmax(-1, keepdim=True))


@STRATEGIES.register("top_k")
@STRATEGIES.register("top_p")
def _sampling(step, ids: torch.Tensor, cfg: GenerationConfig, special: SpecialIds, steps: int) -> torch.Tensor:
    gen = torch.Generator(ids.device).manual_seed(cfg.seed) if cfg.seed is not None else None
    return _sample_loop(step, ids, cfg, special, steps,
                        pick=lambda scores: torch.multinomial(scores.softmax(-1), 1, generator=gen), sampling=True)


def _sample_loop(step, ids, cfg, special, steps: int, pick: Callable, sampling: bool = False) -> torch.Tensor:
    procs = _processors(cfg, special, sampling)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    logits = step(ids)  # (N, V)
    for _ in range(steps):
        scores = procs(ids, logits if logits.dtype == torch.float64 else logits.float())
        nxt = pick(scores)  # (N, 1)
        nxt = torch.where(done[:, None], torch.full_like(nxt, special.pad), nxt)
        ids = torch.cat([ids, nxt], 1)
        done |= nxt[:, 0] == special.eot
        if bool(done.all()):
            break
        logits = step(nxt)
    return ids


@STRATEGIES.register("beam")
def _beam(step, ids: torch.Tensor, cfg: GenerationConfig, special: SpecialIds, steps: int) -> torch.Tensor:
    """Beam search: per image the ``num_beams`` best open prefixes by summed log-probability;
    a prefix that ends (end token, or ``max_length``) becomes a hypothesis scored
    sum / length ** length_penalty. Stops when no open prefix can beat an image's worst kept
    hypothesis (transformers' heuristic); returns each image's best hypothesis."""
    k, procs = cfg.num_beams, _processors(cfg, special, sampling=False)
    b = len(ids) // k
    scores = torch.zeros(b, k, dtype=torch.float64, device=ids.device)
    scores[:, 1:] = DEAD  # the k beams start identical: expand the first only
    hyps: List[List[Tuple[float, List[int]]]] = [[] for _ in range(b)]
    logits = step(ids)  # (b·k, V)
    for t in range(1, steps + 1):
        logp = procs(ids, F.log_softmax(logits.double(), -1))  # (b·k, V)
        v = logp.shape[-1]
        top, idx = (scores.view(-1, 1) + logp).view(b, k * v).topk(2 * k, dim=1)  # (b, 2k)
        kept: List[Tuple[int, int, float]] = []  # (row, token, score) of the next open beams
        for i in range(b):
            beams = []
            for rank, (score, j) in enumerate(zip(top[i].tolist(), idx[i].tolist())):
                row, tok = i * k + j // v, j % v
                if score <= DEAD / 2:
                    break
                if tok == special.eot or t == steps:
                    if rank < k:  # as transformers: an ending candidate counts if it ranks in the top k
                        _add_hyp(hyps[i], k, score / t**cfg.length_penalty, ids[row].tolist() + [tok])
                elif len(beams) < k:
                    beams.append((row, tok, score))
            beams += [(i * k, special.pad, DEAD)] * (k - len(beams))  # tiny vocabularies: dead fillers
            kept += beams
        if t == steps or all(_finished(hyps[i], k, kept[i * k][2], t, cfg) for i in range(b)):
            break
        index = torch.tensor([r for r, _, _ in kept], device=ids.device)
        nxt = torch.tensor([tok for _, tok, _ in kept], device=ids.device)[:, None]  # (b·k, 1)
        ids = torch.cat([ids[index], nxt], 1)
        scores = torch.tensor([s for _, _, s in kept], dtype=torch.float64, device=ids.device).view(b, k)
        step.reorder(index)
        logits = step(nxt)
    best = [max(h, key=lambda s: s[0])[1] if h else [special.sot, special.eot] for h in hyps]
    out = torch.full((b, max(map(len, best))), special.pad, dtype=torch.long, device=ids.device)
    for i, seq in enumerate(best):
        out[i, : len(seq)] = torch.tensor(seq)
    return out


def _add_hyp(hyps: List, k: int, score: float, seq: List[int]) -> None:
    hyps.append((score, seq))
    hyps.sort(key=lambda s: -s[0])
    del hyps[k:]


def _finished(hyps: List, k: int, best_open: float, t: int, cfg: GenerationConfig) -> bool:
    return len(hyps) >= k and best_open / (t ** cfg.length_penalty) <= hyps[-1][0]


# ---- entry point --------------------------------------------------------------------------


@torch.no_grad()
def generate(model, images: torch.Tensor, special: SpecialIds, cfg: GenerationConfig = GenerationConfig(),
             use_cache: bool = True) -> torch.Tensor:
    """Token ids (B, T) of one caption per image (B, 3, H, W): the start token first, then the
    caption, its end token and pad after it."""
    _validate(cfg)
    was_training = model.training
    model.eval()
    try:
        beams = cfg.num_beams if cfg.strategy == "beam" else 1
        images = images.repeat_interleave(beams, 0)  # (N, 3, H, W)
        _, image_tokens = model._encode_image(images)  # (N, Q, D)
        step = KVDecoder(model, image_tokens) if use_cache else Recompute(model, image_tokens)
        room = model.text.context_length - 1  # the start token takes a position
        steps = min(cfg.max_length, room) if cfg.max_length else room
        ids = torch.full((len(images), 1), special.sot, dtype=torch.long, device=images.device)
        return STRATEGIES.get(cfg.strategy).builder(step, ids, cfg, special, steps)
    finally:
        model.train(was_training)
