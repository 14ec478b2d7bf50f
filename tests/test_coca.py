"""CoCa: the model (open_clip's CoCa, pooling modes, causality), the ``coca`` objective
(= open_clip's CoCaLoss, pad ignored, gradient cache exact), generation (KV cache = full
recompute, beam search exact on a tiny search space) and export to open_clip."""
import copy
import json
import math
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

from tests.tiny import PlainEngine, child_env, tiny_model_cfg
from vlp.engine.step import Step, model_inputs, split
from vlp.models import ModelConfig, create_model
from vlp.models.coca import IGNORE_INDEX, CoCaModel
from vlp.models.factory import model_kind, open_clip_model_cfg
from vlp.models.generate import GenerationConfig, KVDecoder, Recompute, SpecialIds, generate
from vlp.objectives import build_objective
from vlp.objectives.base import StepContext
from vlp.objectives.coca import IGNORE_INDEX as OBJECTIVE_IGNORE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = SpecialIds(sot=1, eot=2, pad=0)
VOCAB, CTX = 64, 8


def tiny_coca_cfg(pooling: str = "open_clip", **kw) -> ModelConfig:
    cfg = tiny_model_cfg(kind="coca", embed_dim=32, coca={"pooling": pooling, "caption_queries": 5,
                                                           "pooler_heads": 2, "layers": 2, "heads": 2}, **kw)
    cfg.image["patch_dropout"] = 0.0
    return cfg


def coca_batch(n: int, seed: int = 0, size: int = 16):
    """Images and captions of random lengths: start token, words, end token, then pad."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(n, CTX, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(1, CTX - 1, (1,), generator=g))  # words, 1 .. CTX-2
        text[i, 0], text[i, length + 1] = SPECIAL.sot, SPECIAL.eot
        text[i, 1 : length + 1] = torch.randint(3, VOCAB, (length,), generator=g)
    return {"image": torch.randn(n, 3, size, size, generator=g), "text": text}


def _model(pooling="open_clip", dtype=torch.float64, patch_dropout=0.0, seed=0):
    cfg = tiny_coca_cfg(pooling)
    cfg.image["patch_dropout"] = patch_dropout
    torch.manual_seed(seed)
    return create_model(cfg).to(dtype)


def _double(batch):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}


def _losses(model, objective, batch):
    """The plain step's losses (the graph kept) of ``objective`` on ``batch``."""
    objective.begin_step(StepContext(batch=batch, model=model))
    out = model(model_inputs(batch, torch.device("cpu")))
    return out, Step(PlainEngine(model), objective, torch.device("cpu"))._loss(out, batch, len(batch["text"]))


# ---- model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["open_clip", "parallel", "cascade", "none"])
def test_outputs_and_pooling(pooling):
    model = _model(pooling)
    assert isinstance(model, open_clip.CoCa) and model.logit_scale.shape == (1,)
    batch = _double(coca_batch(3))
    out = model(batch)
    assert out["image"].shape == out["text"].shape == (3, 32)
    assert torch.allclose(out["image"].norm(dim=-1), torch.ones(3, dtype=torch.float64))
    assert out["caption_logits"].shape == (3, CTX - 1, VOCAB)
    labels = batch["text"][:, 1:]
    assert torch.equal(out["caption_labels"], labels.masked_fill(labels == 0, IGNORE_INDEX))
    names = set(model.state_dict())
    # the paper's 1-query contrastive pooler exists only in parallel/cascade, beside the caption pooler
    assert ("visual.attn_pool_contrastive.query" in names) == (pooling in ("parallel", "cascade"))
    _, tokens = model._encode_image(batch["image"])
    if pooling == "none":  # the 4 patch tokens of the 16x16 image, 8x8 patches
        assert model.visual.attn_pool is None and tokens.shape == (3, 4, 32)
        return
    assert model.visual.attn_pool.query.shape[0] == 5
    assert tokens.shape == (3, 4 if pooling == "open_clip" else 5, 32)  # open_clip: query 0 is contrastive


