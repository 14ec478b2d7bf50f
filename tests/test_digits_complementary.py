"""The digits-complementary set: deterministic, its attribute noise and missing texts at the rates
of its parameters, and each modality alone below what both reach together."""
from collections import Counter, defaultdict

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from vlp.data.builtin import DATASETS
from vlp.data.digits_complementary import ATTRIBUTES, NO_ATTRIBUTE, Params, generate

PHRASE = {w: (name, v) for name, (_, words) in ATTRIBUTES.items() for v, w in enumerate(words)}


@pytest.fixture(scope="module")
def splits():
    return dict(generate(Params()))


def test_same_arguments_same_samples(splits):
    assert "digits-complementary" in DATASETS.list()  # so `vlp data digits-complementary` writes it
    again = dict(generate(Params()))
    for split in ("train", "val"):
        assert [(s.key, s.text, s.label) for s in again[split]] == [(s.key, s.text, s.label) for s in splits[split]]
        assert all(np.array_equal(a.image, b.image) for a, b in zip(again[split], splits[split]))
    other = dict(generate(Params(), seed=1))["train"]
    assert [s.text for s in other] != [s.text for s in splits["train"]]


@pytest.mark.parametrize("prob,noise", [(0.5, 0.1), (0.8, 0.3)])
def test_attribute_rates_match_parameters(prob, noise):
    samples = [s for split in generate(Params(attribute_prob=prob, attribute_noise=noise)) for s in split[1]]
    named, wrong, empty = 0, 0, 0
    for s in samples:
        if s.text in NO_ATTRIBUTE:
            empty += 1
            continue
        for phrase in s.text.split(", "):
            name, value = PHRASE[phrase]
            named += 1
            wrong += value != ATTRIBUTES[name][0](s.label)
    n = len(samples)  # 3594: binomial standard errors below 0.01
    assert named / (3 * n) == pytest.approx(prob, abs=0.02)
    assert wrong / named == pytest.approx(noise, abs=0.02)
    assert empty / n == pytest.approx((1 - prob) ** 3, abs=0.02)


def test_each_modality_alone_is_below_both(splits):
    """Image alone: logistic regression on the degraded scans; text alone: the most frequent label of
    each text's attribute set in train; both: the product of the two posteriors."""
    train, val = splits["train"], splits["val"]
    x = lambda samples: np.stack([s.image.ravel() / 16 for s in samples])  # noqa: E731
    y_train, y_val = np.array([s.label for s in train]), np.array([s.label for s in val])
    p_image = LogisticRegression(max_iter=3000).fit(x(train), y_train).predict_proba(x(val))  # (n, 10)
    counts = defaultdict(Counter)
    for s in train:
        counts[frozenset(s.text.split(", "))][s.label] += 1
    p_text = np.array([[counts[frozenset(s.text.split(", "))][c] + 1 for c in range(10)] for s in val], float)
    acc = {name: float((p.argmax(1) == y_val).mean())
           for name, p in (("image", p_image), ("text", p_text), ("both", p_image * p_text))}
    assert acc["image"] < 0.7 and acc["text"] < 0.4 and acc["both"] > 0.72  # measured: 0.63, 0.33, 0.74
    assert acc["both"] > acc["image"] + 0.08


@pytest.mark.slow
def test_written_by_vlp_data(tmp_path):
    counts = DATASETS.get("digits-complementary").builder(tmp_path)
    assert counts == {"train": 2874, "train_shards": 6, "val": 720, "val_shards": 2}
    assert (tmp_path / "classnames.txt").read_text().split("\n")[:2] == ["zero", "one"]
