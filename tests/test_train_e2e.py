"""End to end through the `vlp` command: data -> train -> eval -> export; kill -9 and resume.
A resume restores the weights, the fp32 master weights, the Adam moments, the step count and
the lr, tensor by tensor (in process, ZeRO 0/2/3; and on what a killed run left)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_optim import MOMENTS, hand_lr, live_state
from tests.tiny import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "quickstart", "clip_digits.yaml")
TINY = [
    "model.embed_dim=32", "model.image.width=32", "model.image.layers=1", "model.image.head_width=16",
    "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
    "data.batch_size=32", "data.workers=1", "logging.progress=false", "logging.every_steps=5",
    "optim.warmup_steps=5",
]


def _env():
    return child_env()


def vlp(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "vlp", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    vlp("data", "digits", "--out", str(out))
    return out


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_smoke_train_eval_export(digits, tmp_path):
    run = tmp_path / "run"
    data = [f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}"]
    tasks = "eval.tasks=[{name: zeroshot}, {name: retrieval}, {name: val_loss}]"
    vlp("train", RECIPE, *TINY, *data, "optim.steps=20", "eval.every_steps=10", "run.checkpoint_every=10", tasks)
    records = _metrics(run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "zeroshot_top1" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    assert [r["step"] for r in evals] == [10, 20] and all(r["skipped_samples"] == 0 for r in steps)
    assert os.path.isfile(run / "config.yaml") and os.listdir(run / "tb")
    # every task of the list ran in the loop, and equals `vlp eval NAME` on the saved checkpoint
    for name, key in (("zeroshot", "top1"), ("retrieval", "image_to_text_R@1"), ("val-loss", "loss")):
        out = vlp("eval", name, "--checkpoint", str(run), "--data", f"{digits}/val", "--json").stdout
        metrics = json.loads(out.strip().splitlines()[-1])
        assert metrics["num_samples"] == 360
        in_loop = evals[-1][f"{name.replace('-', '_')}_{key}"]
        assert abs(metrics[key] - in_loop) <= 1e-6 * max(1.0, abs(in_loop)), (name, metrics[key], in_loop)
    vlp("export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(tmp_path / "oc"))
    assert os.path.isfile(tmp_path / "oc" / "open_clip_config.json")


@pytest.mark.slow
def test_cli_errors_are_one_line(digits, tmp_path):
    bad = vlp("train", RECIPE, "optim.lrr=1", check=False)
    assert bad.returncode == 2 and "unknown config key 'optim.lrr'" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = vlp("train", RECIPE, *TINY, f"run.dir={tmp_path}/r", "data.train=/nonexistent/train", check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def _latest(run):
    path = os.path.join(run, "checkpoints", "latest")
    return open(path).read().strip() if os.path.isfile(path) else None


@pytest.mark.slow
def test_kill_9_then_resume(digits, tmp_path):
    run = str(tmp_path / "run")
    args = [sys.executable, "-m", "vlp", "train", RECIPE, *TINY, f"data.train={digits}/train",
            f"data.val={digits}/val", f"run.dir={run}", "optim.steps=40", "run.checkpoint_every=5",
            "eval.zeroshot=false", "run.keep_checkpoints=3"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while (_latest(run) or "step_00000000") < "step_00000015" and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # lands anywhere: between checkpoints or inside a save
    proc.wait()
    killed_at = _latest(run)
    tag_dir = os.path.join(run, "checkpoints", killed_at)
    assert {"model.safetensors", "mp_rank_00_model_states.pt", "rng_rank0.pt"} <= set(os.listdir(tag_dir))
    # a crash inside a save leaves only a *.tmp folder, never a checkpoint `latest` names
    os.makedirs(os.path.join(run, "checkpoints", "step_00000099.tmp"))
    step = int(killed_at.split("_")[1])
    # what the restart loads from the checkpoint the kill left: every tensor as saved, the lr of the schedule
    trainer = resume_here(run, killed_at, args[args.index(RECIPE) + 1:])
    check_resumed(resumed_view(trainer), os.path.join(trainer.run_dir, "checkpoints", killed_at),
                  hand_lr(step, 2e-3, 5, 40))
    del trainer

    resumed = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stdout
    assert not [p for p in os.listdir(os.path.join(run, "checkpoints")) if p.endswith(".tmp")]
    assert _latest(run) == "step_00000040"
    after = [r for r in _metrics(run) if "loss" in r and r["step"] > step]
    assert after[0]["step"] == (step // 5 + 1) * 5 and after[-1]["step"] == 40
    # what the killed process logged past its checkpoint is gone: every step appears once
    assert [r["step"] for r in _metrics(run) if "loss" in r] == list(range(5, 41, 5))
    # the scheduler restored: the lr logged after resume follows the warmup-cosine curve
    for r in after:
        assert r["lr"] == pytest.approx(hand_lr(r["step"], 2e-3, 5, 40), rel=1e-12, abs=1e-15), r


# ---- resume, tensor by tensor ----------------------------------------------------------------


def saved_optimizer(tag_dir: str, names_in_group_order=None):
    """The Adam moments a checkpoint folder holds, read from DeepSpeed's files alone (any ZeRO
    stage, any number of ranks it was saved with): ``({name: {moment: whole tensor}}, {step
    counts})``. ZeRO-0 saves torch's optimizer state, indexed by position in the parameter
    groups: ``names_in_group_order`` names those positions."""
    with open(os.path.join(tag_dir, "vlp.json")) as f:
        meta = json.load(f)
    world, stage = meta["world_size"], meta["zero_stage"]

    def load(name):
        return torch.load(os.path.join(tag_dir, name), map_location="cpu", weights_only=False)

    out, steps = {}, set()
    if stage == 0:
        state = load("mp_rank_00_model_states.pt")["optimizer"]
        index = [i for group in state["param_groups"] for i in group["params"]]
        assert len(index) == len(names_in_group_order)
        for i, name in zip(index, names_in_group_order):
            out[name] = {k: state["state"][i][k] for k in MOMENTS}
            steps.add(int(state["state"][i]["step"]))
        return out, steps
    if stage in (1, 2):  # per group, one flat partition per rank; each rank maps names to its slices
        shapes = load("mp_rank_00_model_states.pt")["param_shapes"]
        ranks = [load(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"] for r in range(world)]
        for g, group in enumerate(shapes):
            for name, shape in group.items():
                pieces = {k: [] for k in MOMENTS}
                for osd in ranks:  # a parameter split across ranks continues on the next one
                    at = osd["param_slice_mappings"][g].get(name)
                    for k in MOMENTS:
                        if at is not None:
                            pieces[k].append(osd["base_optimizer_state"]["state"][g][k][at.start:at.start + at.numel])
                out[name] = {k: torch.cat(pieces[k]).view(shape) for k in MOMENTS}
            steps |= {int(osd["base_optimizer_state"]["state"][g]["step"]) for osd in ranks}
        return out, steps
    # ZeRO-3: every parameter split in world_size equal (padded) parts, one per rank, in group order
    shapes = load("zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    ranks = [load(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]["optimizer_state_dict"]
             for r in range(world)]
    for g, group in enumerate(shapes):
        offset = 0
        for name, shape in group.items():
            numel = math.prod(shape)
            part = -(-numel // world)
            out[name] = {k: torch.cat([osd["state"][g][k][offset:offset + part] for osd in ranks])[:numel].view(shape)
                         for k in MOMENTS}
            offset += part
        for osd in ranks:
            assert offset == osd["state"][g]["exp_avg"].numel()  # every element accounted for
            steps.add(int(osd["state"][g]["step"]))
    return out, steps


def group_order(engine):
    """Parameter names in the order of the optimizer's groups (positions of a ZeRO-0 optimizer state)."""
    if engine.zero_optimization_stage() != 0:
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [names[id(p)] for group in engine.optimizer.param_groups for p in group["params"]]


