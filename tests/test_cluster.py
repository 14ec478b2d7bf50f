"""`vlp cluster`: spherical k-means (blobs recovered, chunking changes nothing), the
written centers/assignments, and their join onto the training stream."""
import io
import json

import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import adjusted_rand_score
from torchvision.transforms import ToTensor

from vlp.data.clusters import assign_nearest, load_assignments, spherical_kmeans
from vlp.data.config import DataConfig
from vlp.data.shards import write_shards
from vlp.data.stream import build_loader


def _blobs(k=6, per=40, d=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(k, d, generator=g), dim=-1)  # (k, D)
    truth = torch.arange(k).repeat_interleave(per)
    x = F.normalize(dirs[truth] + noise * torch.randn(k * per, d, generator=g), dim=-1)
    perm = torch.randperm(k * per, generator=g)
    return x[perm], truth[perm], dirs


def test_kmeans_recovers_well_separated_blobs():
    x, truth, dirs = _blobs()
    result = spherical_kmeans(x, 6, iters=30, seed=0)
    assert adjusted_rand_score(truth.numpy(), result.labels.numpy()) == 1.0
    assert torch.allclose(result.centers.norm(dim=1), torch.ones(6), atol=1e-5)
    assert float((dirs @ result.centers.T).max(dim=1).values.min()) > 0.99  # each true direction found
    assert all(b <= a + 1e-9 for a, b in zip(result.inertia, result.inertia[1:]))  # Lloyd never goes up
    assert result.empty == 0


def _dot_rounding(dim: int) -> float:
    """Bound on |fl32(x . y) - x . y| for unit x, y with ``dim`` entries: gamma_D = D u / (1 - D u), u = 2^-24."""
    u = 2.0**-24
    return dim * u / (1 - dim * u)


