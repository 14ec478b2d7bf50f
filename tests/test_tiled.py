"""Tiled InfoNCE equals the plain loss (float64, rtol 1e-10) in value and every gradient,
including the logit scale, on sizes the tile does not divide; one rank or several."""
import pytest
import torch
import torch.nn.functional as F

from vlp.objectives import build_objective, contrastive, tiled
from vlp.objectives.tiled import rows_infonce, symmetric_infonce, tiled_lse

F64 = torch.float64


def _feats(n, d=8, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x, y = (F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1) for _ in range(2))
    return x.requires_grad_(), y.requires_grad_(), torch.tensor([12.5], dtype=dtype, requires_grad=True)


def _plain(x, y, scale, eps=0.0):
    labels = torch.arange(len(x))
    ce = lambda z: F.cross_entropy(z, labels, label_smoothing=eps)  # noqa: E731
    return 0.5 * (ce(scale * x @ y.T) + ce(scale * y @ x.T))


def _assert_same(loss, ref, inputs, rtol=1e-10):
    assert torch.allclose(loss, ref, rtol=rtol, atol=0), (float(loss), float(ref))
    for got, want in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        assert torch.allclose(got, want, rtol=rtol, atol=rtol * want.abs().max()), (got - want).abs().max()


@pytest.mark.parametrize("n,tile", [(37, 8), (64, 16), (5, 7), (33, 1)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_symmetric_equals_plain(n, tile, eps):
    x, y, s = _feats(n)
    _assert_same(symmetric_infonce(x, y, s, tile, eps), _plain(x, y, s, eps), (x, y, s))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_rows_form_over_ranks_equals_plain(eps):
    """Local rows against all columns, per rank: the mean over ranks is the full loss."""
    x, y, s = _feats(39)
    bounds = [(0, 13), (13, 26), (26, 39)]  # 3 ranks
    loss = sum(
        0.5 * (rows_infonce(x[a:b], y[a:b], y, s, 5, eps) + rows_infonce(y[a:b], x[a:b], x, s, 5, eps))
        for a, b in bounds
    ) / len(bounds)
    _assert_same(loss, _plain(x, y, s, eps), (x, y, s))


def test_gradcheck_both_directions():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 4, generator=g, dtype=F64, requires_grad=True)  # b = 7, N = 10, T = 3: ragged tiles
    c = torch.randn(10, 4, generator=g, dtype=F64, requires_grad=True)
    s = torch.tensor([1.7], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, s: tiled_lse(a, c, s, 3, cols=True), (a, c, s))
    assert torch.autograd.gradcheck(lambda a, c, s: tiled_lse(a, c, s, 3)[0], (a, c, s))
    assert torch.autograd.gradcheck(lambda a, c, s: tiled_lse(a, c, s, 3, cols=True)[1], (a, c, s))


def _objective_loss(spec, x, y, s):
    return build_objective(spec).cross_sample({"image": x, "text": y}, {"logit_scale": s})["loss"]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_infonce_dispatches_to_tiled_above_threshold(eps, monkeypatch):
    x, y, s = _feats(50)
    calls = []
    monkeypatch.setattr(contrastive, "symmetric_infonce", lambda *a: calls.append(1) or symmetric_infonce(*a))
    plain = _objective_loss({"name": "infonce", "label_smoothing": eps, "tile_above": 50}, x, y, s)
    assert not calls  # N = 50 is not above 50
    tiled = _objective_loss({"name": "infonce", "label_smoothing": eps, "tile_above": 49, "tile_size": 16}, x, y, s)
    assert calls == [1]
    _assert_same(tiled, plain, (x, y, s))


@pytest.mark.parametrize("tile_above", [0, 10_000])  # tiled and plain
def test_infonce_two_simulated_ranks(tile_above, monkeypatch):
    """cross_sample on each of 2 ranks (gather faked by the full tensor the local rows view):
    the mean over ranks and its gradients equal the 1-process loss."""
    x, y, s = _feats(24)
    monkeypatch.setattr(contrastive.dist, "world_size", lambda: 2)
    monkeypatch.setattr(contrastive.dist, "all_gather_with_grad", lambda t: t._base)  # (b, D) view -> (N, D)
    spec = {"name": "infonce", "label_smoothing": 0.1, "tile_above": tile_above, "tile_size": 5}
    total = 0.0
    for r in range(2):
        monkeypatch.setattr(contrastive.dist, "rank", lambda r=r: r)
        total = total + _objective_loss(spec, x[r * 12 : (r + 1) * 12], y[r * 12 : (r + 1) * 12], s) / 2
    _assert_same(total, _plain(x, y, s, 0.1), (x, y, s))


def test_float32_matches_plain():
    x, y, s = _feats(300, d=32, dtype=torch.float32)
    s.data.fill_(1 / 0.07)
    _assert_same(symmetric_infonce(x, y, s, 128), _plain(x, y, s), (x, y, s), rtol=1e-5)


def test_half_precision_inputs_give_same_dtype_grads():
    x, y, s = _feats(20, dtype=torch.bfloat16)
    loss = symmetric_infonce(x, y, s, 8)
    gx, gy, gs = torch.autograd.grad(loss, (x, y, s))
    assert (gx.dtype, gy.dtype, gs.dtype) == (torch.bfloat16,) * 3 and torch.isfinite(loss)


def _grads(fn, inputs):
    loss = fn(*inputs)
    return (loss.detach(), *torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("keep", [37 * 37 * 8, 37 * 37 * 8 // 3, 8 * 8 * 8])  # all, a third, one tile
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_kept_tiles_give_the_recomputed_result_bit_for_bit(keep, dtype):
    """Logit tiles kept from the forward are what the backward would recompute: loss and every
    gradient equal to the recomputing run exactly (symmetric and rows forms)."""
    inputs = _feats(37, dtype=dtype)
    x, y, s = inputs
    for fn in (lambda x, y, s, k: symmetric_infonce(x, y, s, 8, 0.1, k),
               lambda x, y, s, k: rows_infonce(x[:20], y[:20], y, s, 8, 0.0, k)):
        recomputed = _grads(lambda *a: fn(*a, 0), inputs)
        kept = _grads(lambda *a: fn(*a, keep), inputs)
        assert all(torch.equal(a, b) for a, b in zip(recomputed, kept))
    _assert_same(symmetric_infonce(x, y, s, 8, 0.0, keep), _plain(x, y, s), inputs,
                 rtol=1e-10 if dtype == F64 else 1e-5)


def test_kept_tiles_stay_within_the_budget(monkeypatch):
    kept, real = [], tiled._lse_pass

    def spy(*args):
        out = real(*args)
        kept.append(dict(out[2]))  # a copy: the backward frees the tiles it uses
        return out

    monkeypatch.setattr(tiled, "_lse_pass", spy)
    x, y, s = _feats(37)
    symmetric_infonce(x, y, s, 8, keep_bytes=3 * 8 * 8 * 8 + 100)
    assert len(kept[0]) == 3  # three full 8x8 float64 tiles fit; the 4th does not


@pytest.mark.parametrize("bad", [{"tile_size": 0}, {"tile_above": -1}, {"label_smoothing": 1.0},
                                 {"tile_keep_mb": -1}])
def test_bad_settings_are_clear_errors(bad):
    with pytest.raises(ValueError, match="infonce"):
        build_objective({"name": "infonce", **bad})


@pytest.mark.slow  # compiles the fused tile kernels (gcc), tens of seconds the first time on a cold cache
@pytest.mark.parametrize("rows_only", [False, True])
def test_fused_tiles_match_plain_float32(rows_only, monkeypatch):
    """Tiles of >= FUSE_MIN_ELEMS logits run torch.compile'd kernels (edge tiles here stay eager):
    same value and gradients as the plain loss in float32, and the kernels did compile."""
    monkeypatch.setattr(tiled, "FUSE_MIN_ELEMS", 128 * 128)
    monkeypatch.setenv("VLP_TILED_COMPILE", "1")
    x, y, s = _feats(300, d=32, dtype=torch.float32)
    s.data.fill_(1 / 0.07)
    if rows_only:
        lse_r, _ = tiled_lse(x, y, s, 128)
        ref = torch.logsumexp(s * x @ y.T, dim=1)
        _assert_same(lse_r.sum(), ref.sum(), (x, y, s), rtol=1e-5)
        assert tiled._FUSED.get("_fused_grad_rows") is not None
    else:
        _assert_same(symmetric_infonce(x, y, s, 128), _plain(x, y, s), (x, y, s), rtol=1e-5)
        assert tiled._FUSED.get("_fused_grad") is not None
        # kept tiles through the compiled kernels: the recomputing run's result bit for bit
        recomputed = _grads(lambda *a: symmetric_infonce(*a, 128), (x, y, s))
        kept = _grads(lambda *a: symmetric_infonce(*a, 128, keep_bytes=2**30), (x, y, s))
        assert all(torch.equal(a, b) for a, b in zip(recomputed, kept))
    assert tiled._FUSED.get("_fused_lse") is not None


def test_fused_tiles_off_by_env(monkeypatch):
    monkeypatch.setenv("VLP_TILED_COMPILE", "0")
    assert not tiled._use_fused(torch.zeros(1024, 1024))
    monkeypatch.setenv("VLP_TILED_COMPILE", "1")
    assert tiled._use_fused(torch.zeros(1024, 1024))
    assert not tiled._use_fused(torch.zeros(1024, 1024, dtype=F64))  # float64 (the exactness tests): eager
    assert not tiled._use_fused(torch.zeros(16, 16))  # small tiles: eager