def resumed_view(trainer) -> dict:
    """What a resumed ``trainer`` holds, for ``check_resumed`` (a collective above one rank)."""
    state, steps = live_state(trainer.engine)
    return {"step": trainer.state.step, "state": state, "steps": steps, "order": group_order(trainer.engine),
            "last_epoch": trainer.scheduler.last_epoch,
            "lrs": [*trainer.scheduler.get_last_lr(), *(g["lr"] for g in trainer.engine.optimizer.param_groups)]}


def check_resumed(view: dict, tag_dir: str, lr: float, saved=None) -> None:
    """A resumed trainer (its ``resumed_view``) holds the checkpoint ``tag_dir``, tensor by
    tensor: its weights (the module's and the fp32 master copy) equal model.safetensors, its
    Adam moments and step count the saved ones (``saved``: ``live_state`` of the engine that
    saved it; default: read from DeepSpeed's files), and the lr of the next step is ``lr``."""
    step = int(os.path.basename(tag_dir).split("_")[1])
    assert view["step"] == step
    got = view["state"]
    weights = load_file(os.path.join(tag_dir, "model.safetensors"))
    moments, saved_steps = saved if saved is not None else saved_optimizer(tag_dir, view["order"])
    assert set(got) == set(weights) == set(moments)
    for n in got:
        assert torch.equal(got[n]["param"], weights[n]), n
        assert torch.equal(got[n]["master"], weights[n]), n
        for k in MOMENTS:
            assert torch.equal(got[n][k], moments[n][k]), (n, k)
    assert all(bool(m["exp_avg_sq"].any()) for m in moments.values())  # trained moments, not fresh zeros
    assert view["steps"] == saved_steps == {step}  # Adam's bias correction goes on from there
    assert view["last_epoch"] == step
    assert view["lrs"] == pytest.approx([lr] * 4, rel=1e-12, abs=1e-15)  # scheduler, and both param groups


