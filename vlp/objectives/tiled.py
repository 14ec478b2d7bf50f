"""Tiled InfoNCE: the contrastive loss without ever holding the (b, N) logits.

Shapes: b = rows of A (this rank's rows), N = rows of C (the gathered columns),
D = embedding dim, T = tile size. ``z = s·A·Cᵀ`` exists only one (T, T) tile at a time,
so memory is O((b + N)·D + T²) instead of O(b·N).

The only part of the cross-entropy that couples all columns is the log-partition;
``tiled_lse`` computes it and its gradient with a custom autograd Function:

    lse_row_i = log Σ_j exp(z_ij)            lse_col_j = log Σ_i exp(z_ij)
    G_ij = g_i·exp(z_ij − lse_row_i) + h_j·exp(z_ij − lse_col_j)     (g, h: upstream grads)
    ∂A = s·G·C      ∂C = s·Gᵀ·A      ∂s = Σ_ij G_ij a_i·c_j = Σ_i a_i·(G·C)_i

Forward: one matmul per tile, per-tile LSEs merged online with ``logaddexp``; only the
(b,) and (N,) LSE vectors are saved. Backward: the tile's logits are recomputed and both
softmaxes come from the same tile, two more matmuls. Cost in multiply-adds: on one
process both directions come from X·Yᵀ, 4·N²·D against the plain loss's 6·N²·D (two
logit matrices, each backpropagated to both inputs); on W ranks the two directions are
different (b, N) slabs, 2 × 4·b·N·D per rank against 6·b·N·D: tiling then trades time
for memory. The target terms of the cross-entropy are O(b·D) and left to autograd:

    CE_ε(row i) = lse_row_i − (1 − ε)·z_{i,pos(i)} − ε·mean_j z_ij,   mean_j z_ij = s·a_i·mean(C)

Kept tiles. With ``keep_bytes`` > 0 the forward keeps its logit tiles, up to that many bytes, and the
backward uses them instead of recomputing them: each kept tile saves one of its three backward
matmuls (all kept: 3·N²·D multiply-adds instead of 4). The kept logits are the recomputed ones bit for
bit, so the loss and gradients do not change; memory grows by the kept tiles (N² floats for all).

Fused tiles. The elementwise work on a tile (the two LSEs in the forward; G in the backward)
is as much time as its matmul when done op by op (each op one pass over T² floats). Large
float32 tiles (≥ ``FUSE_MIN_ELEMS``) run it as ``torch.compile``d kernels instead: the forward's
max / exp / sum / log for rows and columns, and the backward's whole G, one generated loop
each (CPU: C++ through gcc; CUDA: Triton). Compiled once per tile shape (cached on disk by
Inductor); if compiling fails, or ``VLP_TILED_COMPILE=0``, the eager ops below are used.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional, Tuple

import torch

Span = Tuple[int, int]


def _spans(n: int, tile: int) -> List[Span]:
    return [(i, min(i + tile, n)) for i in range(0, n, tile)]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # half-precision reps: accumulate the LSEs and gradients in float32
    return torch.promote_types(t.dtype, torch.float32)


def _tile_lse(z: torch.Tensor, dim: int, work: torch.Tensor) -> torch.Tensor:
    """logsumexp of tile ``z`` (tb, tc) along ``dim``, using ``work`` (same shape) as scratch."""
    m = z.amax(dim, keepdim=True)  # stabiliser: exp ≤ 1
    torch.sub(z, m, out=work).exp_()
    return work.sum(dim).log_().add_(m.squeeze(dim))


class _Workspace:
    """Two reusable (T, T) buffers; edge tiles use a contiguous prefix of the same storage."""

    def __init__(self, tile: int, like: torch.Tensor):
        self.z = like.new_empty(tile * tile)
        self.w = like.new_empty(tile * tile)

    def views(self, rows: int, cols: int) -> Tuple[torch.Tensor, torch.Tensor]:
        n = rows * cols
        return self.z[:n].view(rows, cols), self.w[:n].view(rows, cols)


# ---- fused tile kernels (module doc, "Fused tiles") ----------------------------------------

FUSE_MIN_ELEMS = 1 << 18  # tiles of at least this many logits (512 x 512) use the compiled kernels
_FUSED: dict = {}  # name -> compiled fn, or None once compiling failed


def _fused_lse(z: torch.Tensor, lse_r: torch.Tensor, lse_c: torch.Tensor):
    """Running (row, column) LSEs merged with tile ``z``'s; lse_c may be (0,): rows only."""
    m = z.amax(1, keepdim=True)
    row = torch.logaddexp(lse_r, (z - m).exp().sum(1).log() + m.squeeze(1))
    if lse_c.numel() == 0:
        return row, lse_c
    mc = z.amax(0, keepdim=True)
    return row, torch.logaddexp(lse_c, (z - mc).exp().sum(0).log() + mc.squeeze(0))


