"""DCL, DCL-W, decoupled softmax, soft top-K and SupCon: identities with InfoNCE /
cross-entropy, brute-force references, the soft top-K operator, and 2-rank invariance."""
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from vlp import dist
from vlp.objectives import OBJECTIVES, build_objective
from vlp.objectives import decoupled as dec

NAMES = ("dcl", "dclw", "decoupled_softmax", "soft_topk", "supcon")
DT = torch.float64


def _feats(n=8, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=DT), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=DT), dim=-1)
    return x.requires_grad_(), y.requires_grad_()


def _scale(value=10.0):
    return torch.tensor([value], dtype=DT, requires_grad=True)


def _loss(name, x, y, labels=None, scale=None, **settings):
    reps = {"image": x, "text": y}
    if labels is not None:
        reps["label"] = labels
    return build_objective({"name": name, **settings}).cross_sample(reps, {"logit_scale": scale})["loss"]


def _infonce(x, y, scale):
    return build_objective({"name": "infonce"}).cross_sample({"image": x, "text": y}, {"logit_scale": scale})["loss"]


def _assert_same_value_and_grads(a, b, inputs):
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (float(a), float(b))
    for ga, gb in zip(torch.autograd.grad(a, inputs), torch.autograd.grad(b, inputs)):
        assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12)


def test_registered_with_defaults():
    assert set(NAMES) <= set(OBJECTIVES.list())
    assert OBJECTIVES.settings({"name": "dcl"}).temperature is None
    assert OBJECTIVES.settings({"name": "dclw"}).sigma == 0.5
    assert OBJECTIVES.settings({"name": "decoupled_softmax"}).temperature == 0.05
    cfg = OBJECTIVES.settings({"name": "soft_topk"})
    assert (cfg.k, cfg.alpha, cfg.temperature) == (5, 2.0, 0.05)


@pytest.mark.parametrize("spec", [
    {"name": "dcl", "temperature": 0.0}, {"name": "dclw", "sigma": -1.0},
    {"name": "decoupled_softmax", "temperature": -0.1}, {"name": "soft_topk", "k": 0},
    {"name": "soft_topk", "alpha": 0.0},
])
def test_bad_settings_are_clear_errors(spec):
    with pytest.raises(ValueError, match="must be > 0"):
        build_objective(spec)


# ---------------------------------------------------------------- DCL / DCL-W


def test_dcl_identity_per_row():
    """CE_i - DCL_i = log(1 + exp(z_ii) / Σ_{j≠i} exp(z_ij)) for every row, to float64 precision."""
    g = torch.Generator().manual_seed(1)
    z = 5 * torch.randn(7, 7, generator=g, dtype=DT)
    pos = torch.eye(7, dtype=torch.bool)
    ce = F.cross_entropy(z, torch.arange(7), reduction="none")
    neg_sum = (z.exp() * ~pos).sum(-1)
    rhs = torch.log1p(z.diagonal().exp() / neg_sum)
    assert torch.allclose(ce - dec.dcl_rows(z, pos), rhs, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("temperature", [None, 0.2])
def test_infonce_minus_dcl_is_mean_log_one_plus_positive_share(temperature):
    x, y = _feats()
    scale = _scale() if temperature is None else _scale(1 / temperature)
    dcl = _loss("dcl", x, y, scale=scale, temperature=temperature)  # a set temperature ignores the scale
    gap = []
    for z in (scale * x @ y.T, scale * y @ x.T):
        neg = z.exp().sum(-1) - z.diagonal().exp()
        gap.append(torch.log1p(z.diagonal().exp() / neg).mean())
    assert torch.allclose(_infonce(x, y, scale) - dcl, 0.5 * (gap[0] + gap[1]), rtol=1e-13)


def test_dclw_weights_average_to_one_and_favour_hard_positives():
    s = torch.tensor([0.9, 0.1, -0.3, 0.5, 0.2], dtype=DT, requires_grad=True)
    w = dec.dclw_weights(s, sigma=0.5)
    assert torch.allclose(w.mean(), torch.ones((), dtype=DT), rtol=1e-14)
    assert not w.requires_grad  # detached: the weights are not optimised
    assert int(w.argmax()) == int(s.argmin()) and int(w.argmin()) == int(s.argmax())


def test_dclw_equals_weighted_reference():
    x, y = _feats()
    scale = _scale()
    z_it, z_ti = scale * x @ y.T, scale * y @ x.T
    w = 2 - torch.exp((x * y).sum(-1).detach() / 0.5) / torch.exp((x * y).sum(-1).detach() / 0.5).mean()
    ref = 0
    for z in (z_it, z_ti):
        for i in range(len(x)):
            ref = ref + (-w[i] * z[i, i] + torch.cat([z[i, :i], z[i, i + 1:]]).logsumexp(0)) / (2 * len(x))
    _assert_same_value_and_grads(_loss("dclw", x, y, scale=scale), ref, (x, y, scale))


# ---------------------------------------------------------------- multi-positive losses


def _brute_force(name, x, y, labels, tau=None, scale=None):
    """Loop reference: decoupled softmax / SupCon / soft top-K from their docstring formulas."""
    s = scale if scale is not None else 1 / tau
    total = 0
    for z in (s * x @ y.T, s * y @ x.T):
        for i in range(len(x)):
            pos = [j for j in range(len(x)) if labels[j] == labels[i]]
            neg = [j for j in range(len(x)) if labels[j] != labels[i]]
            if name == "soft_topk":
                t = dec.soft_topk_threshold(z[i:i + 1].detach(), 5, 2.0, 64)
                p = torch.sigmoid(2.0 * (z[i].detach() - t[0]))
                omega = {j: p[j] / sum(p[q] for q in pos) for j in pos}
            else:
                omega = {j: 1 / len(pos) for j in pos}
            for j in pos:
                if name == "supcon":
                    denom = z[i].logsumexp(0)
                else:
                    denom = torch.cat([z[i, j:j + 1], z[i, neg]]).logsumexp(0)
                total = total + omega[j] * (denom - z[i, j]) / (2 * len(x))
    return total


LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])  # 1-3 positives per row


