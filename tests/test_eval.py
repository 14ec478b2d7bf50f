"""Zero-shot and retrieval metrics: exact values on controlled embeddings, then real digits shards and the CLI."""
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import make_tiny_run
from vlp.cli import main
from vlp.data.stream import build_eval_loader
from vlp.eval.retrieval import RetrievalSettings, evaluate_retrieval, positive_ranks, run_retrieval
from vlp.eval.zeroshot import (
    ZeroshotSettings,
    evaluate_zeroshot,
    read_classnames_templates,
    run_zeroshot,
    zeroshot_classifier,
)


class VectorModel(nn.Module):
    """A stand-in model whose "images" and "texts" already are their embeddings, so a test
    sets every similarity; text rows may also be class indices (one-hot class embeddings)."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes

    def encode_image(self, x, normalize=False):
        return F.normalize(x.float(), dim=-1) if normalize else x.float()

    def encode_text(self, t, normalize=False):
        if t.dtype == torch.long:  # (N, 1) class ids from ClassTokenizer
            t = F.one_hot(t[:, 0], self.num_classes).float()
        return F.normalize(t, dim=-1) if normalize else t


class ClassTokenizer:
    """Maps a prompt to the id of the class name it contains; fails on an unfilled template."""

    def __init__(self, classnames):
        self.classnames = classnames

    def __call__(self, texts):
        ids = []
        for text in texts:
            assert "{" not in text, f"template not filled: {text!r}"
            (hit,) = [i for i, c in enumerate(self.classnames) if f"<{c}>" in text]
            ids.append([hit])
        return torch.tensor(ids)


def scores_ranking(label: int, rank: int, num_classes: int) -> torch.Tensor:
    """(C,) class scores in which ``label`` is ranked ``rank`` (0 = best)."""
    order = [c for c in range(num_classes) if c != label]
    order.insert(rank, label)
    scores = torch.empty(num_classes)
    scores[order] = torch.arange(num_classes, 0, -1, dtype=torch.float)
    return scores


def batches(images, labels, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({"image": images[start : start + size], "label": torch.tensor(labels[start : start + size])})
        start += size
    return out


CLASSES = ["c0", "c1", "c2", "c3", "c4", "c5"]


def test_zeroshot_classifier_is_identity_for_one_hot_class_embeddings():
    model = VectorModel(len(CLASSES))
    classifier = zeroshot_classifier(model, ClassTokenizer(CLASSES), CLASSES, ["a <{c}>.", "<{}> again"])
    assert classifier.shape == (len(CLASSES), len(CLASSES))  # (D, C)
    torch.testing.assert_close(classifier, torch.eye(len(CLASSES)))


def test_zeroshot_metrics_exact_on_imbalanced_classes():
    # (label, rank of the true class): class 0 has 3 samples, 1 and 2 one each, one unlabelled
    cases = [(0, 0), (0, 1), (0, 5), (1, 0), (2, 2), (-1, 0)]
    images = torch.stack([scores_ranking(max(label, 0), rank, len(CLASSES)) for label, rank in cases])
    labels = [label for label, _ in cases]
    model = VectorModel(len(CLASSES))
    classifier = zeroshot_classifier(model, ClassTokenizer(CLASSES), CLASSES, ["<{c}>"])
    metrics = evaluate_zeroshot(model, batches(images, labels, [4, 2]), classifier, "cpu")
    assert metrics["num_samples"] == 5  # the label -1 sample is ignored
    assert metrics["top1"] == pytest.approx(2 / 5)  # (0,0) and (1,0)
    assert metrics["top5"] == pytest.approx(4 / 5)  # all but rank 5
    assert metrics["mean_per_class_recall"] == pytest.approx((1 / 3 + 1 + 0) / 3)  # != top1: imbalance


def test_zeroshot_top5_is_top_all_with_fewer_than_5_classes():
    classes = CLASSES[:3]
    images = torch.stack([scores_ranking(0, 2, 3), scores_ranking(1, 1, 3)])
    model = VectorModel(3)
    classifier = zeroshot_classifier(model, ClassTokenizer(classes), classes, ["<{c}>"])
    metrics = evaluate_zeroshot(model, batches(images, [0, 1], [2]), classifier, "cpu")
    assert (metrics["top1"], metrics["top5"]) == (0.0, 1.0)


def test_zeroshot_rejects_bad_labels():
    model = VectorModel(3)
    classifier = torch.eye(3)
    with pytest.raises(ValueError, match="label 3 out of range for 3"):
        evaluate_zeroshot(model, batches(torch.eye(3), [0, 1, 3], [3]), classifier, "cpu")
    with pytest.raises(ValueError, match="no labelled samples"):
        evaluate_zeroshot(model, batches(torch.eye(3), [-1, -1, -1], [3]), classifier, "cpu")


def test_eval_restores_training_mode():
    model = VectorModel(3).train()
    evaluate_zeroshot(model, batches(torch.eye(3), [0, 1, 2], [3]), torch.eye(3), "cpu")
    assert model.training


# --- class names and templates ------------------------------------------------------


def _layout(tmp_path):
    val = tmp_path / "ds" / "val"
    val.mkdir(parents=True)
    (val / "shard-000000.tar").write_bytes(b"")  # only listed, never read
    return val


def test_classnames_templates_found_beside_or_above_data(tmp_path):
    val = _layout(tmp_path)
    (val.parent / "classnames.txt").write_text("zero\none\n\n")
    (val.parent / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    assert read_classnames_templates(str(val)) == (["zero", "one"], ["a {c}."])
    (val / "classnames.txt").write_text("cat\n")  # the shard folder's own file wins
    assert read_classnames_templates(str(val / "shard-{000000..000000}.tar"))[0] == ["cat"]
    given = tmp_path / "names.txt"
    given.write_text("x\ny\nz\n")
    assert read_classnames_templates([str(val)], classnames=str(given))[0] == ["x", "y", "z"]


def test_missing_or_bad_zeroshot_files_raise_one_line(tmp_path):
    val = _layout(tmp_path)
    with pytest.raises(FileNotFoundError, match="no classnames.txt in") as e:
        read_classnames_templates(str(val))
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="templates file not found"):
        read_classnames_templates(str(val), classnames=["a"], templates=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="no {c} placeholder"):
        read_classnames_templates(str(val), classnames=["a"], templates=["a photo"])


# --- retrieval ----------------------------------------------------------------------


def retrieval_batches(images, texts, size):
    return [{"image": images[i : i + size], "text": texts[i : i + size]} for i in range(0, len(images), size)]


def test_retrieval_recall_exact():
    # image i scores its own caption 1 and r_i other captions 2 (before normalising): rank r_i
    ranks = [0, 0, 0, 0, 1, 2, 4, 5, 6, 9, 10, 11]
    n = len(ranks)
    texts = torch.eye(n)
    images = torch.eye(n)
    for i, r in enumerate(ranks):
        images[i, [j for j in range(n) if j != i][:r]] = 2.0
    metrics = evaluate_retrieval(VectorModel(), retrieval_batches(images, texts, 5), "cpu")
    assert metrics["num_samples"] == n
    assert metrics["image_to_text_R@1"] == pytest.approx(4 / 12)
    assert metrics["image_to_text_R@5"] == pytest.approx(7 / 12)
    assert metrics["image_to_text_R@10"] == pytest.approx(10 / 12)
    # text -> image against a brute-force count over the normalised similarity matrix
    sim = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T  # (N images, N texts)
    t2i = [sum(float(sim[j, i]) > float(sim[i, i]) for j in range(n)) for i in range(n)]
    for k in (1, 5, 10):
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(sum(r < k for r in t2i) / n)


def test_retrieval_is_by_sample_and_ties_favour_the_positive():
    e = torch.eye(3)
    texts = torch.stack([e[0], e[0], e[1]])  # samples 0 and 1 share a caption
    images = F.normalize(torch.stack([e[0], e[0] + 0.1 * e[2], e[1]]), dim=-1)  # unit, as embed_all gives
    assert positive_ranks(images, texts).tolist() == [0, 0, 0]  # identical captions tie: no penalty
    # caption 0 prefers image 0 (cos 1) to image 1 (cos < 1); caption 1 is sample 1's: rank 1
    assert positive_ranks(texts, images).tolist() == [0, 1, 0]


def test_positive_ranks_blocking_matches_single_block():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(37, 8, generator=g), torch.randn(37, 8, generator=g)
    assert torch.equal(positive_ranks(q, k, block=5), positive_ranks(q, k, block=1024))


# --- brute-force counts on real features -------------------------------------------


def dot_rounding(dim: int) -> float:
    """Bound on |fl32(x . y) - x . y| for unit x, y with ``dim`` entries: gamma_D = D u / (1 - D u), u = 2^-24."""
    u = 2.0**-24
    return dim * u / (1 - dim * u)


def count_zeroshot(features, classifier, labels):
    """({name: (low, high)}, samples counted, samples uncertain): bounds of top1, top5 (top-min(5, C)) and
    mean_per_class_recall, counted sample by sample on float64 scores of the (N, D) unit features against
    the (D, C) classifier; labels < 0 are skipped.

    The evaluator ranks fp32 logits, each within gamma_D of the exact score: a class within twice that
    of the true class may rank either side of it, so that sample counts in the high bound only."""
    feats, weights = features.double().numpy(), classifier.double().numpy()
    num_classes, tie = weights.shape[1], 2 * dot_rounding(weights.shape[0])
    k = min(5, num_classes)
    hits = {"top1": [0, 0], "top5": [0, 0]}
    per_class = {}  # label -> [samples, surely right, possibly right]
    uncertain = 0
    for f, y in zip(feats, labels):
        if y < 0:
            continue
        scores = [float(f @ weights[:, c]) for c in range(num_classes)]
        above = sum(1 for c in range(num_classes) if c != y and scores[c] - scores[y] > tie)
        near = sum(1 for c in range(num_classes) if c != y and abs(scores[c] - scores[y]) <= tie)
        for name, top in (("top1", 1), ("top5", k)):
            hits[name][0] += above + near < top  # in the top whichever way the near ones round
            hits[name][1] += above < top
        uncertain += above < k <= above + near or above < 1 <= above + near
        row = per_class.setdefault(y, [0, 0, 0])
        row[0] += 1
        row[1] += above + near < 1
        row[2] += above < 1
    n = sum(row[0] for row in per_class.values())
    bounds = {name: (lo / n, hi / n) for name, (lo, hi) in hits.items()}
    bounds["mean_per_class_recall"] = tuple(sum(row[i] / row[0] for row in per_class.values()) / len(per_class)
                                            for i in (1, 2))
    return bounds, n, uncertain


def count_recall(queries, keys, ks=(1, 5, 10)):
    """({k: (low, high)}, queries uncertain at some k): bounds of recall@k of query i finding key i among the
    (N, D) unit keys, counted query by query on float64 scores: its rank is the number of keys scoring
    strictly higher. A key bit-identical to key i scores exactly as key i does (a tie, the positive's); one
    within 2 gamma_D of it may land either side in fp32, so that query counts in the high bound only."""
    q, kk = queries.double().numpy(), keys.double().numpy()
    tie = 2 * dot_rounding(q.shape[1])
    group = {}
    same_as = np.array([group.setdefault(row.tobytes(), len(group)) for row in keys.numpy()])  # identical keys
    n = len(q)
    counts = {k: [0, 0] for k in ks}
    uncertain = 0
    for i in range(n):
        d = kk @ q[i] - float(kk[i] @ q[i])  # (N,) score minus the positive's
        others = same_as != same_as[i]
        above, near = int(((d > tie) & others).sum()), int(((np.abs(d) <= tie) & others).sum())
        for k in ks:
            counts[k][0] += above + near < k
            counts[k][1] += above < k
        uncertain += any(above < k <= above + near for k in ks)
    return {k: (lo / n, hi / n) for k, (lo, hi) in counts.items()}, uncertain


def assert_within(value, bounds, what):
    lo, hi = bounds
    assert lo - 1e-12 <= value <= hi + 1e-12, f"{what}: {value} not in the brute-force count [{lo}, {hi}]"


def shard_samples(folder):
    """key -> {ext: bytes} of every sample in the folder's tar shards, read with tarfile."""
    samples = {}
    for shard in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


# --- real shards, tiny random model, CLI ----------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from vlp.data.digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    counts = write_digits(root)
    return root, counts["val"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits):
    """The tiny random model, with the mean direction of its val image embeddings taken out of its image
    projection: at random init every image embeds nearly alike and one class wins zero-shot for all of
    them, which would leave a count of hits blind to which label goes with which sample."""
    from safetensors.torch import save_file

    from tests.helpers import TAG
    from vlp.runs import load_model_from_run

    root, _ = digits
    run = make_tiny_run(tmp_path_factory.mktemp("run"), [f"data.val={root / 'val'}", "eval.batch_size=128"])
    cfg, model, tokenizer, eval_tf = load_model_from_run(run)
    with torch.no_grad():
        emb = torch.cat([model.encode_image(b["image"]) for b in build_eval_loader(root / "val", cfg.data, eval_tf,
                                                                                   tokenizer, batch_size=128)])
    mean = F.normalize(emb.mean(dim=0), dim=0)  # (D,)
    state = model.state_dict()
    state["visual.proj"] = state["visual.proj"] - torch.outer(state["visual.proj"] @ mean, mean)  # (width, D)
    save_file({k: v.contiguous() for k, v in state.items()}, f"{run}/checkpoints/{TAG}/model.safetensors")
    return run


def test_zeroshot_and_retrieval_on_digits_shards(digits, digits_run):
    """Both evaluators equal a sample-by-sample count on the model's own features of every val sample."""
    from vlp.runs import eval_context, load_model_from_run

    root, n_val = digits
    cfg, model, tokenizer, eval_tf = load_model_from_run(digits_run)
    ctx = eval_context(cfg, model, tokenizer, eval_tf)
    zs = run_zeroshot(ZeroshotSettings(), ctx)  # data, class names and templates from the run/data
    rt = run_retrieval(RetrievalSettings(data=str(root / "val")), ctx)
    assert zs["num_samples"] == rt["num_samples"] == n_val
    # every sample's features, in the evaluators' batches (so the very fp32 features they score)
    shards = shard_samples(root / "val")
    keys, images, texts, labels = [], [], [], []
    with torch.no_grad():
        for batch in build_eval_loader(ctx.data, ctx.data_cfg, ctx.transform, tokenizer, batch_size=ctx.batch_size):
            for key, label, tokens in zip(batch["key"], batch["label"].tolist(), batch["text"]):
                caption = shards[key]["txt"].decode()
                assert label == int(shards[key]["cls"]) and torch.equal(tokens, tokenizer([caption])[0])
            keys += batch["key"]
            labels += batch["label"].tolist()
            images.append(model.encode_image(batch["image"], normalize=True))
            texts.append(model.encode_text(batch["text"], normalize=True))
    images, texts = torch.cat(images), torch.cat(texts)
    assert sorted(keys) == sorted(shards) and len(keys) == n_val
    # the class embeddings run_zeroshot builds: each class's unit template embeddings averaged, unit norm
    names = (root / "classnames.txt").read_text().split()
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    classifier = zeroshot_classifier(model, tokenizer, names, templates)  # (D, C)
    with torch.no_grad():
        prompts = tokenizer([t.format(c=name) for name in names for t in templates])
        per_prompt = model.encode_text(prompts, normalize=True).double().view(len(names), len(templates), -1)
    torch.testing.assert_close(classifier.double(), F.normalize(per_prompt.mean(dim=1), dim=-1).T,
                               rtol=0, atol=1e-5)  # fp32 towers, other batches: float32 agreement
    assert len(set((images @ classifier).argmax(dim=1).tolist())) >= 5  # the fixture's model: many classes win
    bounds, n, uncertain = count_zeroshot(images, classifier, labels)
    assert n == n_val and uncertain <= n_val // 100
    for name, b in bounds.items():
        assert_within(zs[name], b, name)
    for way, (q, k) in {"image_to_text": (images, texts), "text_to_image": (texts, images)}.items():
        recalls, uncertain = count_recall(q, k)
        assert uncertain <= n_val // 100
        for at, b in recalls.items():
            assert_within(rt[f"{way}_R@{at}"], b, f"{way}_R@{at}")


def test_cli_eval_zeroshot_json(digits, digits_run, capsys):
    root, n_val = digits
    argv = ["eval", "zeroshot", "--checkpoint", digits_run, "--data", str(root / "val"), "--batch-size", "100"]
    argv.append("--json")
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"top1", "top5", "mean_per_class_recall", "num_samples", "acc1", "acc5"}
    assert metrics["num_samples"] == n_val


def test_cli_eval_retrieval_readable_line(digits, digits_run, capsys):
    assert main(["eval", "retrieval", "--checkpoint", digits_run]) == 0  # data: the run's data.val
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("retrieval on ") and "image_to_text_R@1" in out[0]


def test_cli_eval_bad_input_is_one_line_error(tmp_path, digits, digits_run, capsys):
    from vlp.cli import build_parser

    missing = str(tmp_path / "no_run")
    args = build_parser().parse_args(["eval", "zeroshot", "--checkpoint", missing])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        args.func(args)
    assert main(["eval", "zeroshot", "--checkpoint", missing, "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and missing in err
    root, _ = digits
    no_names = tmp_path / "n.txt"
    assert main(["eval", "zeroshot", "--checkpoint", digits_run, "--classnames", str(no_names)]) == 2
    assert "classnames file not found" in capsys.readouterr().err
