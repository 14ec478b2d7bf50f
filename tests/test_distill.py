"""objective.name: distill: base objective + open_clip's DistillClipLoss KL term, frozen teacher (issue #15 i)."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from open_clip.loss import DistillClipLoss

from tests.helpers import TINY_MODEL, make_tiny_run
from tests.test_gradcache import _assert_close, _full_graph_grads, _grads_after_step
from tests.tiny import child_env, tiny_model_cfg
from vlp.commands.export import export_open_clip
from vlp.config import check_run, load_config
from vlp.models import ModelConfig, create_model
from vlp.objectives import build_objective
from vlp.objectives.base import StepContext


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    run = make_tiny_run(root, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export = export_open_clip(run, str(root / "oc"))
    return run, export


def _student(dtype=torch.float32):
    torch.manual_seed(0)
    return create_model(ModelConfig(**TINY_MODEL)).to(dtype)


def _batch(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g, dtype=dtype),
            "text": torch.randint(1, 49407, (n, 16), generator=g), "label": torch.arange(n)}


def _features(model, batch):
    with torch.no_grad():
        return (model.encode_image(batch["image"], normalize=True), model.encode_text(batch["text"], normalize=True),
                model.logit_scale.exp())


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_equals_open_clip_distill_clip_loss(teachers, weight):
    run, _ = teachers
    objective = build_objective({"name": "distill", "teacher": run, "weight": weight})
    student, batch = _student(), _batch(6)
    objective.begin_step(StepContext(model=student, batch=batch))
    image, text, scale = _features(student, batch)
    losses = objective.cross_sample({"image": image, "text": text, "label": batch["label"]}, {"logit_scale": scale})
    t_image, t_text, t_scale = _features(objective.teacher, batch)
    clip, kl = DistillClipLoss()(image, text, scale.squeeze(), t_image, t_text, t_scale.squeeze())
    torch.testing.assert_close(losses["distill"], kl)
    torch.testing.assert_close(losses["base"], clip)
    torch.testing.assert_close(losses["loss"], clip + weight * kl)


def test_teacher_forms_and_frozen(teachers):
    run, export = teachers
    batch = _batch(4, seed=1)
    feats = []
    for spec in (run, export):
        objective = build_objective({"name": "distill", "teacher": spec})
        objective.begin_step(StepContext(model=_student(), batch=batch))
        teacher = objective.teacher
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        assert list(objective.parameters()) == [] and list(objective.state_dict()) == []  # outside the module tree
        feats.append(objective._targets)
    for key in ("image", "text", "logit_scale"):  # the run and its open_clip export are the same teacher
        torch.testing.assert_close(feats[0][key], feats[1][key])


def test_chunks_equal_full_batch(teachers):
    """The gradient-cache contract (tests/test_gradcache.py) with a teacher: K chunks give the full-batch gradients."""
    run, _ = teachers
    objective = build_objective({"name": "distill", "teacher": run, "weight": 0.5})
    model, batch = _student(torch.float64).train(), _batch(8, seed=2, dtype=torch.float64)
    for k in (1, 2, 4):
        objective.begin_step(StepContext(model=model, batch=batch))  # the reference calls no Step
        ref_loss, ref = _full_graph_grads(model, objective, batch, chunk=8 // k)
        losses, got = _grads_after_step(copy.deepcopy(model), objective, batch, chunk=8 // k)
        assert abs(losses["loss"] - ref_loss) <= 1e-9 * max(1.0, abs(ref_loss)), k
        _assert_close(got, ref)


@pytest.mark.parametrize("teacher, match", [
    ("/nonexistent/teacher", "objective.teacher not found"),
    ("open_clip:NoSuchNet", "unknown open_clip model 'NoSuchNet'"),
    ("open_clip:ViT-B-32:nosuchtag", "no pretrained tag 'nosuchtag'"),
])
def test_bad_teacher(teacher, match, tmp_path):
    cfg = load_config(None, [f"objective={{name: distill, teacher: '{teacher}'}}", f"run.dir={tmp_path}"])
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        check_run(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    """The distill objective over 2 gloo ranks (each teacher forward on its own rows, the KL term over
    the global batch) equals 1 process on the whole batch: ZeRO 0 and 3, with the gradient cache."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = os.path.join(root, "tests", "dist_worker.py")
    small = tiny_model_cfg()  # the worker's student: the teacher reads the same tokens and images
    teacher = make_tiny_run(tmp_path / "teacher", seed=1, embed_dim=small.embed_dim, image=small.image, text=small.text)
    env = {**child_env(), "VLP_DIST_TEACHER": teacher, "VLP_DIST_CASES": "distill:0:0,distill:3:4"}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for cmd in ([sys.executable, worker, str(one)],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29761",
                 worker, str(two)]):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    init = ref["init"]
    for case in (("distill", 0, 0), ("distill", 3, 4)):
        (ref_loss, ref_params), (loss, params) = ref[case], got[case]
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (case, loss, ref_loss)
        moved = (ref_params["text.text_projection"] - init["text.text_projection"]).abs().max()
        assert moved > 1e-3  # the step moved the weights: equality below is not trivial
        for name, p in ref_params.items():
            update = (p - init[name]).abs().max() if name in init else p.abs().max()
            assert (params[name] - p).abs().max() <= 1e-4 * update + 1e-6, (case, name)