@pytest.mark.parametrize("name", ["decoupled_softmax", "supcon", "soft_topk"])
def test_multi_positive_equals_brute_force(name):
    x, y = _feats()
    scale = _scale() if name == "supcon" else None
    ref = _brute_force(name, x, y, LABELS, tau=0.05, scale=scale)
    got = _loss(name, x, y, LABELS, scale=scale)
    assert torch.allclose(got, ref, rtol=1e-12), (float(got), float(ref))
    if name != "soft_topk":  # (soft top-K's reference detaches ω; its gradient is tested below)
        inputs = (x, y) if scale is None else (x, y, scale)
        _assert_same_value_and_grads(got, ref, inputs)


@pytest.mark.parametrize("name", ["decoupled_softmax", "soft_topk"])
def test_one_positive_per_row_is_cross_entropy(name):
    """All labels distinct: decoupled softmax and soft top-K equal InfoNCE at τ = 0.05."""
    x, y = _feats()
    labels = torch.arange(len(x))
    ref = _infonce(x, y, torch.tensor([1 / 0.05], dtype=DT))
    _assert_same_value_and_grads(_loss(name, x, y, labels), ref, (x, y))


def test_supcon_with_distinct_labels_is_infonce():
    x, y = _feats()
    scale = _scale(14.0)
    loss = _loss("supcon", x, y, torch.arange(len(x)), scale)
    _assert_same_value_and_grads(loss, _infonce(x, y, scale), (x, y, scale))


def test_decoupled_softmax_ignores_other_positives():
    """Moving a second positive's score changes SupCon's term for the first positive, not
    the decoupled one (the other positives are not in its denominator)."""
    z = torch.tensor([[1.0, 3.0, 0.0, -1.0]], dtype=DT)
    pos = torch.tensor([[True, True, False, False]])
    bumped = z.clone()
    bumped[0, 1] = -2.0
    assert dec.decoupled_pairs(z, pos)[0, 0] == dec.decoupled_pairs(bumped, pos)[0, 0]
    assert dec.supcon_rows(z, pos) != dec.supcon_rows(bumped, pos)


# ---------------------------------------------------------------- the soft top-K operator


def test_soft_topk_threshold_hits_k():
    g = torch.Generator().manual_seed(2)
    z = 10 * torch.randn(5, 40, generator=g, dtype=DT)
    for k, alpha in ((5, 2.0), (1, 0.5), (39, 8.0)):
        t = dec.soft_topk_threshold(z, k, alpha, 64)
        assert torch.allclose(torch.sigmoid(alpha * (z - t)).sum(-1), torch.full((5,), float(k), dtype=DT),
                              rtol=0, atol=1e-6)
        assert torch.allclose(dec.log_soft_topk(z, k, alpha).exp().sum(-1), torch.full((5,), float(k), dtype=DT),
                              rtol=0, atol=1e-6)


