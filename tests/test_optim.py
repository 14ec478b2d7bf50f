"""AdamW as vlp builds it, with weight decay and clipping on (every equivalence test elsewhere uses
plain SGD): the no-decay parameter groups, one DeepSpeed engine step against torch's AdamW in
float64 on the clipped gradient, and the warmup + cosine schedule against its formula written out."""
import copy
import math

import pytest
import torch

from tests.tiny import tiny_batch, tiny_model_cfg
from vlp.engine.optim import OptimConfig, build_optimizer, build_scheduler, param_groups
from vlp.models import create_model

MOMENTS = ("exp_avg", "exp_avg_sq")


def hand_lr(step: int, lr: float, warmup: int, steps: int, min_ratio: float = 0.0) -> float:
    """The lr of optimizer step ``step`` (0-based: the value the scheduler holds after ``step``
    steps), from the definition in vlp/engine/optim.py written out: linear warmup reaching
    ``lr`` at step ``warmup - 1`` (step s uses (s + 1) / warmup of it, so the first step is
    not an lr-0 no-op), then a half cosine from ``lr`` at step ``warmup`` down to
    ``min_ratio * lr`` at step ``steps``, flat after."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---- the parameter groups -------------------------------------------------------------------

# the decayed parameters of tiny_model_cfg(): weight matrices, the patch conv, projections and
# the token embedding; everything else (norms, biases, logit scale/bias, class and positional
# embeddings) is exempt
DECAYED = {
    "visual.proj", "visual.conv1.weight", "text.text_projection", "text.token_embedding.weight",
    *(f"{tower}.transformer.resblocks.0.{w}" for tower in ("visual", "text")
      for w in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")),
}


def _names(model, params) -> set:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def test_param_groups_exempt_norms_biases_scalars_and_positional_embeddings():
    torch.manual_seed(0)
    model = create_model(tiny_model_cfg(init_logit_bias=-10.0))
    model.text.text_projection.requires_grad_(False)  # frozen: in neither group
    cfg = OptimConfig(lr=3e-4, weight_decay=0.3, betas=[0.8, 0.95], eps=1e-7)
    opt = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    for group in opt.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (3e-4, (0.8, 0.95), 1e-7)
    every = {n for n, _ in model.named_parameters()}
    assert _names(model, decay["params"]) == DECAYED - {"text.text_projection"}
    assert _names(model, no_decay["params"]) == every - DECAYED
    # each rule: norms, biases (also the fused in_proj_bias), logit scale and bias, the 1-d class
    # embedding, and the 2-d positional embeddings that only the towers' no_weight_decay() names
    assert {"visual.ln_pre.weight", "text.ln_final.bias", "visual.transformer.resblocks.0.attn.in_proj_bias",
            "logit_scale", "logit_bias", "visual.class_embedding", "visual.positional_embedding",
            "text.positional_embedding"} <= _names(model, no_decay["params"])
    assert model.visual.positional_embedding.ndim == 2 and "visual.positional_embedding" in model.no_weight_decay()


def test_timm_image_tower_keeps_timms_no_decay_parameters():
    model = create_model(tiny_model_cfg(image={"name": "timm", "model_name": "vit_tiny_patch16_224", "image_size": 32}))
    assert {"pos_embed", "cls_token"} <= set(model.visual.trunk.no_weight_decay())
    no_decay = _names(model, param_groups(model, 0.1)[1]["params"])
    assert {"visual.trunk.pos_embed", "visual.trunk.cls_token"} <= no_decay


# ---- one DeepSpeed step: AdamW with weight decay on the clipped gradient ------------------------


def _full(engine):
    """The whole module's parameters (gathered at ZeRO-3), detached copies."""
    import contextlib

    import deepspeed

    named = list(engine.module.named_parameters())
    gather = (deepspeed.zero.GatheredParameters([p for _, p in named]) if engine.zero_optimization_stage() == 3
              else contextlib.nullcontext())
    with gather:
        return {n: p.detach().clone().cpu() for n, p in named}


