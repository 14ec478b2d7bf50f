"""COCONUT: the NSPT loss against float64 references, the objective under the gradient
cache and on 2 gloo ranks, the replay memory (class balance, size, state), checkpoint /
resume of a continual run, and a short end-to-end continual run through the CLI."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import PlainEngine, child_env, tiny_batch, tiny_model_cfg
from vlp.data.continual import ContinualConfig, buffer_capacity, validate_continual
from vlp.data.replay import ReplayBuffer, batch_rows, collate_rows
from vlp.engine.checkpoint import FILES_KEY, META_FILE
from vlp.engine.step import Step
from vlp.eval.continual import summarize
from vlp.models import create_model
from vlp.objectives import build_objective
from vlp.objectives.base import StepContext
from vlp.objectives.coconut import nspt_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "quickstart", "coconut_digits.yaml")
TINY = [
    "model.embed_dim=16", "model.image.width=32", "model.image.layers=1", "model.image.head_width=16",
    "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
    "data.batch_size=16", "data.workers=0", "logging.progress=false", "logging.every_steps=1",
    "optim.warmup_steps=2", "eval.batch_size=128",
]


# ---------------------------------------------------------------- NSPT vs references


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def nspt_reference(s, t, labels, rehearsal, tau, self_positive=False):
    """The issue's formula term by term (float64 loops), averaged over anchors with a positive."""
    terms = []
    for i in range(len(s)):
        if not rehearsal[i]:
            continue
        pos = [p for p in range(len(s)) if rehearsal[p] and labels[p] == labels[i] and (p != i or self_positive)]
        if not pos:
            continue
        denom = sum(torch.exp(s[i] @ s[a] / tau) for a in range(len(s)) if a != i)
        terms.append(-sum(torch.log(torch.exp(s[i] @ t[p] / tau) / denom) for p in pos) / len(pos))
    return sum(terms) / len(terms)


def supcon_reference(z, labels, tau):
    """Khosla et al.'s SupCon L_out on one view: anchors i, positives p != i with i's label,
    denominator over every a != i; mean over the anchors that have a positive."""
    sim = z @ z.T / tau
    out = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        pos = [p for p in others if labels[p] == labels[i]]
        if pos:
            log_prob = sim[i] - torch.logsumexp(sim[i, others], 0)
            out.append(-log_prob[pos].mean())
    return torch.stack(out).mean()


def test_nspt_zero_without_rehearsal_rows():
    x = _unit(12, 8, 0).requires_grad_(True)
    loss = nspt_loss(x, _unit(12, 8, 1), torch.randint(0, 3, (12,)), torch.zeros(12, dtype=torch.long), 0.1)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x.grad.abs().max()) == 0.0


def test_nspt_matches_the_formula():
    s, t = _unit(12, 8, 0), _unit(12, 8, 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0])
    rehearsal = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1])  # class 3: one rehearsal row, no positive
    for self_positive in (False, True):
        got = nspt_loss(s, t, labels, rehearsal, 0.2, self_positive)
        ref = nspt_reference(s, t, labels, rehearsal, 0.2, self_positive)
        assert abs(float(got) - float(ref)) <= 1e-12 * abs(float(ref)), self_positive


def test_nspt_is_supcon_when_teacher_is_student():
    z = _unit(16, 8, 3)
    labels = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(0))
    got = nspt_loss(z, z, labels, torch.ones(16, dtype=torch.long), 0.1)
    assert abs(float(got) - float(supcon_reference(z, labels, 0.1))) <= 1e-12 * float(got)


def _coconut_setup(nspt_weight=1.0):
    cfg = tiny_model_cfg(heads={"cls": {"name": "coconut_classifier", "num_classes": 4}})
    cfg.image["patch_dropout"] = 0.25  # RNG replay must reproduce it
    torch.manual_seed(0)
    model = create_model(cfg).double().train()
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in tiny_batch(16, cfg).items()}
    batch["rehearsal"] = torch.tensor([0] * 8 + [1] * 8)
    batch["teacher"] = torch.cat([torch.zeros(8, 16, dtype=torch.float64), _unit(8, 16, 5)])
    objective = build_objective({"name": "coconut", "nspt_weight": nspt_weight, "temperature": 0.2})
    objective.set_seen_classes([0, 1, 2])  # class 3 of the head is masked out
    batch["label"] = batch["label"] % 3
    return model, objective, batch