def resumed_trainer(overrides):
    """A Trainer of ``overrides`` after resume(), checked to differ from its fresh initialisation
    (so a resume that re-initialised, or loaded nothing, fails ``check_resumed``)."""
    from vlp.config import load_config
    from vlp.train import Trainer

    trainer = Trainer(load_config(RECIPE, overrides))
    fresh, _ = live_state(trainer.engine, moments=False)
    trainer.resume()
    tag = _latest(trainer.run_dir)
    weights = load_file(os.path.join(trainer.run_dir, "checkpoints", tag, "model.safetensors"))
    assert all(not torch.equal(fresh[n]["param"], weights[n]) for n in weights)
    return trainer


def copy_checkpoint(run: str, tag: str) -> str:
    """A new run folder holding only RUN's checkpoint TAG (as ``latest``), for resuming beside
    the run: the copy gets the config, any universal conversion, the metrics."""
    here = f"{run}_resumed_here"
    shutil.rmtree(here, ignore_errors=True)
    shutil.copytree(os.path.join(run, "checkpoints", tag), os.path.join(here, "checkpoints", tag))
    with open(os.path.join(here, "checkpoints", "latest"), "w") as f:
        f.write(tag)
    return here


def resume_here(run: str, tag: str, overrides):
    """``resumed_trainer`` in this process (one rank) on ``copy_checkpoint(run, tag)``."""
    here = copy_checkpoint(run, tag)
    return resumed_trainer([*overrides, f"run.dir={here}", "data.workers=0", "logging.tensorboard=false"])


@pytest.fixture(scope="module")
def digits_here(tmp_path_factory):
    from vlp.data.digits import write_digits

    out = tmp_path_factory.mktemp("data_here") / "digits"
    write_digits(out)
    return out


SHORT_RUN = ["data.batch_size=8", "data.workers=0", "data.shuffle_buffer=16", "logging.every_steps=1",
             "logging.tensorboard=false", "logging.progress=false", "eval.zeroshot=false", "eval.tasks=[]",
             "optim.warmup_steps=3", "optim.min_lr_ratio=0.1", "optim.steps=6", "run.checkpoint_every=2",
             "run.keep_checkpoints=3"]


