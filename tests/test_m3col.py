"""M3CoL: the mixup contrastive loss, its draws, the classifier heads, the gradient cache,
2 gloo ranks, the multimodal digits set and `vlp eval classify`."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from tests.m3col_dist_worker import CASES, GLOBAL_BATCH, model_and_batch, one_step
from tests.tiny import PlainEngine, child_env, tiny_model_cfg
from vlp.engine.step import Step, model_inputs, split
from vlp.models import create_model
from vlp.objectives import build_objective
from vlp.objectives.base import StepContext
from vlp.objectives.contrastive import InfoNCE, InfoNCEConfig
from vlp.objectives.m3col import MixDraw, draw_mix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAU = 0.1


def _unit(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _contrastive(objective, x, y):
    out = objective.cross_sample({"image": x, "text": y}, {})
    return out, next(v for k, v in out.items() if k != "loss")


# --- the loss -------------------------------------------------------------------------
@pytest.mark.parametrize("mix_both", [False, True])
def test_no_mixing_is_symmetric_infonce(mix_both):
    """λ ≡ 1 (p = 0): the mixup term is CLIP's InfoNCE at τ (vlp's and open_clip's ClipLoss)."""
    x, y = _unit(12), _unit(12, seed=1)
    obj = build_objective({"name": "m3col", "mix_prob": 0.0, "weight": 0.3, "mix_both": mix_both})
    out, term = _contrastive(obj, x, y)
    scale = torch.tensor(1 / TAU, dtype=torch.float64)
    ours = InfoNCE(InfoNCEConfig()).cross_sample({"image": x, "text": y}, {"logit_scale": scale})["loss"]
    theirs = ClipLoss()(x, y, scale)
    assert torch.allclose(term, ours, rtol=1e-12) and torch.allclose(term, theirs, rtol=1e-12)
    assert torch.allclose(out["loss"], 0.3 * term, rtol=1e-12)
    assert float(term) > 0.1  # random features: not a trivially small loss