def test_soft_topk_gradient_is_implicit_and_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    z = (3 * torch.randn(3, 9, generator=g, dtype=DT)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: dec.log_soft_topk(z, 3, 2.0), (z,), eps=1e-6, atol=1e-7)
    # the graph holds the custom Function, not the bisection loop
    assert type(dec.log_soft_topk(z, 3, 2.0).grad_fn).__name__ == "LogSoftTopKBackward"


def test_soft_topk_loss_gradcheck_with_repeated_labels():
    x, y = _feats(n=6, d=4)
    labels = torch.tensor([0, 1, 0, 1, 0, 2])
    obj = build_objective({"name": "soft_topk", "k": 3, "temperature": 0.5})
    f = lambda x, y: obj.cross_sample({"image": x, "text": y, "label": labels}, {})["loss"]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, y), eps=1e-6, atol=1e-7)


def test_soft_topk_small_batch_clips_k_with_warning():
    x, y = _feats(n=4)
    with pytest.warns(UserWarning, match="using k=3"):
        loss = _loss("soft_topk", x, y, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- every loss: b=4, 2 ranks


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("labels", [[0, 1, 0, 1], [2, 2, 2, 2]], ids=["repeats", "one_label"])
def test_small_batch_finite_scalar_with_grad(name, labels):
    x, y = _feats(n=4)
    scale = _scale()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # soft_topk's k clipping
        loss = _loss(name, x, y, torch.tensor(labels), scale)
    assert loss.dim() == 0 and loss.dtype == DT and torch.isfinite(loss)
    grads = torch.autograd.grad(loss, (x, y))
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads) or labels == [2, 2, 2, 2]  # no negatives: loss constant


class _SimulatedRanks:
    """W ranks as threads: ``rank()`` per thread; the gathers exchange what each rank passes
    and return the rank-major concatenation (with the other ranks' autograd graphs, so a
    backward of the mean loss is the engine's reduce-scatter + gradient averaging)."""

    def __init__(self, world: int):
        self.world, self.slots = world, {}
        self.local = threading.local()
        self.barrier = threading.Barrier(world, timeout=20)

    def run(self, fn, inputs):
        def worker(r):
            self.local.rank, self.local.calls = r, 0
            return fn(inputs[r])

        with ThreadPoolExecutor(self.world) as pool:
            return [f.result() for f in [pool.submit(worker, r) for r in range(self.world)]]

    def gather(self, x):
        call, r = self.local.calls, self.local.rank
        self.local.calls += 1
        self.slots[call, r] = x
        self.barrier.wait()  # every rank has deposited call `call`
        return torch.cat([self.slots[call, i] for i in range(self.world)])

    def install(self, monkeypatch):
        monkeypatch.setattr(dist, "rank", lambda: self.local.rank)
        monkeypatch.setattr(dist, "world_size", lambda: self.world)
        monkeypatch.setattr(dist, "all_gather_with_grad", self.gather)
        monkeypatch.setattr(dist, "all_gather_no_grad", lambda x: self.gather(x.detach()))


@pytest.mark.parametrize("name", NAMES)
def test_mean_of_two_ranks_equals_full_batch(name, monkeypatch):
    """Rank r holds rows [4r, 4r+4): the mean of the two local losses and its gradients
    equal the single-process loss on all 8 rows (catches local-vs-global indexing)."""
    x, y = _feats(n=8)
    scale = _scale()
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 0, 2])  # positives on both ranks
    obj = build_objective({"name": name})
    call = lambda r: obj.cross_sample(r, {"logit_scale": scale})["loss"]  # noqa: E731
    full = call({"image": x, "text": y, "label": labels})
    halves = [{"image": x[i:i + 4], "text": y[i:i + 4], "label": labels[i:i + 4]} for i in (0, 4)]
    ranks = _SimulatedRanks(2)
    ranks.install(monkeypatch)
    per_rank = ranks.run(call, halves)
    assert not torch.allclose(per_rank[0], per_rank[1])  # the ranks do see different rows
    inputs = (x, y, scale) if name in ("dcl", "dclw", "supcon") else (x, y)
    _assert_same_value_and_grads((per_rank[0] + per_rank[1]) / 2, full, inputs)