def test_chunked_assignment_gives_the_same_result():
    """Chunking only regroups the rows of ``x @ C.T``: each similarity may change by fp32 rounding
    (a 1-row chunk is a matrix-vector product, other bits), so labels agree except on near ties."""
    x, _, _ = _blobs(k=5, per=30, noise=0.3, seed=1)  # overlapping: several iterations
    n, d = x.shape
    full = spherical_kmeans(x, 5, iters=15, chunk_size=n, seed=3)
    chunked = spherical_kmeans(x, 5, iters=15, chunk_size=7, seed=3)  # 150 = 21 x 7 + 3
    assert len(full.inertia) > 2
    tie = 2 * _dot_rounding(d)  # two fp32 similarities compared: each within gamma_D of the exact value
    xn = F.normalize(x.float(), dim=-1)
    exact = xn.double() @ full.centers.double().T  # (N, K)
    top2 = exact.topk(2, dim=1).values
    near_tie = top2[:, 0] - top2[:, 1] <= tie
    differ = full.labels != chunked.labels
    assert not bool((differ & ~near_tie).any()), (differ & ~near_tie).nonzero().flatten().tolist()
    for result in (full, chunked):  # each run's centers are the normalised means of its own clusters
        means = F.normalize(torch.zeros(5, d, dtype=torch.float64).index_add_(0, result.labels, xn.double()), dim=-1)
        torch.testing.assert_close(result.centers, means.float(), rtol=0, atol=2.0**-24)  # one fp32 rounding
    # inertia: N similarities, each within gamma_D per center set (and a flipped tie moves it by < tie)
    assert len(chunked.inertia) == len(full.inertia)
    torch.testing.assert_close(torch.tensor(chunked.inertia), torch.tensor(full.inertia), atol=0,
                               rtol=n * 2 * tie / min(full.inertia))
    sims, ids = assign_nearest(x, full.centers, chunk_size=11, topk=2)  # 150 = 13 x 11 + 7
    order = exact.sort(dim=1, descending=True)
    gaps = order.values[:, :-1] - order.values[:, 1:]  # (N, K-1): 1st-2nd, 2nd-3rd, ...
    clear = (gaps[:, :2] > tie).all(dim=1)  # the top 2 and their order are decided beyond rounding
    assert bool(clear.float().mean() > 0.9)
    assert torch.equal(ids[clear], order.indices[clear, :2])
    torch.testing.assert_close(sims.double(), exact.gather(1, ids), rtol=0, atol=_dot_rounding(d))
    assert bool((sims[:, 0] >= sims[:, 1]).all())


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (value * 37 % 256, value * 91 % 256, value * 13 % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _write(folder, n=24, per_shard=8):
    write_shards(folder, ({"__key__": f"s{i:04d}", "png": _png(i), "txt": f"c {i}", "cls": i % 3} for i in range(n)),
                 per_shard)
    return [f"s{i:04d}" for i in range(n)]


def test_cli_writes_centers_and_assignments(tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import make_tiny_run
    from vlp.cli import main
    from vlp.runs import load_model_from_run

    keys = _write(tmp_path / "shards")
    run = make_tiny_run(tmp_path)
    out = tmp_path / "clusters"
    argv = ["cluster", "--checkpoint", run, "--data", str(tmp_path / "shards"), "--k", "4", "--out", str(out),
            "--positives", "2", "--workers", "0", "--chunk-size", "5"]
    assert main(argv) == 0
    centers = load_file(str(out / "centers.safetensors"))["centers"]  # (4, 32)
    assert centers.shape == (4, 32) and torch.allclose(centers.norm(dim=1), torch.ones(4), atol=1e-5)
    table = load_assignments(str(out))
    assert sorted(table) == keys
    # the sims are the cosines of the features to the written centers, nearest first
    _, model, _, transform = load_model_from_run(run)
    with torch.no_grad():
        feats = model.encode_image(torch.stack([transform(Image.open(io.BytesIO(_png(i)))) for i in range(24)]),
                                   normalize=True)
    want = (feats @ centers.T).topk(2, dim=1)
    ids = torch.stack([table[k][0] for k in keys])
    sims = torch.stack([table[k][1] for k in keys])
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(sims, want.values, atol=2e-6, rtol=0)
    summary = json.loads((out / "cluster.json").read_text())
    assert summary["num_samples"] == 24 and len(summary["inertia"]) == summary["iterations"] >= 1
    assert main([*argv[:5], "--k", "99", "--out", str(out)]) == 2  # more centers than samples: one-line error


def test_stream_joins_cluster_labels_and_skips_missing(tmp_path):
    keys = _write(tmp_path / "shards", n=24, per_shard=24)
    labels = tmp_path / "assignments.jsonl"
    with open(labels, "w") as f:  # the first two samples have no assignment
        for i, key in enumerate(keys[2:], start=2):
            f.write(json.dumps({"key": key, "ids": [i % 5, (i + 1) % 5], "sims": [0.9, 0.5]}) + "\n")
    cfg = DataConfig(batch_size=11, workers=0, shuffle_buffer=0, cluster_labels=str(labels))
    tok = lambda texts: torch.zeros(1, 4, dtype=torch.long)  # noqa: E731
    batches = list(build_loader(str(tmp_path / "shards"), cfg, image_transform=ToTensor(), tokenizer=tok,
                                rank=0, world_size=1, train=True))
    assert sum(b["n_skipped"] for b in batches) == 2
    seen = [k for b in batches for k in b["key"]]
    assert sorted(seen) == keys[2:]
    for b in batches:
        assert b["cluster_ids"].shape == (11, 2) and b["cluster_ids"].dtype == torch.long
        want = torch.tensor([[int(k[1:]) % 5, (int(k[1:]) + 1) % 5] for k in b["key"]])
        assert torch.equal(b["cluster_ids"], want)
        assert torch.allclose(b["cluster_sims"], torch.tensor([0.9, 0.5]).expand(11, 2))
    # eval streams do not join (their samples need no assignment)
    ev = list(build_loader(str(tmp_path / "shards"), cfg, image_transform=ToTensor(), tokenizer=tok,
                           rank=0, world_size=1, train=False))
    assert sum(len(b["key"]) for b in ev) == 24 and "cluster_ids" not in ev[0]


# ------------------------------------------------------------------ linear probe + kNN (vlp eval linear-probe)
def test_knn_is_a_cosine_majority_vote():
    import numpy as np

    from vlp.eval.probe import knn_accuracy, linear_probe_accuracy

    train_x = np.array([[1, 0.1], [1, -0.1], [0.9, 0.3], [-1, 0.1], [-1, -0.2]], dtype=np.float32)
    train_y = np.array([0, 0, 1, 1, 1])
    val_x = np.array([[3, 0.0], [-2, 0.1]], dtype=np.float32)  # cosine ignores the norm
    assert knn_accuracy(train_x, train_y, val_x, np.array([0, 1]), k=3) == 1.0  # 2 of 3 nearest say 0
    assert knn_accuracy(train_x, train_y, val_x, np.array([1, 1]), k=5) == 1.0  # all five: majority 1
    assert linear_probe_accuracy(train_x[[0, 1, 3, 4]], np.array([0, 0, 1, 1]), val_x, np.array([0, 1])) == 1.0


def test_linear_probe_cli_matches_sklearn_on_the_features(tmp_path, capsys):
    """Both accuracies equal scikit-learn's fitted on the model's own features of the same images (one
    batch of 30, as the CLI's loader gives them): val colours differ from the train ones, so the kNN
    vote is not a lookup of identical images."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    from tests.helpers import make_tiny_run
    from vlp.cli import main
    from vlp.runs import load_model_from_run

    offsets = {"train": 0, "val": 100}
    for split, offset in offsets.items():
        write_shards(tmp_path / split, ({"__key__": f"{split}{i}", "png": _png(i), "txt": "x", "cls": i % 3}
                                        for i in range(offset, offset + 30)), 10)
    run = make_tiny_run(tmp_path)
    argv = ["eval", "linear-probe", "--checkpoint", run, "--train", str(tmp_path / "train"),
            "--val", str(tmp_path / "val"), "--knn-k", "5", "--json"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_train"] == 30 and metrics["num_val"] == 30 and metrics["feature_dim"] == 32
    assert metrics["knn_k"] == 5
    _, model, _, transform = load_model_from_run(run)

    def feats(offset):
        imgs = [transform(Image.open(io.BytesIO(_png(i)))) for i in range(offset, offset + 30)]
        with torch.no_grad():
            return model.encode_image(torch.stack(imgs), normalize=True).numpy(), np.arange(offset, offset + 30) % 3

    (tx, ty), (vx, vy) = feats(offsets["train"]), feats(offsets["val"])
    scaler = StandardScaler().fit(tx)
    want = LogisticRegression(max_iter=2000).fit(scaler.transform(tx), ty).score(scaler.transform(vx), vy)
    assert abs(metrics["linear_top1"] - want) < 1e-9
    knn = KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(tx, ty)
    assert abs(metrics["knn_top1"] - knn.score(vx, vy)) < 1e-9
    assert main([*argv[:2], "--config", "/nonexistent.yaml", *argv[4:]]) == 2