def test_paper_pooling_needs_image_width_equal_embed_dim():
    cfg = tiny_coca_cfg("parallel")
    cfg.image["width"] = 64
    with pytest.raises(ValueError, match="image width equal to embed_dim"):
        create_model(cfg)
    with pytest.raises(ValueError, match="pooling must be one of"):
        create_model(tiny_coca_cfg("mean"))
    with pytest.raises(ValueError, match="unknown key 'queries'"):
        create_model(tiny_model_cfg(kind="coca", embed_dim=32, coca={"queries": 4}))
    with pytest.raises(ValueError, match="unknown model kind 'cocoa'"):
        create_model(tiny_model_cfg(kind="cocoa"))


def test_decoder_is_initialised():
    """open_clip 3.3 leaves text_decoder.text_projection as torch.empty; ours is N(0, 1/width)."""
    proj = _model(dtype=torch.float32, seed=1).text_decoder.text_projection.detach()
    assert torch.isfinite(proj).all() and 0.5 < float(proj.std() * 32 ** 0.5) < 1.5


@pytest.mark.parametrize("arch", ["coca_ViT-B-32", "coca_ViT-L-14", "coca_base"])
def test_open_clip_coca_architecture(arch):
    """model.open_clip: coca_* is kind coca and has open_clip's CoCa parameters, name for name."""
    cfg = ModelConfig(open_clip=arch)
    assert model_kind(cfg) == "coca" and model_kind(ModelConfig(open_clip="ViT-B-32")) == "clip"
    model_cfg = open_clip_model_cfg(cfg)
    ref_cfg = open_clip.get_model_config(arch)
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        for key, value in ref_cfg[tower].items():
            assert model_cfg[tower][key] == value, (tower, key)
    with torch.device("meta"):  # no memory, no init cost
        ours = create_model(cfg)
        ref = open_clip.create_model(arch, device="meta")
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    ref_shapes = shapes(ref)
    ref_shapes["logit_scale"] = (1,)  # ours is nonscalar (DeepSpeed cannot broadcast 0-d params)
    assert shapes(ours) == ref_shapes
    assert isinstance(ours, CoCaModel)


def test_causal():
    """Changing token t+1 leaves the caption logits at positions <= t unchanged (and changes t+1)."""
    model = _model().eval()
    batch = _double(coca_batch(2, seed=1))
    batch["text"][:, 1 : CTX - 1] = torch.randint(3, VOCAB, (2, CTX - 2))  # no pad: every position counts
    base = model(batch)["caption_logits"]
    for t in range(CTX - 2):
        changed = {**batch, "text": batch["text"].clone()}
        changed["text"][:, t + 1] = (changed["text"][:, t + 1] - 3 + 1) % (VOCAB - 3) + 3
        logits = model(changed)["caption_logits"]
        assert torch.equal(logits[:, : t + 1], base[:, : t + 1]), t
        assert not torch.allclose(logits[:, t + 1], base[:, t + 1])


# ---- objective -----------------------------------------------------------------------------------


def test_loss_equals_open_clip_coca_loss():
    model = _model()
    batch = _double(coca_batch(6, seed=2))
    assert (batch["text"] == 0).any()  # pads present
    out, losses = _losses(model, build_objective({"name": "coca"}), batch)
    ref = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    clip_ref, caption_ref = ref(out["image"], out["text"], out["caption_logits"], batch["text"][:, 1:],
                                out["logit_scale"])
    assert torch.allclose(losses["caption"], caption_ref, rtol=1e-12)
    assert torch.allclose(losses["loss"], clip_ref + caption_ref, rtol=1e-12)
    assert OBJECTIVE_IGNORE == IGNORE_INDEX


def test_caption_weight_zero_is_infonce():
    model = _model()
    batch = _double(coca_batch(6, seed=3))
    _, coca = _losses(model, build_objective({"name": "coca", "caption_loss_weight": 0.0}), batch)
    _, clip = _losses(model, build_objective({"name": "infonce"}), batch)
    assert torch.allclose(coca["loss"], clip["loss"], rtol=1e-12)
    assert float(coca["caption"].detach()) == 0.0