def _fused_grad(z, lse_r, g_r, lse_c, g_c) -> torch.Tensor:
    """G of one tile: g_i·softmax_row + h_j·softmax_col."""
    return (z - lse_r[:, None]).exp() * g_r[:, None] + (z - lse_c[None, :]).exp() * g_c[None, :]


def _fused_grad_rows(z, lse_r, g_r) -> torch.Tensor:
    return (z - lse_r[:, None]).exp() * g_r[:, None]


def _use_fused(z: torch.Tensor) -> bool:
    if os.environ.get("VLP_TILED_COMPILE", "1") == "0" or z.dtype != torch.float32:
        return False
    return z.numel() >= FUSE_MIN_ELEMS and z.device.type in ("cpu", "cuda")


def _kernel(fn: Callable) -> Optional[Callable]:
    """``torch.compile(fn)``, built once; None (the eager path) where compiling is unavailable."""
    name = fn.__name__
    if name not in _FUSED:
        try:
            _FUSED[name] = torch.compile(fn, dynamic=False, fullgraph=True)
        except Exception as e:  # noqa: BLE001 - any backend failure means: use the eager ops
            warnings.warn(f"tiled InfoNCE: torch.compile unavailable ({e}); using eager tile ops")
            _FUSED[name] = None
    return _FUSED[name]


def _run_fused(fn: Callable, *args):
    """The compiled ``fn(*args)``, or None where it cannot run (then it is not tried again)."""
    kernel = _kernel(fn)
    if kernel is None:
        return None
    try:
        return kernel(*args)
    except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler: fall back for good
        warnings.warn(f"tiled InfoNCE: compiled tile kernel failed ({type(e).__name__}: {e}); using eager ops")
        _FUSED[fn.__name__] = None
        return None


def _lse_pass(a_s, c, tile: int, cols: bool, keep_bytes: int = 0):
    """Row (and column) LSE of ``a_s·Cᵀ`` (a_s = s·A), one tile at a time; and the logit tiles kept
    for the backward, {(i0, j0): tile}, while they fit in ``keep_bytes``."""
    lse_r = a_s.new_full((a_s.shape[0],), float("-inf"))  # (b,)
    lse_c = a_s.new_full((c.shape[0] if cols else 0,), float("-inf"))  # (N,) or (0,)
    ws = _Workspace(tile, a_s)
    kept: dict = {}
    for i0, i1 in _spans(a_s.shape[0], tile):
        for j0, j1 in _spans(c.shape[0], tile):
            z, w = ws.views(i1 - i0, j1 - j0)
            size = (i1 - i0) * (j1 - j0) * z.element_size()
            if size <= keep_bytes:
                z = kept[(i0, j0)] = z.new_empty(i1 - i0, j1 - j0)  # neither LSE path writes into z
                keep_bytes -= size
            torch.mm(a_s[i0:i1], c[j0:j1].T, out=z)  # (tb, tc) logits
            lc = lse_c[j0:j1] if cols else lse_c
            fused = _run_fused(_fused_lse, z, lse_r[i0:i1], lc) if _use_fused(z) else None
            if fused is not None:
                lse_r[i0:i1] = fused[0]
                if cols:
                    lse_c[j0:j1] = fused[1]
                continue
            torch.logaddexp(lse_r[i0:i1], _tile_lse(z, 1, w), out=lse_r[i0:i1])
            if cols:
                torch.logaddexp(lse_c[j0:j1], _tile_lse(z, 0, w), out=lse_c[j0:j1])
    return lse_r, lse_c, kept


def _tile_grad(z, p, lse_r, g_r, lse_c, g_c) -> torch.Tensor:
    """G for one tile into ``p``: g_i·softmax_row + h_j·softmax_col; overwrites ``z``."""
    torch.sub(z, lse_r[:, None], out=p).exp_().mul_(g_r[:, None])
    if g_c is not None:
        z.sub_(lse_c[None, :]).exp_().mul_(g_c[None, :])
        p.add_(z)
    return p


def _grad_pass(a, c, s, lse_r, g_r, lse_c, g_c, tile: int, need_c: bool, kept: Optional[dict] = None):
    """(G·C, Gᵀ·A) accumulated tile by tile with the logits recomputed (or taken, and freed, from the
    forward's ``kept`` tiles); no s factor yet."""
    kept = {} if kept is None else kept
    a_s = a * s
    ga = torch.zeros_like(a)  # (b, D)
    gc = torch.zeros_like(c) if need_c else None  # (N, D)
    ws = _Workspace(tile, a)
    for i0, i1 in _spans(a.shape[0], tile):
        for j0, j1 in _spans(c.shape[0], tile):
            z, p = ws.views(i1 - i0, j1 - j0)
            if (i0, j0) in kept:
                z = kept.pop((i0, j0))  # the forward's logits: what the matmul would give again
            else:
                torch.mm(a_s[i0:i1], c[j0:j1].T, out=z)
            gcol = None if g_c is None else g_c[j0:j1]
            lcol = None if g_c is None else lse_c[j0:j1]
            fused = None
            if _use_fused(z):
                fused = (_run_fused(_fused_grad_rows, z, lse_r[i0:i1], g_r[i0:i1]) if gcol is None else
                         _run_fused(_fused_grad, z, lse_r[i0:i1], g_r[i0:i1], lcol, gcol))
            p = fused if fused is not None else _tile_grad(z, p, lse_r[i0:i1], g_r[i0:i1], lcol, gcol)  # (tb, tc)
            ga[i0:i1].addmm_(p, c[j0:j1])
            if need_c:
                gc[j0:j1].addmm_(p.T, a[i0:i1])
    return ga, gc


