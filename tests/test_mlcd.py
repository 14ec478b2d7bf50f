"""MLCD: the loss formulas, negative sampling, the cluster head in the (gradient-cached)
step, centers sharded over 2 gloo ranks, and exports without the head."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import PlainEngine, child_env, tiny_batch, tiny_model_cfg
from vlp.engine.step import Step
from vlp.models import create_model
from vlp.objectives import build_objective
from vlp.objectives.base import StepContext
from vlp.objectives.mlcd import mlc_rows, mlcd_rows, sample_active

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, L = 12, 2


# ------------------------------------------------------------------ formulas
@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_one_positive_one_negative(margin):
    s = 7.0
    cos = torch.tensor([[0.6, -0.2], [-0.1, 0.4]], dtype=torch.float64)  # row 0: col 0 positive; row 1: col 1
    pos = torch.tensor([[True, False], [False, True]])
    p, n = torch.tensor([0.6, 0.4], dtype=torch.float64), torch.tensor([-0.2, -0.1], dtype=torch.float64)
    torch.testing.assert_close(mlcd_rows(cos, pos, s, margin), F.softplus(-s * (p - margin)) + F.softplus(s * n))
    torch.testing.assert_close(mlc_rows(cos, pos, s, margin), F.softplus(s * (n - p + margin)))


def test_several_positives_and_negatives_match_the_sums():
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(4, 9, generator=g, dtype=torch.float64) * 2 - 1
    pos = torch.rand(4, 9, generator=g) < 0.3
    pos[:, 0] = True  # every row has a positive
    s, m = 5.0, 0.1
    for i in range(4):
        ps, ns = cos[i][pos[i]], cos[i][~pos[i]]
        want = math.log1p(float(torch.exp(-s * (ps - m)).sum())) + math.log1p(float(torch.exp(s * ns).sum()))
        coupled = math.log1p(float(torch.exp(s * (ns[None, :] - ps[:, None] + m)).sum()))
        assert abs(float(mlcd_rows(cos, pos, s, m)[i]) - want) < 1e-12
        assert abs(float(mlc_rows(cos, pos, s, m)[i]) - coupled) < 1e-12


def _lse(zs):
    top = max(zs)
    return top + math.log(sum(math.exp(z - top) for z in zs))


def test_large_scale_is_finite():
    """float32, s = 200: e^{s·c} overflows float32 (max ~e^88.7), the losses must not. Expected
    values from the formulas in float64 (of the float32 inputs): ~400.13 for both; dropping the
    positive term gives ~200.13, dropping the 0.99 negative 400.00, both far outside the tolerance."""
    cos = torch.tensor([[1.0, -1.0, 0.99]])
    pos = torch.tensor([[False, True, False]])
    s = 200.0
    (p,), negs = cos[pos].tolist(), cos[~pos].tolist()
    want = {
        mlcd_rows: _lse([0.0, -s * p]) + _lse([0.0] + [s * n for n in negs]),
        mlc_rows: _lse([0.0, _lse([-s * p]) + _lse([s * n for n in negs])]),
    }
    for fn, expected in want.items():
        value = fn(cos, pos, s)
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        # float32: a few ulps (3e-5 at 400) of the exponents' sums
        assert abs(float(value) - expected) <= 1e-6 * expected, (fn.__name__, float(value), expected)
    assert abs(want[mlcd_rows] - (2 * s + math.log1p(math.exp(-0.01 * s)))) < 1e-5  # 400.1269; 0.99 is float32


def _pos_grad(fn, negatives):
    cos = torch.tensor([[0.5, 0.3, *negatives]], dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[True, True] + [False] * len(negatives)])
    fn(cos, pos, 6.0, 0.1).sum().backward()
    return cos.grad[0, :2]


def test_positive_gradient_does_not_depend_on_negatives():
    a, b = _pos_grad(mlcd_rows, [0.1, -0.4]), _pos_grad(mlcd_rows, [0.9, 0.7, 0.2])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    # the coupled baseline: it does (so the check above can fail)
    a, b = _pos_grad(mlc_rows, [0.1, -0.4]), _pos_grad(mlc_rows, [0.9, 0.7, 0.2])
    assert (a - b).abs().max() > 1e-3


# ------------------------------------------------------------------ sampling
def test_sampled_negatives_never_include_a_positive():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        k = 50
        positives = torch.randint(0, k, (16, 3), generator=g)
        active = sample_active(positives, k, 0.1, torch.Generator().manual_seed(trial))
        uniq = positives.unique()
        assert len(active) == len(set(active.tolist()))  # no center twice
        assert set(uniq.tolist()) <= set(active.tolist())  # every positive kept
        negatives = set(active.tolist()) - set(uniq.tolist())
        assert len(negatives) == math.ceil(0.1 * (k - len(uniq)))
    full = sample_active(torch.tensor([[1, 2]]), 10, 1.0, torch.Generator().manual_seed(0))
    assert full.tolist() == list(range(10))


def test_same_draw_for_the_same_step_and_seed():
    ids = torch.randint(0, 100, (8, 2))
    draw = lambda step: sample_active(ids, 100, 0.2, StepContext(step=step, seed=3).generator(5))  # noqa: E731
    assert torch.equal(draw(4), draw(4)) and not torch.equal(draw(4), draw(5))


# ------------------------------------------------------------------ in the step
def _setup(name="mlcd", **objective):
    cfg = tiny_model_cfg(heads={"cluster": {"name": "mlcd_cluster", "num_centers": K}})
    cfg.image["patch_dropout"] = 0.25  # row-major draws: the chunked and one-pass masks agree
    torch.manual_seed(0)
    model = create_model(cfg).double().train()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in tiny_batch(16, cfg).items()}
    g = torch.Generator().manual_seed(1)
    batch["cluster_ids"] = torch.stack([torch.randperm(K, generator=g)[:L] for _ in range(16)])  # (16, l)
    obj = build_objective({"name": name, "scale": 8.0, "margin": 0.1, "sample_ratio": 0.5, **objective})
    return model, obj, batch


def _grads(model, obj, batch, chunk):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    losses = Step(PlainEngine(model), obj, torch.device("cpu"), chunk_size=chunk)(batch, step=3)
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,objective", [("mlcd", {}), ("mlc", {}), ("mlcd", {"contrastive_weight": 0.5})],
                         ids=["mlcd", "mlc", "mlcd+clip"])
def test_gradient_cache_equals_one_pass(name, objective):
    model, obj, batch = _setup(name, **objective)
    ref_losses, ref = _grads(model, obj, batch, chunk=0)
    assert "heads.cluster.weight" in ref and ref["heads.cluster.weight"].abs().max() > 0
    assert ("text.text_projection" in ref) == bool(objective)  # the text tower trains only with the CLIP term
    for chunk in (8, 4):
        losses, got = _grads(copy.deepcopy(model), obj, batch, chunk)
        assert abs(losses["loss"] - ref_losses["loss"]) <= 1e-9 * abs(ref_losses["loss"])
        assert got.keys() == ref.keys()
        for pname in ref:
            err = (got[pname] - ref[pname]).norm() / ref[pname].norm().clamp_min(1e-30)
            assert err <= 1e-6, (pname, float(err))


def test_step_loss_equals_the_formula_on_the_active_centers():
    model, obj, batch = _setup("mlcd")
    losses, _ = _grads(model, obj, batch, chunk=0)
    head = model.heads["cluster"]
    active = head.active  # what begin_step chose for step 3
    assert set(batch["cluster_ids"].unique().tolist()) <= set(active.tolist()) and len(active) < K
    model.eval()  # no patch dropout: recompute and compare with the eval-mode step
    with torch.no_grad():
        x = model.encode_image(batch["image"], normalize=True)  # (16, D)
        cos = x @ F.normalize(head.weight[active], dim=-1).T  # (16, S)
        pos = (batch["cluster_ids"][:, :, None] == active[None, None, :]).any(1)
        want = float(mlcd_rows(cos, pos, 8.0, 0.1).mean())
    got, _ = _grads(model, obj, batch, chunk=4)
    assert abs(got["mlcd"] - want) < 1e-9 and abs(got["loss"] - want) < 1e-9


def test_missing_cluster_ids_is_a_clear_error():
    model, obj, batch = _setup("mlcd")
    batch.pop("cluster_ids")
    with pytest.raises(ValueError, match="data.cluster_labels"):
        _grads(model, obj, batch, chunk=0)
    with pytest.raises(ValueError, match="mlcd_cluster head"):
        obj.begin_step(StepContext(model=create_model(tiny_model_cfg()), batch={"cluster_ids": torch.zeros(2, 1)}))


def test_head_loads_centers_and_checks_their_shape(tmp_path):
    from safetensors.torch import save_file

    centers = torch.randn(K, 16)
    save_file({"centers": centers}, str(tmp_path / "centers.safetensors"))
    spec = {"name": "mlcd_cluster", "num_centers": K, "centers": str(tmp_path / "centers.safetensors")}
    model = create_model(tiny_model_cfg(heads={"cluster": spec}))
    torch.testing.assert_close(model.heads["cluster"].weight.data, F.normalize(centers, dim=-1))
    with pytest.raises(ValueError, match="shape"):
        create_model(tiny_model_cfg(heads={"cluster": {**spec, "num_centers": K + 1}}))


# ------------------------------------------------------------------ 2 gloo ranks vs 1 process
@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    """tests/mlcd_dist_worker.py run as one process and on 2 gloo ranks:
    {"one": rank 0's results, "two": [rank 0's, rank 1's]}."""
    tmp = tmp_path_factory.mktemp("mlcd_dist")
    worker = os.path.join(ROOT, "tests", "mlcd_dist_worker.py")
    one, two = str(tmp / "one"), str(tmp / "two")
    for cmd in ([sys.executable, worker, one],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29678",
                 worker, two]):
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    return {"one": load(f"{one}.0.pt"), "two": [load(f"{two}.{r}.pt") for r in (0, 1)]}