def _step_grads(model, objective, batch, chunk):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    losses = Step(PlainEngine(model), objective, torch.device("cpu"), chunk_size=chunk)(batch)
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_coconut_gradient_cache_equals_plain_step():
    model, objective, batch = _coconut_setup()
    ref_losses, ref = _step_grads(model, objective, batch, chunk=0)
    assert ref_losses["nspt"] > 0 and ref_losses["supervised"] > 0 and "heads.cls.mlp.0.weight" in ref
    for chunk in (8, 4):
        losses, got = _step_grads(copy.deepcopy(model), objective, batch, chunk)
        for key in ("loss", "nspt", "contrastive", "supervised"):
            assert abs(losses[key] - ref_losses[key]) <= 1e-9 * abs(ref_losses[key]), (chunk, key)
        for name in ref:
            err = (got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)
            assert err <= 1e-6, (chunk, name, float(err))


def test_coconut_terms_and_weights():
    """loss = w_c·InfoNCE + w_n·NSPT + w_s·CE(seen classes) with distinct weights, each term
    written out here (float64); NSPT 0 without rehearsal fields."""
    model, _, batch = _coconut_setup()
    w_c, w_n, w_s = 0.3, 2.0, 0.7
    objective = build_objective({"name": "coconut", "nspt_weight": w_n, "contrastive_weight": w_c,
                                 "supervised_weight": w_s, "temperature": 0.2})
    objective.set_seen_classes([0, 1, 2])
    with torch.no_grad():
        out = model({"image": batch["image"], "text": batch["text"]})
        step = Step(PlainEngine(model), objective, torch.device("cpu"))
        objective.begin_step(StepContext(batch=batch))
        losses = step._loss(out, batch, 16)
        # InfoNCE: symmetric cross-entropy of s·x·yᵀ, positives on the diagonal
        logits = out["logit_scale"] * out["image"] @ out["text"].T  # (16, 16)
        log_i2t, log_t2i = logits.log_softmax(1), logits.T.log_softmax(1)
        clip = -(log_i2t.diagonal().mean() + log_t2i.diagonal().mean()) / 2
        nspt = nspt_reference(out["image"], batch["teacher"], batch["label"].tolist(), batch["rehearsal"].tolist(),
                              0.2)
        # CE over the seen classes 0..2 only: the softmax runs over those columns
        seen = out["class_logits"][:, :3].log_softmax(1)
        ce = -seen[torch.arange(16), batch["label"]].mean()
    assert float(nspt) > 0.1 and float(ce) > 0.1 and float(clip) > 0.1  # every term counts
    want = w_c * clip + w_n * nspt + w_s * ce
    assert abs(float(losses["loss"]) - float(want)) <= 1e-12 * float(want)
    for key, value in (("contrastive", clip), ("nspt", nspt), ("supervised", w_s * ce)):
        assert abs(float(losses[key]) - float(value)) <= 1e-12 * float(value), key
    objective.begin_step(StepContext(batch={k: v for k, v in batch.items() if k not in ("rehearsal", "teacher")}))
    with torch.no_grad():
        plain = step._loss(out, batch, 16)
    assert float(plain["nspt"]) == 0.0
    assert abs(float(plain["loss"]) - float(w_c * clip + w_s * ce)) <= 1e-12 * float(want)


# ---------------------------------------------------------------- 2 gloo ranks