def _zero12_moment(engine, p, key: str) -> torch.Tensor:
    # DeepSpeed 0.19.8's safe_get_full_optimizer_state loses the moments of every parameter group
    # but the first at ZeRO 1-2 (it links them after the first group's step, before the others
    # have state); read this rank's fragment of the flat fp32 partition and sum over ranks instead
    out = torch.zeros(p.numel(), dtype=torch.float32)
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None:
        opt = engine.optimizer
        flat = opt.single_partition_of_fp32_groups[mapping.param_group_index]
        hp, lp = mapping.get_hp_fragment_address(), mapping.lp_fragment_address
        out[lp.start:lp.start + lp.numel] = opt.optimizer.state[flat][key][hp.start:hp.start + hp.numel].cpu()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(out)
    return out.view(p.shape)


def live_state(engine, moments: bool = True):
    """``({name: {"param", "master", "exp_avg", "exp_avg_sq"}}, {optimizer step counts})`` of an
    engine at any ZeRO stage and world size (a collective above one rank): the module's
    weights, DeepSpeed's fp32 master copy (the weights themselves at ZeRO-0) and the Adam
    moments, whole tensors on the CPU. ``moments=False``: weights only (before any step)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    stage = engine.zero_optimization_stage()
    out = {n: {"param": p} for n, p in _full(engine).items()}
    if not moments:
        return out, set()
    for n, p in engine.module.named_parameters():
        if stage == 0:
            out[n]["master"] = out[n]["param"]
            out[n].update({k: engine.optimizer.state[p][k].detach().clone().cpu() for k in MOMENTS})
            continue
        master = safe_get_full_fp32_param(p)
        out[n]["master"] = master.detach().clone().cpu().view(out[n]["param"].shape)
        for k in MOMENTS:
            full = safe_get_full_optimizer_state(p, k) if stage == 3 else _zero12_moment(engine, p, k)
            out[n][k] = full.detach().clone().cpu().view(out[n]["param"].shape)
    base = engine.optimizer if stage == 0 else engine.optimizer.optimizer
    return out, {int(s["step"]) for s in base.state.values()}


def _full_grads(engine):
    """The gradients backward left, before engine.step() clips them."""
    from deepspeed.utils import safe_get_full_grad

    if engine.zero_optimization_stage() == 0:
        return {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}
    return {n: safe_get_full_grad(p).detach().clone().view(-1) for n, p in engine.module.named_parameters()}


def _norm(grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def torch_adamw(init, grads, cfg: OptimConfig, decayed: set, clip: bool = True):
    """Plain torch in float64: per step, clip_grad_norm_ to cfg.grad_clip, the hand-computed lr,
    then torch.optim.AdamW with a decay group (``decayed``) and a no-decay group."""
    params = {n: torch.nn.Parameter(v.double().clone()) for n, v in init.items()}
    groups = [{"params": [p for n, p in params.items() if n in decayed], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params.items() if n not in decayed], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    for step, g in enumerate(grads):
        for n, p in params.items():
            p.grad = g[n].double().view(p.shape).clone()
        if clip:
            # torch's rule, which DeepSpeed follows at every stage: scale by max_norm / (norm + 1e-6) when below 1
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = hand_lr(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        opt.step()
    return {n: {"master": p.detach(), **{k: opt.state[p][k] for k in MOMENTS}} for n, p in params.items()}


def _max_err(got, ref, key: str, scale) -> float:
    """Largest |got - ref| over every tensor, each divided by its allowed error ``scale(ref tensor)``."""
    return max(float(((got[n][key].double() - ref[n][key]).abs() / scale(ref[n][key])).max()) for n in ref)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_engine_step_is_torch_adamw_on_the_clipped_gradient(stage):
    from vlp import dist
    from vlp.engine.config import EngineConfig
    from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
    from vlp.engine.step import model_inputs, objective_losses
    from vlp.objectives import build_objective

    quiet_deepspeed()
    dist.init_distributed("gloo")
    cpu = torch.device("cpu")
    mcfg = tiny_model_cfg(init_logit_bias=-10.0)
    torch.manual_seed(0)
    model = create_model(mcfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = OptimConfig(lr=1e-2, weight_decay=0.2, betas=[0.9, 0.98], eps=1e-6, steps=10, warmup_steps=4,
                      grad_clip=1.0)
    engine, _, scheduler = build_engine(model, EngineConfig(zero_stage=stage), cfg, 8)
    objective = build_objective({"name": "siglip"})  # uses the logit scale and bias: every parameter gets a gradient
    grads = []
    # step 1: the loss scaled by 1e4, a gradient norm ~1e6 clipped to grad_clip; step 2: scaled by
    # 1e-3, a norm below grad_clip that must be left alone
    for scale, seed in ((1e4, 1), (1e-3, 2)):
        batch = tiny_batch(8, mcfg, seed=seed)
        engine.backward(scale * objective_losses(objective, engine(model_inputs(batch, cpu)), batch, 8, cpu)["loss"])
        grads.append(_full_grads(engine))
        engine.step()
    assert _norm(grads[0]) > 1e4 * cfg.grad_clip and _norm(grads[1]) < cfg.grad_clip
    got, steps = live_state(engine)
    assert steps == {2}
    ref = torch_adamw(init, grads, cfg, DECAYED)
    # Tolerances, from fp32 arithmetic against the float64 reference (same input gradients). One
    # fp32 rounding is 2^-24 ~ 6e-8 relative. Moments: exp_avg = 0.9 m + 0.1 c g (c: clip factor)
    # rounds a few times, relative to the tensor's largest entry (cancellation of the two terms
    # makes small entries worse relative to themselves), and c carries the fp32 error of a global
    # norm over ~35k squares (< 1e-6 relative): 1e-5 of the tensor's max is >10x that (seen: 3e-7).
    # Weights: p (1 - lr wd) - lr m^/(sqrt(v^) + eps) over two steps; the first term rounds at
    # ~2^-24 |p| per op (rtol 1e-6), the Adam direction is O(1) with the ~1e-6 relative error of c
    # at most, times lr (atol 1e-5 lr, >10x; seen: 1.2e-7 absolute on |p| ~ 1).
    for k in MOMENTS:
        assert _max_err(got, ref, k, lambda r: 1e-5 * r.abs().max()) <= 1.0, k
    assert _max_err(got, ref, "master", lambda r: 1e-6 * r.abs() + 1e-5 * cfg.lr) <= 1.0
    assert all(torch.equal(got[n]["param"], got[n]["master"]) for n in got)  # fp32: the module holds the master
    # ...and these tolerances can fail: without the clip, or with weight decay on every parameter
    # (norms included), the weights land thousands of tolerances away
    unclipped = torch_adamw(init, grads, cfg, DECAYED, clip=False)
    assert _max_err(got, unclipped, "master", lambda r: 1e-6 * r.abs() + 1e-5 * cfg.lr) > 100
    assert _max_err(got, unclipped, "exp_avg", lambda r: 1e-5 * r.abs().max()) > 100
    all_decayed = torch_adamw(init, grads, cfg, set(init))
    assert _max_err(got, all_decayed, "master", lambda r: 1e-6 * r.abs() + 1e-5 * cfg.lr) > 100
    # the two steps ran at lr/4 and 2 lr/4 (warmup, in the reference); the next one runs at 3 lr/4
    assert scheduler.get_last_lr() == pytest.approx([0.75 * cfg.lr] * 2, rel=1e-12)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([0.75 * cfg.lr] * 2, rel=1e-12)


# ---- the schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup,min_ratio", [(10, 0.1), (0, 0.0)])
def test_schedule_is_linear_warmup_then_cosine(warmup, min_ratio):
    lr, steps = 1e-3, 50
    cfg = OptimConfig(lr=lr, warmup_steps=warmup, steps=steps, min_lr_ratio=min_ratio)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    used = []  # the lr each optimizer step ran with
    for _ in range(steps + 10):
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert all(a == b for a, b in used)  # both groups
    used = [a for a, _ in used]
    assert used == pytest.approx([hand_lr(s, lr, warmup, steps, min_ratio) for s in range(steps + 10)], rel=1e-12)
    # the shape at its landmarks, as plain numbers
    mid = warmup + (steps - warmup) // 2  # half-way down the cosine: the mean of lr and the floor
    if warmup:
        assert used[0] == pytest.approx(lr / 10) and used[4] == pytest.approx(lr / 2)
        assert used[warmup - 1] == pytest.approx(lr)
        assert all(a < b for a, b in zip(used[:warmup - 1], used[1:warmup]))
    assert used[warmup] == pytest.approx(lr)
    assert used[mid] == pytest.approx(lr * (min_ratio + 1) / 2)
    assert all(a > b for a, b in zip(used[warmup:steps], used[warmup + 1:steps + 1]))
    assert used[steps:] == pytest.approx([lr * min_ratio] * 10, abs=1e-15)


# ---- timm optimizers, layer decay, per-tower lr / weight decay, schedules (issue #15) ---------------


def test_no_decay_groups_equal_timms():
    from timm.optim import param_groups_weight_decay

    torch.manual_seed(0)
    model = create_model(tiny_model_cfg(init_logit_bias=-10.0))
    ours = param_groups(model, 0.1)
    theirs = param_groups_weight_decay(model, 0.1, no_weight_decay_list=model.no_weight_decay())
    assert len(ours) == 2
    for wd in (0.0, 0.1):
        assert ({id(p) for g in ours if g["weight_decay"] == wd for p in g["params"]}
                == {id(p) for g in theirs if g["weight_decay"] == wd for p in g["params"]})


def test_layer_decay_and_per_tower_lr_follow_timm():
    from timm.optim import param_groups_layer_decay

    from vlp.engine.optim import TowerOptim, TowersOptim

    torch.manual_seed(0)
    model = create_model(tiny_model_cfg(image={"name": "timm", "model_name": "vit_tiny_patch16_224",
                                               "image_size": 32}))
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, layer_decay=0.5,
                      towers=TowersOptim(text=TowerOptim(lr=2e-3, weight_decay=0.05)))
    lr_of, wd_of = {}, {}
    for g in param_groups(model, cfg.weight_decay, cfg):
        for n in g["param_names"]:
            lr_of[n], wd_of[n] = g["lr"], g["weight_decay"]
        assert g["vlp_base_lr"] == g["lr"]
    trunk = model.visual.trunk
    by_id = {id(p): n for n, p in trunk.named_parameters()}
    for g in param_groups_layer_decay(trunk, 0.1, no_weight_decay_list=trunk.no_weight_decay(), layer_decay=0.5):
        for p in g["params"]:
            name = f"visual.trunk.{by_id[id(p)]}"
            assert lr_of[name] == pytest.approx(1e-3 * g["lr_scale"], rel=1e-12), name
            assert wd_of[name] == g["weight_decay"], name
    assert lr_of["visual.trunk.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5 ** 12)  # below 12 blocks
    # the text tower: its own lr and weight decay, embeddings 0.5^2 below its top (1 block)
    assert lr_of["text.text_projection"] == 2e-3 and wd_of["text.text_projection"] == 0.05
    assert lr_of["text.token_embedding.weight"] == pytest.approx(2e-3 * 0.25)
    assert lr_of["text.transformer.resblocks.0.mlp.c_fc.weight"] == pytest.approx(2e-3 * 0.5)
    assert lr_of["logit_scale"] == 1e-3 and wd_of["logit_scale"] == 0.0


@pytest.mark.parametrize("name", ["lamb", "lion", "adafactor"])
def test_timm_optimizers_step_in_the_engine(name):
    from vlp import dist
    from vlp.engine.config import EngineConfig
    from vlp.engine.deepspeed_engine import build_engine, quiet_deepspeed
    from vlp.engine.step import Step
    from vlp.objectives import build_objective

    quiet_deepspeed()
    dist.init_distributed("gloo")
    mcfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = create_model(mcfg)
    before = model.visual.proj.detach().clone()
    cfg = OptimConfig(name=name, lr=1e-3, steps=2, warmup_steps=0)
    engine, optimizer, _ = build_engine(model, EngineConfig(zero_stage=0), cfg, 4)
    import timm.optim

    assert type(engine.optimizer) is timm.optim.get_optimizer_class(name)
    losses = Step(engine, build_objective({"name": "infonce"}), torch.device("cpu"))(tiny_batch(4, mcfg))
    assert math.isfinite(losses["loss"]) and not torch.equal(model.visual.proj.detach(), before)


@pytest.mark.parametrize("schedule", ["const", "linear", "const_cooldown"])
def test_other_schedules(schedule):
    from vlp.engine.optim import lr_lambda

    cfg = OptimConfig(lr=1.0, warmup_steps=2, steps=12, schedule=schedule, cooldown_steps=4, min_lr_ratio=0.1)
    got = [lr_lambda(cfg)(s) for s in range(14)]
    assert got[:2] == [0.5, 1.0]
    if schedule == "const":
        assert got[2:] == [1.0] * 12
    elif schedule == "linear":  # from 1 at the end of warmup to 0.1 at steps, flat after
        assert got[2:] == pytest.approx([0.1 + 0.9 * (1 - (s - 2) / 10) for s in range(2, 12)] + [0.1, 0.1])
    else:  # flat to step 8, then linear over the last 4 steps to 0.1
        assert got[2:8] == [1.0] * 6
        assert got[8:] == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1, 0.1])


def test_unknown_optimizer_or_schedule_is_one_line_bad_input():
    from vlp.config import load_config

    with pytest.raises(ValueError, match=r"unknown optim.name 'adamx'; valid: .*lamb.*lion"):
        load_config(None, ["optim.name=adamx"])
    with pytest.raises(ValueError, match=r"unknown optim.schedule 'step'; valid: cosine, const, const_cooldown, lin"):
        load_config(None, ["optim.schedule=step"])


def test_resumed_schedule_keeps_per_group_base_lrs():
    from vlp.engine.optim import TowerOptim, TowersOptim

    model = create_model(tiny_model_cfg())
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, towers=TowersOptim(image=TowerOptim(lr=4e-3)))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    assert sorted(set(sched.fresh_base_lrs)) == [1e-3, 4e-3]
    assert "fresh_base_lrs" not in sched.state_dict()


def test_offloaded_adamw_is_deepspeed_cpu_adam_where_it_builds():
    from vlp.engine.optim import cpu_adam_built

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    if cpu_adam_built() or torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        ref = copy.deepcopy(model)
        opt, ref_opt = build_optimizer(model, OptimConfig(), offload=True), build_optimizer(ref, OptimConfig())
        assert isinstance(opt, DeepSpeedCPUAdam)
        for _ in range(3):  # the same AdamW steps as torch's, decay groups included
            for m, o in ((model, opt), (ref, ref_opt)):
                o.zero_grad()
                m(torch.ones(2, 4)).square().sum().backward()
                o.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    else:
        pytest.skip("cpu_adam is not built here (the fallback is tested below)")

def test_offloaded_adamw_without_the_op_is_torch_adamw_with_one_warning(monkeypatch):
    import vlp.engine.optim as optim

    monkeypatch.setattr(optim, "cpu_adam_built", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="DeepSpeedCPUAdam unavailable"):
        assert type(build_optimizer(torch.nn.Linear(2, 2), OptimConfig(), offload=True)) is torch.optim.AdamW