@pytest.mark.slow
def test_sharded_centers_equal_unsharded_on_two_ranks(worker_runs):
    for rank, results in enumerate(worker_runs["two"]):
        results = {k: v for k, v in results.items() if k != "engine"}
        assert len(results) == 4
        for case, r in results.items():
            ref_loss, ref_x, ref_c = r["ref"]
            loss, grad_x, (lo, hi, grad_shard) = r["sharded"]
            assert hi - lo == 12 and lo == 12 * rank  # K=24 split in two
            assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), case
            torch.testing.assert_close(grad_x, ref_x, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(grad_shard, ref_c[lo:hi], rtol=1e-10, atol=1e-13)
            if case[1] == "sampled":  # inactive centers get no gradient
                inactive = torch.ones(24, dtype=torch.bool)
                inactive[r["active"]] = False
                assert inactive.any() and ref_c[inactive].abs().max() == 0
                assert ref_c[~inactive].abs().max() > 0


@pytest.mark.slow
def test_replicated_head_two_ranks_equal_one_process(worker_runs):
    """The trained path: the head as an engine parameter (ZeRO 0/2/3, cache on and off) on 2 ranks
    takes the same step as one process on the concatenated batch."""
    ref, got = worker_runs["one"]["engine"], worker_runs["two"][0]["engine"]
    torch.manual_seed(0)
    init = create_model(tiny_model_cfg(heads={"cluster": {"name": "mlcd_cluster", "num_centers": 24}})).state_dict()
    base_loss, base = ref[(0, 0)]
    assert (base["heads.cluster.weight"] - init["heads.cluster.weight"]).abs().max() > 1e-3  # the centers moved
    for case, (loss, params) in [*ref.items(), *got.items()]:
        assert abs(loss - base_loss) <= 1e-5 * abs(base_loss), case
        for name, p in base.items():
            err, update = (params[name] - p).abs().max(), (p - init[name]).abs().max()
            assert err <= 1e-4 * update + 1e-6, (case, name, float(err), float(update))


# ------------------------------------------------------------------ export
def test_open_clip_export_drops_heads_safetensors_keeps_them(tmp_path):
    import open_clip
    from safetensors.torch import load_file

    from tests.helpers import make_tiny_run
    from vlp.commands.export import export

    run = make_tiny_run(tmp_path, heads={"cluster": {"name": "mlcd_cluster", "num_centers": 5}})
    oc = export(run, "open_clip", str(tmp_path / "oc"))
    weights = load_file(os.path.join(oc, "open_clip_model.safetensors"))
    assert not any(k.startswith("heads.") for k in weights)
    model = open_clip.create_model(f"local-dir:{oc}", pretrained=f"{oc}/open_clip_model.safetensors")  # strict
    assert model.visual is not None
    tm = export(run, "timm", str(tmp_path / "timm"))  # the image tower alone
    assert not any("heads" in k or "cluster" in k for k in load_file(os.path.join(tm, "model.safetensors")))
    st = export(run, "safetensors", str(tmp_path / "st"))
    assert load_file(os.path.join(st, "model.safetensors"))["heads.cluster.weight"].shape == (5, 32)
