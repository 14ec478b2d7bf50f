"""The MLCD cluster head sharded over ranks in training (``model.heads.<key>.sharded: true``):
2 ranks equal one process with the unsharded head (tests/mlcd_sharded_worker.py), checkpoints
resume exactly on the same ranks and re-shard on others, and a sharded run trains, evaluates,
exports and clusters through the commands."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests import mlcd_sharded_worker as worker
from tests.test_cluster import _write
from tests.test_train_e2e import RECIPE, TINY
from tests.tiny import child_env
from vlp.engine import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # relative, fp32
pytestmark = pytest.mark.slow  # one 2-rank launch (~30 s on 2 cores)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker's results: "one" (this process: the unsharded reference, a 1-rank sharded run),
    "two" (2 gloo ranks, sharded), "back" (this process: 2 -> 1 resume); "out" their prefix."""
    out = str(tmp_path_factory.mktemp("mlcd_sharded") / "o")
    worker.main(out, "one")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29801", os.path.join(ROOT, "tests", "mlcd_sharded_worker.py"), out, "two"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worker.main(out, "back")
    load = lambda mode: torch.load(f"{out}.{mode}.0.pt", weights_only=False)  # noqa: E731
    return {"one": load("one"), "two": load("two"), "back": load("back"), "out": out}


def _error(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error of a tensor; per row for a head (every center checked on its own)."""
    got, want = got.double(), want.double()
    if name.endswith("in_proj_bias"):  # q | k | v: the key bias has zero gradient, Adam steps on its rounding
        third = want.shape[0] // 3
        got, want = torch.cat([got[:third], got[2 * third :]]), torch.cat([want[:third], want[2 * third :]])
    if name.startswith("heads."):
        return float(((got - want).norm(dim=1) / want.norm(dim=1)).max())
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _assert_same(got, want, tol=TOL):
    assert len(got["losses"]) == len(want["losses"])
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= tol * abs(b), (got["losses"], want["losses"])
    assert got["weights"].keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        assert _error(name, got["weights"][name], w) <= tol, (name, _error(name, got["weights"][name], w))


@pytest.mark.parametrize("case", worker.CASES, ids=[f"{n}-zero{s}-chunk{c}" for n, s, c in worker.CASES])
def test_two_ranks_sharded_equal_one_process_unsharded(runs, case):
    got, want = runs["two"][case], runs["one"][case]
    assert got["weights"]["heads.cluster.weight"].shape == (worker.K, 16)
    _assert_same(got, want)
    torch.manual_seed(0)  # the initial head, as the worker built it
    start = worker.create_model(worker.model_cfg(False)).state_dict()["heads.cluster.weight"]
    assert (want["weights"]["heads.cluster.weight"] - start).norm(dim=1).min() > 0  # every row moved (decay)


def test_checkpoint_holds_each_ranks_rows(runs):
    folder = os.path.join(checkpoint.ckpt_dir(f"{runs['out']}.two_run"), f"step_{worker.SAVE_AT:08d}")
    ranks = [torch.load(os.path.join(folder, f"heads_rank{r}.pt"), weights_only=True) for r in (0, 1)]
    assert [s["rows"]["cluster"] for s in ranks] == [(0, 11), (11, 23)]  # K = 23: the last rank takes the rest
    moments = [s["optimizer"]["state"][0]["exp_avg_sq"] for s in ranks]
    assert [m.shape[0] for m in moments] == [11, 12]
    whole = load_file(os.path.join(folder, checkpoint.MODEL_FILE))["heads.cluster.weight"]
    assert torch.equal(whole, torch.cat([s["weights"]["cluster"] for s in ranks]))
    checkpoint.verify(folder)  # the rank files are recorded with their checksums


def test_resume_on_the_same_ranks_is_exact(runs):
    want = runs["two"]["uninterrupted"]
    got = runs["two"]["same_ranks"]
    assert got["losses"] == want["losses"][worker.SAVE_AT :]
    for name, w in want["weights"].items():
        assert torch.equal(got["weights"][name], w), name


@pytest.mark.parametrize("saved,resumed", [("one", "two"), ("two", "back")], ids=["1to2", "2to1"])
def test_resume_on_other_ranks_reshards(runs, saved, resumed):
    want = runs[saved]["uninterrupted"]
    got = runs[resumed]["from_one" if saved == "one" else "from_two"]
    _assert_same(got, {"losses": want["losses"][worker.SAVE_AT :], "weights": want["weights"]})


def _labels(folder, keys, k):
    g = torch.Generator().manual_seed(0)
    os.makedirs(folder)
    with open(os.path.join(folder, "assignments.jsonl"), "w") as f:
        for key in keys:
            f.write(json.dumps({"key": key, "ids": torch.randperm(k, generator=g)[:2].tolist(),
                                "sims": [0.9, 0.8]}) + "\n")


def test_sharded_run_trains_resumes_evaluates_exports_and_clusters(tmp_path, capsys):
    from vlp.cli import main
    from vlp.commands.export import export
    from vlp.runs import load_model_from_run

    keys = _write(tmp_path / "shards", n=24, per_shard=8)
    _labels(str(tmp_path / "labels"), keys, 7)
    run = str(tmp_path / "run")
    argv = ["train", RECIPE, *TINY, f"data.train={tmp_path}/shards", "data.val=null", f"run.dir={run}",
            "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=0", "logging.tensorboard=false",
            f"data.cluster_labels={tmp_path}/labels", "objective={name: mlcd, sample_ratio: 0.5}",
            "model.heads={cluster: {name: mlcd_cluster, num_centers: 7, sharded: true}}",
            "engine.grad_cache.chunk_size=4", "optim.steps=2", "run.checkpoint_every=1", "eval.tasks=[]"]
    assert main(argv) == 0
    assert main([*argv[:-3], "optim.steps=3", "run.checkpoint_every=1", "eval.tasks=[]"]) == 0  # resumes at 2
    capsys.readouterr()
    folder = os.path.join(checkpoint.ckpt_dir(run), checkpoint.latest_tag(run))
    assert folder.endswith("step_00000003") and os.path.isfile(os.path.join(folder, "heads_rank0.pt"))
    _, model, _, _ = load_model_from_run(run)  # the whole head, as one process builds it
    saved = torch.load(os.path.join(folder, "heads_rank0.pt"), weights_only=True)["weights"]["cluster"]
    assert torch.equal(model.heads["cluster"].weight.data, saved)
    oc = load_file(os.path.join(export(run, "open_clip", str(tmp_path / "oc")), "open_clip_model.safetensors"))
    assert not any(k.startswith("heads.") for k in oc)
    backend = "faiss" if importlib.util.find_spec("faiss") else "torch"  # faiss-cpu: the optional extra
    assert main(["cluster", "--checkpoint", run, "--data", f"{tmp_path}/shards", "--k", "3", "--out",
                 str(tmp_path / "clusters"), "--workers", "0", "--backend", backend]) == 0
    assert json.loads((tmp_path / "clusters" / "cluster.json").read_text())["backend"] == backend
    assert main(["eval", "linear-probe", "--checkpoint", run, "--train", f"{tmp_path}/shards", "--val",
                 f"{tmp_path}/shards", "--knn-k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_val"] == 24