def test_pad_positions_do_not_affect_loss():
    """Logits at pad targets are ignored, and the caption loss is the mean CE over the
    non-pad targets (float64 formula)."""
    model = _model()
    batch = _double(coca_batch(5, seed=4))
    objective = build_objective({"name": "coca", "clip_loss_weight": 0.0, "caption_loss_weight": 1.0})
    out, losses = _losses(model, objective, batch)
    logits = out["caption_logits"].detach().clone().requires_grad_(True)
    targets = batch["text"][:, 1:]
    keep = targets != 0
    expected = -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0][keep].mean()
    assert torch.allclose(losses["caption"], expected, rtol=1e-12)
    noisy = logits.detach().clone()
    noisy[~keep] = torch.randn_like(noisy[~keep]) * 100
    for x in (logits, noisy):
        got = objective.per_sample({**out, "caption_logits": x}, batch)["caption"] / len(batch["text"])
        assert torch.allclose(got, expected, rtol=1e-12)
    (grad,) = torch.autograd.grad(objective.per_sample({**out, "caption_logits": logits}, batch)["caption"], logits)
    assert grad[~keep].abs().max() == 0 and grad[keep].abs().max() > 0


def test_wrong_pad_id_is_caught():
    model = _model()
    batch = _double(coca_batch(4, seed=5))
    with pytest.raises(ValueError, match="pad id"):
        _losses(model, build_objective({"name": "coca", "pad_id": 7}), batch)