def _short_run(digits, run, *extra):
    return [*TINY, f"data.train={digits}/train", f"data.val={digits}/val", f"run.dir={run}", *SHORT_RUN, *extra]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_restores_weights_moments_and_lr(digits_here, tmp_path, stage):
    from vlp.config import load_config
    from vlp.train import Trainer

    run = str(tmp_path / "run")
    overrides = _short_run(digits_here, run, f"engine.zero_stage={stage}")
    first = Trainer(load_config(RECIPE, overrides))
    held = {}  # what the saving engine held right after each checkpoint: the reference
    save = first.save

    def save_and_hold():
        save()
        held[first.state.step] = live_state(first.engine)

    first.save = save_and_hold
    first.fit()
    assert sorted(held) == [2, 4, 6]

    def lr(step):  # optim.lr=2e-3 (the recipe), warmup 3, cosine to 0.1 of it at step 6
        return hand_lr(step, 2e-3, 3, 6, 0.1)

    assert (lr(0), lr(2), lr(4), lr(6)) == pytest.approx((2e-3 / 3, 2e-3, 2e-3 * 0.775, 2e-4))
    logged = [(r["step"], r["lr"]) for r in _metrics(run) if "lr" in r]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in logged] == pytest.approx([lr(s) for s, _ in logged], rel=1e-12)
    for step in (2, 4):  # in the warmup; on the cosine
        tag = f"step_{step:08d}"
        with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
            f.write(tag)  # as if the run had died after this checkpoint
        trainer = resumed_trainer(overrides)
        tag_dir = os.path.join(run, "checkpoints", tag)
        check_resumed(resumed_view(trainer), tag_dir, lr(step), saved=held[step])
        # DeepSpeed's files hold what the engine held (the reader the multi-process tests compare with)
        moments, steps = saved_optimizer(tag_dir, group_order(trainer.engine))
        assert steps == {step}
        assert all(torch.equal(moments[n][k], held[step][0][n][k]) for n in moments for k in MOMENTS)
    # the run resumed at step 4 goes on to the end, its lr on the schedule; each resume dropped what
    # was logged past its step (the one at step 2 dropped steps 3-6), so every step appears once
    trainer.fit()
    logged = [(r["step"], r["lr"]) for r in _metrics(run) if "lr" in r]
    assert [s for s, _ in logged] == [1, 2, 5, 6]
    assert [v for _, v in logged] == pytest.approx([lr(s) for s, _ in logged], rel=1e-12)


def test_resume_with_more_steps_follows_the_new_schedule_at_once(digits_here, tmp_path):
    from vlp.config import load_config
    from vlp.train import Trainer

    overrides = _short_run(digits_here, str(tmp_path / "run"), "optim.steps=4", "optim.warmup_steps=2")
    Trainer(load_config(RECIPE, overrides)).fit()
    trainer = resumed_trainer([*overrides, "optim.steps=8"])  # extend the run: cosine over 8 steps now
    assert trainer.state.step == 4
    lrs = [*trainer.scheduler.get_last_lr(), *(g["lr"] for g in trainer.engine.optimizer.param_groups)]
    assert lrs == pytest.approx([hand_lr(4, 2e-3, 2, 8, 0.1)] * 4, rel=1e-12)  # not hand_lr(4, 2e-3, 2, 4, 0.1)


def test_resume_from_a_checkpoint_or_run_and_a_warned_fresh_start(digits_here, tmp_path, capsys):
    from vlp.config import load_config
    from vlp.train import Trainer

    run = str(tmp_path / "run")
    overrides = _short_run(digits_here, run, "optim.steps=4")
    Trainer(load_config(RECIPE, overrides)).fit()
    tag_dir = os.path.join(run, "checkpoints", "step_00000002")
    for source, tag in ((tag_dir, tag_dir), (run, os.path.join(run, "checkpoints", "step_00000004"))):
        other = str(tmp_path / f"other_{os.path.basename(source)}")
        trainer = Trainer(load_config(RECIPE, _short_run(digits_here, other, "optim.steps=4",
                                                         f"run.resume_from={source}")))
        trainer.resume()  # a checkpoint folder, or a run dir's latest, into a new run dir
        step = int(os.path.basename(tag).split("_")[1])
        check_resumed(resumed_view(trainer), tag, hand_lr(step, 2e-3, 3, 4, 0.1))
    fresh = Trainer(load_config(RECIPE, [*overrides, "run.resume=false"]))
    fresh.resume()
    assert fresh.state.step == 0 and "run.resume=false: starting fresh" in capsys.readouterr().out
    assert _metrics(run) == []  # the old run's records no longer describe this run
    with pytest.raises(FileNotFoundError, match="run.resume_from not found"):
        load_config(RECIPE, [*overrides, f"run.resume_from={tmp_path}/nowhere"])
