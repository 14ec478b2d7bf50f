"""Contrastive family, part 2: cwcl, uniform_align, mw_auc, mv_infonce, mv_dhel, hard_negative_mixing.

Each loss: a reference or limiting-case equality, its defining property, a float64 b=4
smoke test, and 2 "ranks" without processes (``vlp.dist`` monkeypatched) whose
averaged loss and gradient equal the single-process ones.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives import OBJECTIVES, build_objective
from vlp.objectives.ranking import mw_rows

SPECS = [
    {"name": "cwcl"},
    {"name": "cwcl", "frozen": "text"},
    {"name": "uniform_align"},
    {"name": "uniform_align", "cross_uniform": 0.5, "alpha": 1.5},
    {"name": "mw_auc"},
    {"name": "mv_infonce"},
    {"name": "mv_infonce", "views": ["image", "text", "audio"]},
    {"name": "mv_dhel"},
    {"name": "mv_dhel", "views": ["text", "audio", "image"]},
    {"name": "hard_negative_mixing"},
    {"name": "hard_negative_mixing", "hardest": 2, "mixes": 3, "query_mixes": 5, "seed": 7},
]


def _unit(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _inputs(obj, n, seed=0):
    """Leaf reps (n, D) for every rep key the objective reads, and a leaf logit scale."""
    reps = {k: _unit(n, seed=seed + i).requires_grad_() for i, k in enumerate(obj.rep_keys)}
    scale = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    return reps, {"logit_scale": scale}


def _loss(obj, reps, scalars):
    return obj.cross_sample(reps, {k: v for k, v in scalars.items() if k in obj.scalar_keys})["loss"]


def _two_rank_loss(monkeypatch, obj, reps, scalars, world=2):
    """Mean over `world` fake ranks of each rank's loss on its rows of ``reps``.

    The fake gather returns the global batch with this rank's block being the very tensor
    passed in and the other blocks slices of the full leaves: backpropagating the mean of
    the ranks' losses then gives each leaf row the sum of all ranks' gradients divided by
    W, which is what the real reduce-scatter followed by the engine's average gives.
    """
    n = len(next(iter(reps.values())))
    b = n // world
    total = 0.0
    for r in range(world):
        local = {k: v[r * b : (r + 1) * b] for k, v in reps.items()}

        def gather(t, r=r, local=local):
            key = next(k for k, v in local.items() if v is t)  # only the reps themselves are gathered
            return torch.cat([t if i == r else reps[key][i * b : (i + 1) * b] for i in range(world)])

        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        monkeypatch.setattr(dist, "world_size", lambda: world)
        monkeypatch.setattr(dist, "all_gather_with_grad", gather)
        monkeypatch.setattr(dist, "all_gather_no_grad", lambda t: pytest.fail("unexpected no-grad gather"))
        total = total + _loss(obj, local, scalars)
    monkeypatch.undo()
    return total / world


# ---------------------------------------------------------------- every objective
def test_all_registered():
    for name in ("cwcl", "uniform_align", "mw_auc", "mv_infonce", "mv_dhel", "hard_negative_mixing"):
        assert name in OBJECTIVES


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_float64_b4_finite_with_grad(spec):
    obj = build_objective(spec)
    reps, scalars = _inputs(obj, 4)
    loss = _loss(obj, reps, scalars)
    assert loss.shape == () and loss.dtype == torch.float64 and torch.isfinite(loss)
    grads = torch.autograd.grad(loss, list(reps.values()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_two_ranks_equal_one_process(monkeypatch, spec):
    obj = build_objective(spec)
    reps, scalars = _inputs(obj, 8, seed=3)
    leaves = list(reps.values()) + [s for k, s in scalars.items() if k in obj.scalar_keys]
    full = _loss(obj, reps, scalars)
    split = _two_rank_loss(monkeypatch, obj, reps, scalars)
    assert torch.allclose(split, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(split, leaves), torch.autograd.grad(full, leaves)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "cwcl", "frozen": "audio"},
        {"name": "uniform_align", "align": -1.0},
        {"name": "uniform_align", "t": 0.0},
        {"name": "mw_auc", "tau": 0.0},
        {"name": "mv_dhel", "views": ["image"]},
        {"name": "mv_infonce", "views": ["image", "image"]},
        {"name": "hard_negative_mixing", "hardest": 0},
        {"name": "hard_negative_mixing", "mixes": -1},
    ],
)
def test_bad_settings_are_clear_errors(spec):
    with pytest.raises(ValueError, match=spec["name"]):
        build_objective(spec)


# ---------------------------------------------------------------- cwcl
def test_cwcl_with_identity_weights_is_infonce():
    # two antipodal frozen embeddings: W = (1 + F·Fᵀ)/2 = I exactly
    f = F.normalize(torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64), dim=-1)
    x = torch.cat([f, -f]).requires_grad_()
    y = _unit(2, d=3, seed=1).requires_grad_()
    scale = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    reps, scalars = {"image": x, "text": y}, {"logit_scale": scale}
    cwcl, ref = _loss(build_objective({"name": "cwcl"}), reps, scalars), _loss(
        build_objective({"name": "infonce"}), reps, scalars
    )
    assert torch.allclose(cwcl, ref, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(cwcl, [x, y, scale]), torch.autograd.grad(ref, [x, y, scale])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("frozen", ["image", "text"])
def test_cwcl_equals_written_out_formula(frozen):
    x, y = _unit(5, seed=0).requires_grad_(), _unit(5, seed=1).requires_grad_()
    scale = torch.tensor([2.5], dtype=torch.float64)
    loss = _loss(build_objective({"name": "cwcl", "frozen": frozen}), {"image": x, "text": y}, {"logit_scale": scale})
    f = (x if frozen == "image" else y).detach()
    ref = 0.0
    for q, k in ((x, y), (y, x)):
        for i in range(5):
            w = [(1 + f[i] @ f[j]) / 2 for j in range(5)]
            logz = torch.logsumexp(scale * q[i] @ k.T, 0)
            ref = ref - sum(w[j] / sum(w) * (scale * q[i] @ k[j] - logz) for j in range(5)) / 5 / 2
    assert torch.allclose(loss, ref, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, [x, y]), torch.autograd.grad(ref, [x, y])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)  # weights are constants: no gradient through them


# ---------------------------------------------------------------- uniform_align
def test_alignment_is_two_minus_two_cosine():
    x, y = _unit(6, seed=0), _unit(6, seed=1)
    out = build_objective({"name": "uniform_align"}).cross_sample(
        {"image": x, "text": y}, {"logit_scale": torch.tensor([1.0], dtype=torch.float64)}
    )
    assert torch.allclose(out["align"], 2 - 2 * F.cosine_similarity(x, y).mean(), rtol=1e-12)


def test_uniform_align_terms_equal_wang_isola():
    x, y = _unit(6, seed=0).requires_grad_(), _unit(6, seed=1).requires_grad_()
    scale = torch.tensor([3.0], dtype=torch.float64)
    spec = {"name": "uniform_align", "clip": 0.5, "align": 2.0, "uniform": 3.0, "cross_uniform": 0.25}
    loss = _loss(build_objective(spec), {"image": x, "text": y}, {"logit_scale": scale})

    def unif(a, c):  # Wang & Isola's uniform_loss, extended to two sets (i ≠ j)
        sq = torch.cdist(a, c).pow(2)
        off = ~torch.eye(len(a), dtype=torch.bool)
        return torch.log(torch.exp(-2 * sq[off]).mean())

    clip = (F.cross_entropy(scale * x @ y.T, torch.arange(6)) + F.cross_entropy(scale * y @ x.T, torch.arange(6))) / 2
    ref = 0.5 * clip + 2.0 * (x - y).norm(dim=1).pow(2).mean() + 3.0 * (unif(x, x) + unif(y, y)) / 2
    ref = ref + 0.25 * unif(x, y)
    assert torch.allclose(loss, ref, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(loss, [x, y]), torch.autograd.grad(ref, [x, y])):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------- mw_auc
def _infonce_rows(scores, pos, tau):
    return F.cross_entropy(scores / tau, pos)


def test_mw_equals_written_out_formula():
    x, y = _unit(5, seed=0).requires_grad_(), _unit(5, seed=1).requires_grad_()
    loss = _loss(build_objective({"name": "mw_auc", "tau": 0.1}), {"image": x, "text": y}, {})
    s = x @ y.T
    ref = 0.0
    for m in (s, s.T):
        for i in range(5):
            ref = ref - sum(F.logsigmoid((m[i, i] - m[i, j]) / 0.1) for j in range(5) if j != i) / 5 / 2
    assert torch.allclose(loss, ref, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, [x, y]), torch.autograd.grad(ref, [x, y])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_mw_and_infonce_are_both_invariant_to_per_query_and_global_shifts():
    # the issue claimed a per-query shift leaves InfoNCE but not MW unchanged: both see only
    # s⁺ - s within a query, so both are invariant (and so to a global shift)
    g = torch.Generator().manual_seed(0)
    scores, pos, tau = torch.rand(6, 9, generator=g, dtype=torch.float64) * 2 - 1, torch.arange(6), 0.05
    shifted = scores + torch.randn(6, 1, generator=g, dtype=torch.float64) + 0.7
    for f in (mw_rows, _infonce_rows):
        assert torch.allclose(f(shifted, pos, tau), f(scores, pos, tau), rtol=1e-12)


def test_mw_sees_each_pair_where_infonce_sees_only_the_log_sum_exp():
    # one query, positive 0.5; negatives (a, a) vs (a + δ, c) with the same Σ exp(s/τ):
    # InfoNCE cannot tell them apart; MW (Σ of concave log(1 + e^{(s-s⁺)/τ})) prefers the spread
    tau, a = 0.01, 0.48
    c = tau * math.log(2 * math.exp(a / tau) - math.exp((a + 0.005) / tau))
    same = torch.tensor([[0.5, a, a]], dtype=torch.float64)
    spread = torch.tensor([[0.5, a + 0.005, c]], dtype=torch.float64)
    pos = torch.zeros(1, dtype=torch.long)
    assert torch.allclose(_infonce_rows(same, pos, tau), _infonce_rows(spread, pos, tau), rtol=1e-12)
    assert mw_rows(spread, pos, tau) < mw_rows(same, pos, tau) - 1e-3  # 0.2479 vs 0.2539


# ---------------------------------------------------------------- multi-view
@pytest.mark.parametrize("name", ["mv_infonce", "mv_dhel"])
def test_multiview_invariant_to_view_order(name):
    reps = {k: _unit(6, seed=i).requires_grad_() for i, k in enumerate(["image", "text", "audio"])}
    scalars = {"logit_scale": torch.tensor([3.0], dtype=torch.float64)}
    a = _loss(build_objective({"name": name, "views": ["image", "text", "audio"]}), reps, scalars)
    b = _loss(build_objective({"name": name, "views": ["audio", "image", "text"]}), reps, scalars)
    assert torch.allclose(a, b, rtol=1e-12)
    for ga, gb in zip(torch.autograd.grad(a, list(reps.values())), torch.autograd.grad(b, list(reps.values()))):
        assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12)


def test_mv_dhel_two_views_is_dhel():
    x, y = _unit(6, seed=0).requires_grad_(), _unit(6, seed=1).requires_grad_()
    s = torch.tensor([3.0], dtype=torch.float64)
    loss = _loss(build_objective({"name": "mv_dhel"}), {"image": x, "text": y}, {"logit_scale": s})
    off = ~torch.eye(6, dtype=torch.bool)
    e_xx, e_yy = torch.exp(s * x @ x.T)[off].view(6, 5), torch.exp(s * y @ y.T)[off].view(6, 5)
    ref = -torch.log(torch.exp(s * (x * y).sum(1)) / (e_xx.sum(1) * e_yy.sum(1))).mean()
    assert torch.allclose(loss, ref, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(loss, [x, y]), torch.autograd.grad(ref, [x, y])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_mv_infonce_equals_written_out_formula():
    views = ["image", "text", "audio"]
    u = {k: _unit(4, seed=i).requires_grad_() for i, k in enumerate(views)}
    s = 2.0
    loss = _loss(build_objective({"name": "mv_infonce", "views": views}), u, {"logit_scale": torch.tensor([s])})
    ref = 0.0
    for i in range(4):
        pos = sum(torch.exp(s * u[a][i] @ u[m][i]) for a in views for m in views if a != m)
        den = sum(
            torch.exp(s * u[a][i] @ u[m][j]) for a in views for m in views for j in range(4) if (j, m) != (i, a)
        )
        ref = ref - torch.log(pos / den) / 4
    assert torch.allclose(loss, ref, rtol=1e-12)


# ---------------------------------------------------------------- hard negative mixing
def test_hard_negative_mixing_without_mixes_is_infonce():
    x, y = _unit(6, seed=0).requires_grad_(), _unit(6, seed=1).requires_grad_()
    scale = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)
    reps, scalars = {"image": x, "text": y}, {"logit_scale": scale}
    ours = _loss(build_objective({"name": "hard_negative_mixing", "mixes": 0, "query_mixes": 0}), reps, scalars)
    ref = _loss(build_objective({"name": "infonce"}), reps, scalars)
    assert torch.allclose(ours, ref, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, [x, y, scale]), torch.autograd.grad(ref, [x, y, scale])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_synthetic_negatives_are_unit_hard_and_harder_than_their_source():
    obj = build_objective({"name": "hard_negative_mixing", "hardest": 3, "mixes": 32, "query_mixes": 64})
    q, keys, rows = _unit(8, seed=0), _unit(8, seed=1), torch.arange(8)
    syn = obj.synthesize(q, keys, rows, direction=0)
    assert syn["mix"].shape == (8, 32, 8) and syn["query_mix"].shape == (8, 64, 8)
    for pts in (syn["mix"], syn["query_mix"]):
        assert torch.allclose(pts.norm(dim=-1), torch.ones((), dtype=torch.float64), atol=1e-12)
    # sources: the 3 highest-scoring keys other than the positive
    scores = (q @ keys.T).fill_diagonal_(-math.inf)
    assert torch.equal(syn["hard"].sort(1).values, scores.topk(3, dim=1).indices.sort(1).values)
    cols = syn["query_mix_cols"]
    assert (syn["hard"][:, :, None] == cols[:, None, :]).any(1).all()
    # h' = normalize(β q + (1-β) n) lies on the arc from n to q: q·h' >= q·n for any β in [0, 1]
    q_h = torch.einsum("bd,bkd->bk", q, syn["query_mix"])
    assert (q_h >= (q @ keys.T).gather(1, cols) - 1e-9).all()
    # β < ½ keeps h' nearer its negative than the query: n·h' - q·h' ∝ (1 - 2β)(1 - q·n) >= 0
    n_h = torch.einsum("bkd,bkd->bk", keys[cols], syn["query_mix"])
    assert (n_h >= q_h - 1e-9).all()


def test_mixing_draws_depend_on_seed_and_global_row_only():
    obj = build_objective({"name": "hard_negative_mixing", "hardest": 4, "mixes": 5, "query_mixes": 5})
    q, keys = _unit(8, seed=0), _unit(8, seed=1)
    whole = obj.synthesize(q, keys, torch.arange(8), direction=1)
    tail = obj.synthesize(q[4:], keys, torch.arange(4, 8), direction=1)
    for k in ("mix", "query_mix", "query_mix_cols"):
        assert torch.equal(whole[k][4:], tail[k])
    other = build_objective({"name": "hard_negative_mixing", "hardest": 4, "mixes": 5, "query_mixes": 5, "seed": 1})
    assert not torch.equal(other.synthesize(q, keys, torch.arange(8), direction=1)["mix"], whole["mix"])


def _mochi_reference(x, y, scale, hardest, mixes, query_mixes, seed):
    """MoCHi written out per query (float64 loops): the K hardest negatives in score order,
    S mixes α·n_a + (1-α)·n_b and Q mixes β·q + (1-β)·n_c (β = ½·u), normalised and detached,
    appended to the query's row of logits only; the draws u ~ U[0,1)^(3S+2Q) come from one
    generator per (seed, direction, row), laid out as [a | b | α | c | β] and mapped to H_i by
    floor(u·K)."""
    from vlp.objectives.mixing import _seed32

    n = len(x)
    k = min(hardest, n - 1)
    total = 0.0
    for direction, (qs, keys) in enumerate(((x, y), (y, x))):
        for i in range(n):
            q = qs[i]
            qd, kd = q.detach(), keys.detach()
            scores = {j: float(qd @ kd[j]) for j in range(n) if j != i}
            hard = sorted(scores, key=lambda j: -scores[j])[:k]  # H_i, hardest first
            u = torch.rand(3 * mixes + 2 * query_mixes, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(_seed32(seed, direction, i))).tolist()
            a, b, alpha = u[:mixes], u[mixes : 2 * mixes], u[2 * mixes : 3 * mixes]
            c, beta = u[3 * mixes : 3 * mixes + query_mixes], u[3 * mixes + query_mixes :]
            synthetic = []
            for s in range(mixes):
                h = alpha[s] * kd[hard[int(a[s] * k)]] + (1 - alpha[s]) * kd[hard[int(b[s] * k)]]
                synthetic.append(h / h.norm())
            for t in range(query_mixes):
                h = 0.5 * beta[t] * qd + (1 - 0.5 * beta[t]) * kd[hard[int(c[t] * k)]]
                synthetic.append(h / h.norm())
            row = [scale * (q @ keys[j]) for j in range(n)] + [scale * (q @ h) for h in synthetic]
            total = total + (torch.logsumexp(torch.cat(row), 0) - row[i][0]) / n / 2
    return total


@pytest.mark.parametrize("hardest,mixes,query_mixes", [(3, 4, 5), (2, 6, 0), (7, 0, 3), (20, 5, 5)])
def test_hard_negative_mixing_equals_written_out_mochi(hardest, mixes, query_mixes):
    x, y = _unit(8, seed=4).requires_grad_(), _unit(8, seed=5).requires_grad_()
    scale = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    spec = {"name": "hard_negative_mixing", "hardest": hardest, "mixes": mixes, "query_mixes": query_mixes,
            "seed": 7}
    loss = _loss(build_objective(spec), {"image": x, "text": y}, {"logit_scale": scale})
    ref = _mochi_reference(x, y, scale, hardest, mixes, query_mixes, seed=7)
    infonce = _loss(build_objective({"name": "infonce"}), {"image": x, "text": y}, {"logit_scale": scale})
    assert float((ref - infonce).detach()) > 1e-3  # the synthetic negatives change the loss: the comparison can fail
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(loss, [x, y, scale]), torch.autograd.grad(ref, [x, y, scale])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