def _full_graph_grads(model, objective, batch, chunk):
    """Reference: one backward through every chunk's graph (patch-dropout masks drawn chunk-wise)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    outs = [model(model_inputs(c, torch.device("cpu"))) for c in split(batch, chunk)]
    out = {k: torch.cat([o[k] for o in outs]) if k != "logit_scale" else outs[0][k] for k in outs[0]}
    objective.begin_step(StepContext(batch=batch))
    losses = Step(PlainEngine(model), objective, torch.device("cpu"))._loss(out, batch, len(batch["text"]))
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(losses["loss"].detach()), grads


@pytest.mark.parametrize("pooling", ["open_clip", "parallel"])
def test_gradient_cache_equals_full_batch(pooling):
    """Chunks K in {1, 2, 4} give the full-batch loss and gradients (float64, patch dropout on;
    captions of different lengths, so chunks hold different numbers of target tokens)."""
    model = _model(pooling, patch_dropout=0.25).train()
    objective = build_objective({"name": "coca"})
    batch = _double(coca_batch(16, seed=6))
    for k in (1, 2, 4):
        ref_loss, ref = _full_graph_grads(model, objective, batch, chunk=16 // k)
        got_model = copy.deepcopy(model)
        got_model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        losses = Step(PlainEngine(got_model), objective, torch.device("cpu"), chunk_size=16 // k)(batch)
        got = {n: p.grad for n, p in got_model.named_parameters() if p.grad is not None}
        assert abs(losses["loss"] - ref_loss) <= 1e-9 * abs(ref_loss), k
        assert got.keys() == ref.keys() and "text_decoder.text_projection" in got and "logit_scale" in got
        for name in ref:
            err = (got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)
            assert err <= 1e-6, (k, name, float(err))


# ---- generation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["open_clip", "cascade"])
def test_kv_cache_equals_recompute(pooling):
    model = _model(pooling).eval()
    batch = _double(coca_batch(3, seed=7))
    batch["text"][:, 1:] = torch.randint(3, VOCAB, (3, CTX - 1))  # generated prefixes hold no pad
    _, tokens = model._encode_image(batch["image"])
    cached, full = KVDecoder(model, tokens), Recompute(model, tokens)
    for t in range(CTX):
        new = batch["text"][:, t : t + 1]
        assert torch.allclose(cached(new), full(new), rtol=0, atol=1e-10), t
    for strategy in ("greedy", "beam", "top_k", "top_p"):
        gen = GenerationConfig(strategy=strategy, num_beams=3, seed=0, repetition_penalty=1.2)
        assert torch.equal(generate(model, batch["image"], SPECIAL, gen),
                           generate(model, batch["image"], SPECIAL, gen, use_cache=False)), strategy


def test_beam_search_finds_the_best_two_token_caption():
    """With as many beams as tokens and two tokens to go, beam search is exhaustive: it
    returns the argmax of log p(a) + log p(b | a) over all pairs (b may be the end token)."""
    model = _model(seed=3).eval()
    image = _double(coca_batch(1, seed=8))["image"]
    gen = GenerationConfig(strategy="beam", num_beams=VOCAB, max_length=2, min_length=1, length_penalty=0.0)
    got = generate(model, image, SPECIAL, gen)[0].tolist()
    _, tokens = model._encode_image(image)
    allowed = [a for a in range(VOCAB) if a not in (SPECIAL.sot, SPECIAL.pad, SPECIAL.eot)]
    prefixes = torch.tensor([[SPECIAL.sot, a] for a in allowed])
    logp = model.caption_logits(tokens.expand(len(allowed), -1, -1), prefixes).log_softmax(-1)  # (A, 2, V)
    pair = logp[torch.arange(len(allowed)), 0, torch.tensor(allowed)][:, None] + logp[:, 1]  # (A, V)
    pair[:, [SPECIAL.sot, SPECIAL.pad]] = -float("inf")
    best = int(pair.argmax())
    a, b = allowed[best // VOCAB], best % VOCAB
    assert got[:3] == [SPECIAL.sot, a, b]


def test_generation_options():
    model = _model().eval()
    image = _double(coca_batch(2, seed=9))["image"]
    ids = generate(model, image, SPECIAL, GenerationConfig(strategy="greedy", min_length=4, max_length=5))
    assert ids.shape[1] <= 6 and ids[:, 0].eq(SPECIAL.sot).all()
    for row in ids.tolist():
        assert SPECIAL.eot not in row[1:5] and SPECIAL.pad not in row[1:5]  # min_length 4: no early end
    rep = generate(model, image, SPECIAL, GenerationConfig(strategy="greedy", repetition_penalty=1e6))
    for row in rep.tolist():
        words = [t for t in row[1:] if t not in (SPECIAL.eot, SPECIAL.pad)]
        assert len(words) == len(set(words))  # a huge penalty forbids repeats
    with pytest.raises(ValueError, match="unknown generation strategy"):
        generate(model, image, SPECIAL, GenerationConfig(strategy="nucleus"))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, image, SPECIAL, GenerationConfig(strategy="top_p", top_p=0.0))


def test_top_k_one_and_top_p_near_zero_are_greedy():
    """Sampling from the top 1 token, or from the smallest set of mass >= 1e-9 (the top token),
    is greedy decoding, token for token, whatever the seed. Sampling without the cut (k = V)
    draws other tokens from the tiny model's flat distributions, so the equalities can fail."""
    model = _model(seed=4).eval()
    image = _double(coca_batch(4, seed=11))["image"]
    for penalty in (1.0, 1.3):  # with the repetition penalty too: the processors run before the cut
        greedy = generate(model, image, SPECIAL, GenerationConfig(strategy="greedy", repetition_penalty=penalty))
        assert greedy.shape[1] > 2  # at least two tokens decoded per caption
        for seed in (0, 1):
            for cut in ({"strategy": "top_k", "top_k": 1}, {"strategy": "top_p", "top_p": 1e-9}):
                gen = GenerationConfig(seed=seed, repetition_penalty=penalty, **cut)
                assert torch.equal(generate(model, image, SPECIAL, gen), greedy), (penalty, seed, cut)
                assert torch.equal(generate(model, image, SPECIAL, gen, use_cache=False), greedy), (penalty, seed, cut)
        uncut = generate(model, image, SPECIAL, GenerationConfig(strategy="top_k", top_k=VOCAB, seed=0,
                                                                 repetition_penalty=penalty))
        width = max(uncut.shape[1], greedy.shape[1])
        pad = lambda x: F.pad(x, (0, width - x.shape[1]), value=SPECIAL.pad)  # noqa: E731
        assert not torch.equal(pad(uncut), pad(greedy))