def test_soft_targets_rows_sum_to_one_with_fixed_points():
    perm = torch.tensor([0, 2, 1, 3, 5, 4])  # fixed points 0 and 3
    lam = torch.tensor([0.3, 0.6, 1.0, 0.2, 0.9, 0.45], dtype=torch.float64)
    p = MixDraw(perm, lam, lam < 1).targets()
    assert torch.allclose(p.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-15)
    assert p[0, 0] == 1.0 and p[3, 3] == 1.0  # mixing a row with itself leaves it whole
    assert p[1, 1] == 0.6 and torch.isclose(p[1, 2], torch.tensor(0.4, dtype=torch.float64))
    assert p[2, 2] == 1.0 and p[2, 1] == 0.0  # λ = 1: an unmixed row, a one-hot target
    assert int((p > 0).sum()) == 2 + 2 + 1 + 2 + 2  # nothing else is set
    for seed in range(50):  # drawn mixes on a tiny batch, where π(i) = i is frequent
        d = draw_mix(torch.Generator().manual_seed(seed), 3, 0.9, 0.15)
        assert torch.allclose(d.targets().sum(1), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_mixing_changes_only_drawn_rows():
    n = 4000
    obj = build_objective({"name": "m3col"})
    obj.begin_step(StepContext(step=5, total_steps=100, seed=3))
    d_img, d_txt = obj.draws(n)
    x = _unit(n, d=4) * 2.0
    m = d_img.apply(x)
    keep = ~d_img.mixed
    assert torch.equal(m[keep], F.normalize(x, dim=-1)[keep]) and torch.all(d_img.lam[keep] == 1.0)
    lam = d_img.lam[:, None]
    assert torch.allclose(m, F.normalize(lam * x + (1 - lam) * x[d_img.perm], dim=-1), atol=1e-12)
    moved = d_img.mixed & (d_img.perm != torch.arange(n)) & (d_img.lam < 1 - 1e-6)
    assert bool(((m - x).norm(dim=1)[moved] > 0).all())
    assert abs(float(d_img.mixed.double().mean()) - 0.5) < 0.04  # Bernoulli(p = 0.5)
    assert not torch.equal(d_img.perm, d_txt.perm)  # each modality its own draw
    assert sorted(d_img.perm.tolist()) == list(range(n))


def test_draws_are_a_function_of_seed_and_step():
    a, b = build_objective({"name": "m3col"}), build_objective({"name": "m3col"})
    ctx = StepContext(step=4, total_steps=10, seed=1)
    a.begin_step(ctx)
    b.begin_step(StepContext(step=4, total_steps=10, seed=1, batch={"text": torch.zeros(3)}))
    assert all(torch.equal(p.perm, q.perm) and torch.equal(p.lam, q.lam) for p, q in zip(a.draws(32), b.draws(32)))
    b.begin_step(StepContext(step=5, total_steps=10, seed=1))
    assert not torch.equal(a.draws(32)[0].perm, b.draws(32)[0].perm)
    assert a.draws(32)[0] is a.draws(32)[0]  # made once per step


def _mixco_public(mix, fix, perm, betas, tau=TAU):
    """The public code's ``mixco_nce`` (model/utils.py), with P[i, π(i)] added, not assigned."""
    mix, fix = F.normalize(mix, dim=-1), F.normalize(fix, dim=-1)
    sim = mix @ fix.T / tau
    probs = torch.diag(betas)
    probs[torch.arange(len(perm)), perm] += 1 - betas
    return 0.5 * (-(sim.log_softmax(-1) * probs).sum(-1).mean() - (sim.T.log_softmax(-1) * probs.T).sum(-1).mean())


def _mix_in_place(feats, draw):
    """The public code's ``mixco_image``/``mixco_text``: rows selected by the draw mixed in place."""
    shuffled = feats[draw.perm].clone()
    sel, lam = draw.mixed, draw.lam[:, None]
    feats[sel] = feats[sel] * lam[sel] + shuffled[sel] * (1 - lam[sel])
    return feats


@pytest.mark.parametrize("mix_both", [False, True])
def test_mixup_loss_matches_the_public_formula(mix_both):
    n = 10
    x, y = _unit(n, seed=2) * 3.0, _unit(n, seed=3) * 0.5  # any scale: features are re-normalised
    obj = build_objective({"name": "m3col", "mix_prob": 0.7, "mix_both": mix_both})
    obj.begin_step(StepContext(step=0, total_steps=9, seed=11))
    d_img, d_txt = obj.draws(n)
    assert d_img.mixed.any() and d_txt.mixed.any() and not d_img.mixed.all()
    _, term = _contrastive(obj, x, y)
    if mix_both:  # text_new and image_new mixed in place first, then both losses
        text_new, image_new = _mix_in_place(y.clone(), d_txt), _mix_in_place(x.clone(), d_img)
        ref = 0.5 * (_mixco_public(text_new, image_new, d_txt.perm, d_txt.lam)
                     + _mixco_public(image_new, text_new, d_img.perm, d_img.lam))
    else:  # the paper: each mixed modality against the other, unmixed
        ref = 0.5 * (_mixco_public(_mix_in_place(y.clone(), d_txt), x, d_txt.perm, d_txt.lam)
                     + _mixco_public(_mix_in_place(x.clone(), d_img), y, d_img.perm, d_img.lam))
    assert torch.allclose(term, ref, rtol=1e-12)


def test_soft_clip_after_the_mixup_fraction():
    x, y = _unit(9, seed=4), _unit(9, seed=5)
    obj = build_objective({"name": "m3col", "mixup_fraction": 0.5})
    obj.begin_step(StepContext(step=4, total_steps=10, seed=0))  # progress 0.4
    assert "mixup_contrastive" in obj.cross_sample({"image": x, "text": y}, {})
    obj.begin_step(StepContext(step=5, total_steps=10, seed=0))  # progress 0.5

    def soft_clip(preds, targs, temp=0.125):  # the public code's soft_clip_loss
        clip_clip, brain_clip = targs @ targs.T / temp, preds @ targs.T / temp
        return 0.5 * (-(brain_clip.log_softmax(-1) * clip_clip.softmax(-1)).sum(-1).mean()
                      - (brain_clip.T.log_softmax(-1) * clip_clip.softmax(-1)).sum(-1).mean())

    out = obj.cross_sample({"image": x, "text": y}, {})
    assert torch.allclose(out["soft_clip"], 0.5 * (soft_clip(x, y) + soft_clip(y, x)), rtol=1e-12)


def test_bad_settings_are_value_errors():
    for bad in ({"mix_prob": 1.5}, {"alpha": 0.0}, {"temperature": 0.0}, {"mixup_fraction": 2.0}, {"weight": -1.0}):
        with pytest.raises(ValueError, match="m3col"):
            build_objective({"name": "m3col", **bad})
    with pytest.raises(ValueError, match="modalities"):
        create_model(tiny_model_cfg(heads={"c": {"name": "classifier", "modality": "depth"}}))


# --- heads and the per-sample part ------------------------------------------------------
def test_heads_outputs_and_classifier_cross_entropies():
    model, batch = model_and_batch()
    out = model(model_inputs(batch, torch.device("cpu")))
    assert {k: tuple(v.shape) for k, v in out.items() if k.startswith("logits_")} == {
        "logits_image": (16, 4), "logits_text": (16, 4), "logits_fusion": (16, 4)}
    assert any(n.startswith("heads.cf.") for n, _ in model.named_parameters())
    fusion_in = model.heads["cf"].mlp[0].in_features
    assert fusion_in == 2 * model.embed_dim  # image and text concatenated
    image_only = model({"image": batch["image"]})
    assert "logits_image" in image_only and "logits_text" not in image_only and "logits_fusion" not in image_only
    obj = build_objective({"name": "m3col"})
    ce = obj.per_sample(out, batch)
    for name in ("image", "text", "fusion"):
        ref = F.cross_entropy(out[f"logits_{name}"], batch["label"], reduction="sum")
        assert torch.allclose(ce[f"ce_{name}"], ref, rtol=1e-12)


def _reference(model, objective, batch, chunk, step):
    """Full-batch loss, one backward through every chunk's graph (dropout drawn chunk-wise)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    outs = [model(model_inputs(c, torch.device("cpu"))) for c in split(batch, chunk)]
    out = {k: torch.cat([o[k] for o in outs]) if outs[0][k].shape[0] == chunk else outs[0][k] for k in outs[0]}
    step_fn = Step(PlainEngine(model), objective, torch.device("cpu"), total_steps=3, seed=7)
    objective.begin_step(StepContext(step, 3, 7, model, batch))
    losses = step_fn._loss(out, batch, GLOBAL_BATCH)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(losses["loss"].detach()), grads


@pytest.mark.parametrize("step", [0, 2], ids=["mixup", "soft_clip"])
def test_gradient_cache_equals_full_batch(step):
    """float64, dropout in the heads: K chunks give the full-batch loss and gradients."""
    model, batch = model_and_batch(dropout=0.3)
    for chunk in (16, 8, 4):
        objective = build_objective({"name": "m3col"})
        ref_loss, ref = _reference(model, objective, batch, chunk, step)
        torch.manual_seed(123)
        m = copy.deepcopy(model)
        m.zero_grad(set_to_none=True)
        losses = Step(PlainEngine(m), objective, torch.device("cpu"), chunk if chunk < 16 else 0,
                      total_steps=3, seed=7)(batch, step=step)
        got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        assert abs(losses["loss"] - ref_loss) <= 1e-10 * abs(ref_loss), chunk
        assert got.keys() == ref.keys() and any(n.startswith("heads.cf.") for n in got)
        for n in ref:
            err = (got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)
            assert err <= 1e-8, (chunk, n, float(err))
        assert ("soft_clip" in losses) == (step == 2) and {"ce_image", "ce_text", "ce_fusion"} <= losses.keys()


# --- 2 gloo ranks ------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_share_draws_and_equal_one_process(tmp_path):
    out = tmp_path / "two.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29637",
           os.path.join(ROOT, "tests", "m3col_dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    assert sorted(got) == sorted(CASES)
    for chunk, step, mix_both in CASES:
        model, batch = model_and_batch()
        ref_losses, ref_grads, ref_draws = one_step(model, batch, chunk, step, mix_both)
        case = got[(chunk, step, mix_both)]
        for rank_draws in case["draws"]:  # every rank drew the single-process permutations and weights
            for (perm, lam), (ref_perm, ref_lam) in zip(rank_draws, ref_draws):
                assert torch.equal(perm, ref_perm) and torch.equal(lam, ref_lam)
        assert abs(case["loss"] - ref_losses["loss"]) <= 1e-10 * abs(ref_losses["loss"])
        assert case["grads"].keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            err = (case["grads"][n] - g).norm() / g.norm().clamp_min(1e-30)
            assert err <= 1e-9, (chunk, step, mix_both, n, float(err))


# --- data, training and `vlp eval classify` ----------------------------------------------
def test_digits_multimodal_construction():
    import random

    from vlp.data.digits_multimodal import CLASSNAMES, caption

    assert len(CLASSNAMES) == 20 and CLASSNAMES[7] == "seven in red ink" and CLASSNAMES[13] == "three in blue ink"
    rng = random.Random(0)
    texts = [caption(7, 1, 0.5, 0.8, rng) for _ in range(4000)]
    assert all("blue ink" in t and "red" not in t for t in texts)
    hinted = [t for t in texts if "," in t]
    right = [t for t in hinted if t.split()[-1] in ("seven", "7")]
    assert abs(len(hinted) / len(texts) - 0.5) < 0.03 and abs(len(right) / len(hinted) - 0.8) < 0.03


def test_evaluate_classify_counts_every_head():
    """Accuracies against a direct count; a model without heads is a clear error."""
    from vlp.eval.classify import evaluate_classify

    model, batch = model_and_batch()
    batch["label"][3] = -1  # an unlabelled sample is skipped
    loader = [{k: v[:8] for k, v in batch.items()}, {k: v[8:] for k, v in batch.items()}]
    got = evaluate_classify(model, loader)
    with torch.no_grad():
        out = model.eval()(model_inputs(batch, torch.device("cpu")))
    keep = batch["label"] >= 0
    assert got["num_samples"] == 15
    for name in ("image", "text", "fusion"):
        pred = out[f"logits_{name}"].argmax(1)
        assert got[f"{name}_accuracy"] == float((pred == batch["label"])[keep].double().mean())
        recalls = [float((pred[keep & (batch["label"] == c)] == c).double().mean())
                   for c in range(4) if bool((keep & (batch["label"] == c)).any())]
        assert abs(got[f"{name}_mean_per_class_recall"] - sum(recalls) / len(recalls)) < 1e-12
    bare = create_model(tiny_model_cfg()).double()
    with pytest.raises(ValueError, match="no classifier heads"):
        evaluate_classify(bare, loader)


@pytest.mark.slow
def test_train_and_eval_classify(tmp_path, capsys):
    """data -> `vlp train` (the quickstart recipe, tiny towers, 6 steps) -> `vlp eval classify --json`."""
    from vlp.cli import main
    from vlp.data.digits_multimodal import write_digits_multimodal

    data, run = tmp_path / "mm", tmp_path / "run"
    counts = write_digits_multimodal(data)
    assert counts["train"] == 2874 and counts["val"] == 720  # 1797 scans x 2 inks, the digits split
    tiny = ["model.embed_dim=32", "model.image.width=32", "model.image.layers=1", "model.image.head_width=16",
            "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "data.batch_size=32",
            "data.workers=0", "logging.progress=false", "logging.every_steps=2", "optim.steps=6",
            "optim.warmup_steps=2"]
    recipe = os.path.join(ROOT, "configs", "quickstart", "m3col_digits.yaml")
    assert main(["train", recipe, *tiny, f"data.train={data}/train", f"data.val={data}/val", f"run.dir={run}"]) == 0
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "classify_num_samples" in r]  # the eval after the last step
    assert [r["step"] for r in steps] == [2, 4, 6] and [r["step"] for r in evals] == [6] and len(records) == 4
    assert "mixup_contrastive" in steps[0] and "soft_clip" in steps[-1]  # progress 4/6 >= 0.33
    assert all({"ce_image", "ce_text", "ce_fusion"} <= r.keys() for r in steps)
    capsys.readouterr()
    assert main(["eval", "classify", "--checkpoint", str(run), "--data", f"{data}/val", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_samples"] == 720
    # a count by hand of argmax hits in the run's logits_* outputs on every val sample, in the CLI's batches
    from vlp.data.stream import build_eval_loader
    from vlp.runs import eval_context, load_model_from_run

    cfg, model, tokenizer, transform = load_model_from_run(str(run))
    ctx = eval_context(cfg, model, tokenizer, transform)
    heads = ("image", "text", "fusion")
    rows = {name: [] for name in heads}  # name -> [(logits, label)] per sample
    with torch.no_grad():
        for batch in build_eval_loader(f"{data}/val", ctx.data_cfg, transform, tokenizer, batch_size=ctx.batch_size):
            out = model({"image": batch["image"], "text": batch["text"]})
            for name in heads:
                rows[name] += zip(out[f"logits_{name}"].tolist(), batch["label"].tolist())
    assert set(metrics) == {f"{n}_{m}" for n in heads for m in ("accuracy", "mean_per_class_recall")} | {"num_samples"}
    for name in heads:
        assert len(rows[name]) == 720 and all(label >= 0 for _, label in rows[name])
        right, seen = {}, {}  # label -> count
        for logits, label in rows[name]:
            pred = max(range(len(logits)), key=logits.__getitem__)  # the first of equal maxima, as argmax
            seen[label] = seen.get(label, 0) + 1
            right[label] = right.get(label, 0) + (pred == label)
        assert metrics[f"{name}_accuracy"] == pytest.approx(sum(right.values()) / 720, abs=1e-12)
        recall = sum(right[c] / seen[c] for c in seen) / len(seen)
        assert metrics[f"{name}_mean_per_class_recall"] == pytest.approx(recall, abs=1e-12)
    for key, value in metrics.items():  # the run's own eval of its last step: the same weights and batches
        assert evals[0][f"classify_{key}"] == pytest.approx(value, abs=1e-12), key