def _nspt_rank(rank, world, port, out):
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    s, t = _unit(16, 8, 0), _unit(16, 8, 1)
    labels = torch.arange(16) % 3
    rehearsal = (torch.arange(16) % 4 != 0).long()
    rows = slice(rank * 8, rank * 8 + 8)
    x = s[rows].clone().requires_grad_(True)
    loss = nspt_loss(x, t[rows], labels[rows], rehearsal[rows], 0.1)
    loss.backward()
    torch.save({"loss": float(loss), "grad": x.grad}, f"{out}.{rank}")
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.mark.slow
def test_nspt_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from vlp.dist import _free_port

    mp.spawn(_nspt_rank, args=(2, _free_port(), str(tmp_path / "r")), nprocs=2)
    s, t = _unit(16, 8, 0), _unit(16, 8, 1)
    x = s.clone().requires_grad_(True)
    ref = nspt_loss(x, t, torch.arange(16) % 3, (torch.arange(16) % 4 != 0).long(), 0.1)
    ref.backward()
    got = [torch.load(tmp_path / f"r.{r}") for r in range(2)]
    # the mean over ranks is the single-process loss; the engine averages gradients over ranks
    assert abs(sum(g["loss"] for g in got) / 2 - float(ref.detach())) <= 1e-12
    grad = torch.cat([g["grad"] for g in got]) / 2
    assert torch.allclose(grad, x.grad, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- the replay memory


def _rows(classes_counts, start=0):
    """Rows with a unique ``key`` and a ``label``, classes interleaved as a stream would give them."""
    rows, i = [], start
    pools = {c: n for c, n in classes_counts.items()}
    while any(pools.values()):
        for c in list(pools):
            if pools[c]:
                rows.append({"label": torch.tensor(c), "key": f"s{i}", "image": torch.full((2,), float(i))})
                pools[c] -= 1
                i += 1
    return rows


def test_class_balanced_buffer_quotas_and_size():
    buf = ReplayBuffer(50, "class_balanced", seed=0)
    buf.add_task(_rows({0: 200, 1: 40}), [0, 1])
    assert buf.class_counts() == {0: 25, 1: 25}
    buf.add_task(_rows({2: 300, 3: 7, 9: 5}, start=1000), [2, 3])  # class 9 is not the task's: ignored
    assert len(buf) <= 50 and buf.class_counts() == {0: 13, 1: 13, 2: 12, 3: 7}  # 3 has only 7 rows
    keys = [r["key"] for r in buf.rows]
    assert len(set(keys)) == len(keys)
    buf.add_task(_rows({4: 100, 5: 100, 6: 100, 7: 100}, start=5000), [4, 5, 6, 7])
    counts = buf.class_counts()
    assert len(buf) <= 50 and sorted(counts) == list(range(8))
    full = [n for c, n in counts.items() if c != 3]
    assert max(full) - min(full) <= 1 and counts[3] <= 7


def test_class_balanced_reservoir_is_uniform():
    """Each of a class's 20 rows is kept with probability quota/20 (reservoir sampling)."""
    hits = torch.zeros(20)
    for seed in range(400):
        buf = ReplayBuffer(10, "class_balanced", seed=seed)
        buf.add_task(_rows({0: 20, 1: 20}), [0, 1])
        for r in buf.rows:
            if int(r["label"]) == 0:
                hits[int(r["image"][0]) // 2] += 1  # class 0 rows have even indices
    freq = hits / 400
    assert (freq - 0.25).abs().max() < 0.1  # 5 of 20 kept; binomial sd ≈ 0.022


def test_random_buffer_size_and_classes():
    buf = ReplayBuffer(30, "random", seed=1)
    buf.add_task(_rows({0: 50, 1: 50}), [0, 1])
    buf.add_task(_rows({2: 100}, start=500), [2])
    counts = buf.class_counts()
    assert len(buf) == 30 and set(counts) <= {0, 1, 2} and buf.seen == 200
    assert counts.get(2, 0) > counts.get(0, 0)  # proportional to the data seen (100 vs 50): not balanced


def test_buffer_state_round_trip_continues_the_same_draws():
    a = ReplayBuffer(20, "class_balanced", seed=3)
    a.add_task(_rows({0: 30, 1: 30}), [0, 1])
    b = ReplayBuffer(20, "class_balanced", seed=99)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for buf in (a, b):
        buf.add_task(_rows({2: 40, 3: 40}, start=100), [2, 3])
    assert [r["key"] for r in a.rows] == [r["key"] for r in b.rows]
    with pytest.raises(ValueError, match="policy"):
        ReplayBuffer(20, "random").load_state_dict(a.state_dict())


def test_batch_rows_round_trip():
    batch = {"image": torch.randn(4, 3), "label": torch.tensor([0, 1, 2, 1]), "key": list("abcd"), "n_skipped": 0}
    rows = batch_rows(batch, {1})
    assert [r["key"] for r in rows] == ["b", "d"] and rows[0]["image"].data_ptr() != batch["image"][1].data_ptr()
    back = collate_rows(rows)
    assert torch.equal(back["image"], batch["image"][[1, 3]]) and back["label"].tolist() == [1, 1]


def test_continual_config_errors(tmp_path):
    bad = [({"tasks": [[0, 1], [1, 2]]}, "one task only"), ({"tasks": [[0], []]}, "at least one"),
           ({"tasks": [[0]], "policy": "fifo"}, "policy"),
           ({"tasks": [[0]], "replay_fraction": 1.0}, "replay_fraction"),
           ({"tasks": [[0]], "buffer_size": "lots"}, "buffer_size")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            validate_continual(ContinualConfig(**kw))
    from vlp.data.shards import write_shards

    write_shards(tmp_path / "train", ({"__key__": f"k{i}", "txt": "a", "cls": i % 2} for i in range(25)), 10)
    # 40% of 25 samples in 3 shards, split over 2 ranks
    assert buffer_capacity(ContinualConfig(tasks=[[0]], buffer_size="40%"), str(tmp_path / "train"), 2) == 5
    assert buffer_capacity(ContinualConfig(tasks=[[0]], buffer_size="200"), "unused", 3) == 66


def test_summarize_forgetting():
    m = summarize([[0.9], [0.6, 0.8], [0.7, 0.5, 0.9]], [0.9, 0.7, 0.7])
    assert m["forgetting"] == pytest.approx([0.9 - 0.7, 0.8 - 0.5])
    assert m["average_accuracy"] == pytest.approx(2.3 / 3) and m["final_accuracy"] == 0.7


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from vlp.data.digits import write_digits

    out = tmp_path_factory.mktemp("data") / "digits"
    write_digits(out)
    return out


def _cfg(digits, run, *extra):
    from vlp.config import load_config

    return load_config(RECIPE, [*TINY, f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}",
                                "eval.zeroshot=false", *extra])


def test_buffer_survives_checkpoint_and_resume(digits, tmp_path, monkeypatch):
    from vlp.continual import ContinualTrainer
    from vlp.runs import task_weights

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    extra = ["continual.tasks=[[0,1],[2,3]]", "continual.steps_per_task=2", "run.checkpoint_every=3",
             "continual.buffer_size=24"]
    trainer = ContinualTrainer(_cfg(digits, run, *extra))
    trainer.fit()
    saved = torch.load(run / "checkpoints" / "step_00000003" / "client_rank0.pt", weights_only=False)["buffer"]
    assert [int(r["label"]) for r in saved["rows"]] == [0] * 12 + [1] * 12  # after task 0, at step 3 (task 1)
    (run / "checkpoints" / "latest").write_text("step_00000003")  # as if the run had died at step 4

    def resumed():
        t = ContinualTrainer(_cfg(digits, run, *extra))
        t.resume()
        return t

    back = resumed()
    assert back.state.step == 3 and back.tasks_done == 1
    assert [r["key"] for r in back.buffer.rows] == [r["key"] for r in saved["rows"]]
    assert back.buffer.rng.getstate() == saved["rng"]
    from safetensors.torch import load_file

    snapshot = load_file(task_weights(str(run), 0))
    assert all(torch.equal(p, snapshot[n]) for n, p in back.teacher.state_dict().items())
    student = back.engine.module.state_dict()  # the step-3 weights: not the teacher's
    assert any(not torch.equal(p, student[n]) for n, p in back.teacher.state_dict().items())
    # without this rank's file (another number of ranks) the memory is rebuilt from task 0's data
    tag = run / "checkpoints" / "step_00000003"
    os.remove(tag / "client_rank0.pt")
    meta = json.loads((tag / META_FILE).read_text())  # the checkpoint's own record no longer lists it
    del meta[FILES_KEY]["client_rank0.pt"]
    (tag / META_FILE).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = resumed()
    assert [r["key"] for r in rebuilt.buffer.rows] == [r["key"] for r in saved["rows"]]


def vlp(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "vlp", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_short_continual_run_end_to_end(digits, tmp_path):
    run = tmp_path / "run"
    vlp("train", RECIPE, *TINY, f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}",
        "continual.tasks=[[0,1,2,3,4],[5,6,7,8,9]]", "continual.steps_per_task=3", "continual.buffer_size=40",
        "run.checkpoint_every=100")
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r for r in records if "nspt" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(r["nspt"] == 0 for r in steps[:3]) and all(r["nspt"] > 0 for r in steps[3:])
    final = next(r for r in records if "zeroshot_top1" in r)
    out = vlp("eval", "continual", "--checkpoint", str(run), "--data", f"{digits}/val", "--json").stdout
    m = json.loads(out.strip().splitlines()[-1])
    assert m["tasks_done"] == 2 and m["num_samples"] == 360
    for metric in ("zeroshot", "classifier"):
        assert len(m[metric]["accuracy"]) == 2 and len(m[metric]["forgetting"]) == 1
        assert len(m[metric]["task_accuracy"][1]) == 2
        assert all(0 <= a <= 1 for a in m[metric]["accuracy"])
    # after the last task every class is seen: the trainer's all-class zero-shot top-1
    assert abs(m["zeroshot"]["accuracy"][-1] - final["zeroshot_top1"]) <= 1e-9
    bad = vlp("eval", "continual", "--checkpoint", str(tmp_path), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "tasks.json" in bad.stderr