class _IdTokenizer:
    """Captions as their token ids: all ``evaluate_captions`` needs of a tokenizer."""

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_evaluate_captions_loss_is_the_token_mean_cross_entropy():
    """caption_loss = Σ CE over the non-pad target tokens of every batch / their count (not a mean of
    batch means: the batches hold different numbers of tokens), from the decoder logits and the
    shifted text tokens; perplexity = exp(caption_loss)."""
    from vlp.eval.caption import evaluate_captions

    model = _model(dtype=torch.float32, seed=5).eval()
    batches = [coca_batch(n, seed=20 + n) for n in (3, 5, 2)]
    counts = [int((b["text"][:, 1:] != SPECIAL.pad).sum()) for b in batches]
    means = []
    ce_sum = 0.0
    with torch.no_grad():
        for b in batches:
            _, tokens = model._encode_image(b["image"])
            logits = model.caption_logits(tokens, b["text"][:, :-1]).double()  # (B, L-1, V): position t -> t+1
            targets = b["text"][:, 1:]
            keep = targets != SPECIAL.pad  # the end token counts, pad does not
            ce = -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0][keep]
            ce_sum += float(ce.sum())
            means.append(float(ce.mean()))
    expected = ce_sum / sum(counts)
    assert len(set(counts)) == 3 and abs(sum(means) / 3 - expected) > 1e-3 * expected  # the two means differ
    m = evaluate_captions(model, batches, _IdTokenizer(), SPECIAL, GenerationConfig(strategy="greedy"))
    assert m["num_samples"] == 10 and m["num_tokens"] == sum(counts)
    # float32 logits in the evaluator, float64 here: a few float32 ulps per term of a sum of < 64 terms
    assert m["caption_loss"] == pytest.approx(expected, rel=1e-5)
    assert math.isclose(m["perplexity"], math.exp(m["caption_loss"]), rel_tol=1e-12)
    assert model.training is False