class _TiledLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, c, scale, tile: int, cols: bool, keep_bytes: int):
        dt = _compute_dtype(a)
        s = scale.to(dt)
        lse_r, lse_c, ctx.kept = _lse_pass(a.to(dt) * s, c.to(dt), tile, cols, keep_bytes)
        ctx.save_for_backward(a, c, scale, lse_r, lse_c)
        ctx.tile = tile
        ctx.set_materialize_grads(False)
        return lse_r, lse_c

    @staticmethod
    def backward(ctx, g_r: Optional[torch.Tensor], g_c: Optional[torch.Tensor]):
        a, c, scale, lse_r, lse_c = ctx.saved_tensors
        if g_c is not None and g_c.numel() == 0:
            g_c = None
        if g_r is None and g_c is None:
            return None, None, None, None, None, None
        dt = lse_r.dtype
        a32, c32, s = a.to(dt), c.to(dt), scale.to(dt)
        g_r = torch.zeros_like(lse_r) if g_r is None else g_r.to(dt)  # only the column LSE was used
        ga, gc = _grad_pass(a32, c32, s, lse_r, g_r, lse_c, g_c, ctx.tile, ctx.needs_input_grad[1], ctx.kept)
        ctx.kept = None
        d_scale = torch.dot(a32.reshape(-1), ga.reshape(-1)).reshape(scale.shape).to(scale.dtype)
        d_a = ga.mul_(s).to(a.dtype)
        d_c = gc.mul_(s).to(c.dtype) if gc is not None else None
        return d_a, d_c, d_scale, None, None, None


def tiled_lse(a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, tile: int, cols: bool = False,
              keep_bytes: int = 0):
    """(lse_row (b,), lse_col (N,) or (0,)) of s·A·Cᵀ, differentiable in A, C and s; ``keep_bytes``:
    logit tiles kept from the forward for the backward (module doc, "Kept tiles")."""
    if tile < 1:
        raise ValueError(f"tile size must be >= 1, got {tile}")
    return _TiledLSE.apply(a, c, scale, tile, cols, int(keep_bytes))


def _smoothing_mean(a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """mean_i mean_j z_ij = s·mean(A)·mean(C): the uniform part of label smoothing."""
    return (scale * (a.mean(0) * c.mean(0)).sum()).squeeze()


def symmetric_infonce(x, y, scale, tile: int, label_smoothing: float = 0.0, keep_bytes: int = 0) -> torch.Tensor:
    """Single process: ½[CE(s·X·Yᵀ) + CE(s·Y·Xᵀ)], both directions from the same tiles.

    x, y: (N, D) with x_i ↔ y_i positives; s·Y·Xᵀ = (s·X·Yᵀ)ᵀ, so its row LSE is the
    column LSE of s·X·Yᵀ."""
    lse_r, lse_c = tiled_lse(x, y, scale, tile, cols=True, keep_bytes=keep_bytes)  # (N,), (N,)
    pos = (scale * (x * y).sum(1)).mean()  # mean_i z_ii, the same in both directions
    loss = 0.5 * (lse_r.mean() + lse_c.mean()) - (1.0 - label_smoothing) * pos
    if label_smoothing:
        loss = loss - label_smoothing * _smoothing_mean(x, y, scale)
    return loss


def rows_infonce(a, pos, c_all, scale, tile: int, label_smoothing: float = 0.0, keep_bytes: int = 0) -> torch.Tensor:
    """One direction: mean_i CE(s·a_i·C_allᵀ, positive s·a_i·pos_i).

    a, pos: (b, D) this rank's rows and their partners; c_all: (N, D) every column,
    gathered outside so that the differentiable gather's reduce-scatter applies."""
    lse_r, _ = tiled_lse(a, c_all, scale, tile, keep_bytes=keep_bytes)  # (b,)
    loss = lse_r.mean() - (1.0 - label_smoothing) * (scale * (a * pos).sum(1)).mean()
    if label_smoothing:
        loss = loss - label_smoothing * _smoothing_mean(a, c_all, scale)
    return loss