def test_caption_cli_errors(tmp_path, capsys):
    from vlp.cli import main

    assert main(["caption", "--checkpoint", str(tmp_path / "nope"), "--images", "a.png"]) == 2
    assert main(["caption", "--checkpoint", str(tmp_path), "--images", str(tmp_path / "a.png")]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["caption", "--checkpoint", str(tmp_path), "--images", __file__, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_names_class():
    from vlp.eval.caption import class_patterns, named_classes

    digits = class_patterns(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    assert named_classes("a handwritten seven", digits) == [7]
    assert named_classes("the number 7 written by hand", digits) == [7]
    assert named_classes("a photo of the digit 17", digits) == []  # whole tokens only
    assert named_classes("a one or a 2", digits) == [1, 2]
    assert named_classes("a cat", class_patterns(["cat", "dog"])) == [0]
    assert named_classes("class 1", class_patterns(["cat", "dog"])) == []  # numerals only for the digits


def test_corpus_bleu():
    pytest.importorskip("sacrebleu")
    from vlp.eval.caption import corpus_bleu

    refs = ["a handwritten seven", "the number 7 written by hand"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert corpus_bleu(["zebra zebra zebra", "cat cat cat cat cat"], refs) == 0.0


# ---- export ---------------------------------------------------------------------------------------


def _write_run(tmp_path, cfg: ModelConfig, model) -> str:
    from safetensors.torch import save_file

    from vlp.config import Config, save_config

    run = tmp_path / "weights"
    run.mkdir()
    save_config(Config(model=cfg), str(run / "config.yaml"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    return str(run)


def _open_clip_greedy(oc, image, steps: int, special: SpecialIds = SPECIAL):
    """Greedy decoding with open_clip's own CoCa forward (whole prefix each step); start and
    pad suppressed and no end token first, as vlp.models.generate's defaults (min_length 1)."""
    ids = torch.full((len(image), 1), special.sot)
    latent, embs = oc._encode_image(image)
    for _ in range(steps):
        logits = oc(image, ids, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
        logits[:, [special.sot, special.pad]] = -float("inf")
        if ids.shape[1] < 2:
            logits[:, special.eot] = -float("inf")
        nxt = logits.argmax(-1, keepdim=True)
        nxt[(ids == special.eot).any(1)] = special.pad
        ids = torch.cat([ids, nxt], 1)
        if bool(((ids == special.eot).any(1)).all()):
            break
    return ids


def test_export_loads_in_open_clip_and_generates_the_same(tmp_path):
    from vlp.commands.export import export

    cfg = tiny_coca_cfg()
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    out = export(_write_run(tmp_path, cfg, model), "open_clip", str(tmp_path / "oc"))
    config = json.load(open(os.path.join(out, "open_clip_config.json")))
    assert "multimodal_cfg" in config["model_cfg"]
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert type(oc) is open_clip.CoCa
    oc = oc.double().eval()
    model = model.double()
    ours, theirs = model.state_dict(), oc.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    image = _double(coca_batch(4, seed=10))["image"]
    assert torch.allclose(model.encode_image(image, normalize=True), oc.encode_image(image), atol=1e-12)
    steps = CTX - 1
    ref = _open_clip_greedy(oc, image, steps)
    got = generate(model, image, SPECIAL, GenerationConfig(strategy="greedy"))
    width = max(ref.shape[1], got.shape[1])
    pad = lambda x: F.pad(x, (0, width - x.shape[1]), value=SPECIAL.pad)  # noqa: E731
    assert torch.equal(pad(got), pad(ref))


# ---- end to end ---------------------------------------------------------------------------------------

RECIPE = os.path.join(ROOT, "configs", "quickstart", "coca_digits.yaml")
TINY = ["model.embed_dim=32", "model.image.width=32", "model.image.layers=1", "model.image.head_width=16",
        "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "model.coca.layers=1",
        "model.coca.heads=2", "model.coca.pooler_heads=2", "model.coca.caption_queries=8",
        "data.batch_size=32", "data.workers=0", "logging.progress=false", "logging.every_steps=5",
        "optim.warmup_steps=2", "eval.every_steps=0"]


def vlp(*args):
    proc = subprocess.run([sys.executable, "-m", "vlp", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _caption_ce_by_hand(run: str, data: str):
    """(Σ CE, count) over the non-pad next tokens of ``data``, float64, from the run's decoder
    logits at positions 0..L-2 and the text shifted by one."""
    from vlp.data.stream import build_eval_loader
    from vlp.runs import load_model_from_run

    cfg, model, tokenizer, eval_tf = load_model_from_run(run)
    pad = 0  # open_clip's CLIP BPE tokenizer pads with 0
    ce_sum, n_tokens = 0.0, 0
    with torch.no_grad():
        for batch in build_eval_loader(data, cfg.data, eval_tf, tokenizer, batch_size=128):
            _, tokens = model._encode_image(batch["image"])
            logits = model.caption_logits(tokens, batch["text"][:, :-1]).double()  # (B, L-1, V)
            targets = batch["text"][:, 1:]
            keep = targets != pad
            ce_sum += float(-logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0][keep].sum())
            n_tokens += int(keep.sum())
    return ce_sum, n_tokens


@pytest.mark.slow
def test_train_caption_eval_export(tmp_path):
    """digits -> a few CoCa steps (ZeRO-2, gradient cache) -> vlp caption, vlp eval caption ->
    export (fp32 weights from the ZeRO shards), which open_clip loads and which decodes the
    same tokens greedily."""
    from PIL import Image

    from vlp.data.digits import write_digits

    data, run = tmp_path / "digits", tmp_path / "run"
    write_digits(data)
    vlp("train", RECIPE, *TINY, f"data.train={data}/train", f"data.val={data}/val", f"run.dir={run}",
        "optim.steps=6", "engine.grad_cache.chunk_size=8", "engine.zero_stage=2")
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records if "caption" in r] == [5, 6] and "zeroshot_top1" in records[-1]
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "a.png")
    lines = vlp("caption", "--checkpoint", str(run), "--images", str(tmp_path / "a.png"), str(tmp_path / "a.png"),
                "--strategy", "greedy", "--json").strip().splitlines()
    captions = [json.loads(line) for line in lines]
    assert len(captions) == 2 and captions[0]["tokens"] == captions[1]["tokens"]
    metrics = json.loads(vlp("eval", "caption", "--checkpoint", str(run), "--data", f"{data}/val", "--json",
                             "--strategy", "greedy").strip().splitlines()[-1])
    assert metrics["num_samples"] == 360 and 0 <= metrics["names_class"] <= 1
    # perplexity is math.exp of the float64 loss; JSON keeps both exactly
    assert math.isclose(metrics["perplexity"], math.exp(metrics["caption_loss"]), rel_tol=1e-12)
    # the caption loss by hand on the same data: Σ CE over the non-pad next tokens / their count
    ce_sum, n_tokens = _caption_ce_by_hand(str(run), f"{data}/val")
    assert metrics["num_tokens"] == n_tokens
    # float32 logits in the evaluator, float64 sums here: float32 rounding of each term
    assert metrics["caption_loss"] == pytest.approx(ce_sum / n_tokens, rel=1e-5)
    out = vlp("export", "--checkpoint", str(run), "--out", str(tmp_path / "oc"), "--fp32-from-zero").strip()
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    assert tokenizer("a handwritten seven").shape == (1, 16)
    image = preprocess(Image.open(tmp_path / "a.png")).unsqueeze(0)
    hf = tokenizer.tokenizer
    special = SpecialIds(hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    with torch.no_grad():
        ref = _open_clip_greedy(oc.eval(), image, 15, special)[0].tolist()
    strip = lambda ids: [t for t in ids if t != special.pad]  # noqa: E731
    assert strip(captions[0]["tokens"]) == strip(ref)
    # and back: the export is a starting point for vlp (model.open_clip: local-dir + pretrained)
    from vlp.runs import load_model_from_run

    back = create_model(ModelConfig(open_clip=f"local-dir:{out}", pretrained=out)).state_dict()
    trained = load_model_from_run(str(run))[1].state_dict()
    assert back.keys() == trained.keys() and all(torch.equal(back[k], trained[k]) for k in back)


# ---- two ranks ------------------------------------------------------------------------------------

DIST_CASES = [(0, 0), (2, 4), (3, 4)]  # (ZeRO stage, gradient-cache chunk)


def _dist_worker(out: str) -> None:
    """One SGD step of the coca objective per case on this rank's half of a fixed batch."""
    from vlp import dist
    from vlp.engine.checkpoint import full_state_dict
    from vlp.engine.config import EngineConfig, GradCacheConfig
    from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
    from vlp.engine.optim import OptimConfig

    quiet_deepspeed()
    info = dist.init_distributed("gloo")
    results = {}
    for stage, chunk in DIST_CASES:
        torch.manual_seed(0)
        model = create_model(tiny_coca_cfg())
        b = 16 // info.world_size
        local = {k: v[info.rank * b : (info.rank + 1) * b] for k, v in coca_batch(16, seed=13).items()}
        optim = OptimConfig(name="sgd", lr=0.1, warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
        engine, _, _ = build_engine(model, EngineConfig(zero_stage=stage, grad_cache=GradCacheConfig(chunk)), optim, b)
        losses = Step(engine, build_objective({"name": "coca"}), torch.device("cpu"), chunk)(local)
        loss = dist.all_reduce_sum(torch.tensor([losses["loss"]], dtype=torch.float64)) / info.world_size
        results[(stage, chunk)] = (float(loss), full_state_dict(engine))
    if dist.rank() == 0:
        torch.save(results, out)
    dist.shutdown()


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    """2 gloo ranks (ZeRO 0, 2+cache, 3+cache) take the step of one process on the whole batch;
    the halves hold different numbers of caption tokens, so a per-rank token mean would differ."""
    text = coca_batch(16, seed=13)["text"][:, 1:]
    assert int((text[:8] != 0).sum()) != int((text[8:] != 0).sum())
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    for cmd in ([sys.executable, __file__, one],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641",
                 __file__, two]):
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(PYTHONPATH=ROOT), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    torch.manual_seed(0)
    init = create_model(tiny_coca_cfg()).state_dict()
    base_loss, base = ref[(0, 0)]
    assert (base["text_decoder.text_projection"] - init["text_decoder.text_projection"]).abs().max() > 1e-4
    for case, (loss, params) in [*ref.items(), *got.items()]:
        assert abs(loss - base_loss) <= 1e-5 * abs(base_loss), case
        for name, p in base.items():
            err, update = (params[name] - p).abs().max(), (p - init[name]).abs().max()
            assert err <= 1e-4 * update + 1e-6, (case, name, float(err), float(update))


if __name__ == "__main__":  # the worker of test_two_ranks_equal_one_process
    _dist_worker(sys.argv[1])
