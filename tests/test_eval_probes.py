"""kNN, logistic regression and the scores checked against scikit-learn on fixed small problems."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score, jaccard_score
from sklearn.neighbors import KNeighborsClassifier

from pipelines.evaluation.knn import knn_predict, knn_scores
from pipelines.evaluation.linear_probe import (
    fit_logistic,
    fit_segmentation_probe,
    predict_segmentation,
)
from pipelines.evaluation.metrics import accuracy, mean_average_precision, micro_f1, miou


def _blobs(n, d, k, seed, spread=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * spread
    y = rng.integers(0, k, size=n)
    return centres[y] + rng.normal(size=(n, d)), y


def test_knn_matches_sklearn_weighted_cosine():
    x, y = _blobs(300, 16, 5, seed=0, spread=0.6)
    xtr, ytr, xte = x[:200], y[:200], x[200:]
    ours = knn_predict(xtr, ytr, xte, num_classes=5, k=20)
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / 0.07)).fit(xtr, ytr).predict(xte)
    assert (ours == ref).mean() == 1.0
    assert 0.3 < accuracy(y[200:], ours) < 1.0  # a problem where neighbours disagree
    probs = knn_scores(xtr, ytr, xte, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0)


def test_knn_multilabel_is_per_class_binary_vote():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 8))
    y = (x[:, :4] + 0.5 * rng.normal(size=(150, 4)) > 0).astype(int)  # 4 labels tied to 4 dims
    pred = knn_predict(x[:100], y[:100], x[100:], num_classes=4, k=20)
    for c in range(4):
        ref = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                                   weights=lambda d: np.exp((1.0 - d) / 0.07)).fit(x[:100], y[:100, c])
        np.testing.assert_array_equal(pred[:, c], ref.predict(x[100:]))
    assert micro_f1(y[100:], pred) == pytest.approx(f1_score(y[100:], pred, average="micro"))
    assert micro_f1(y[100:], pred) > 0.6


def test_logistic_regression_matches_sklearn():
    x, y = _blobs(240, 10, 4, seed=2, spread=1.0)
    for C in (0.1, 1.0):
        ours = fit_logistic(x, y, num_classes=4, C=C, standardise=False, tol=1e-10, max_iter=2000)
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(x, y)
        # the softmax parametrisation is unique up to a shift shared by all classes: compare logit gaps
        z_ours, z_ref = ours.logits(x), ref.decision_function(x)
        np.testing.assert_allclose(z_ours - z_ours[:, :1], z_ref - z_ref[:, :1], atol=2e-4)
        np.testing.assert_allclose(ours.proba(x), ref.predict_proba(x), atol=1e-5)
        assert (ours.predict(x) == ref.predict(x)).all()


def test_multilabel_logistic_matches_one_vs_rest_sklearn():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 6))
    y = (x[:, :3] @ rng.normal(size=(3, 3)) + 0.3 * rng.normal(size=(200, 3)) > 0).astype(int)
    ours = fit_logistic(x, y, num_classes=3, C=0.5, standardise=False, tol=1e-10, max_iter=2000)
    for c in range(3):
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(x, y[:, c])
        np.testing.assert_allclose(ours.weight[:, c], ref.coef_[0], atol=1e-4)
        np.testing.assert_allclose(ours.bias[c], ref.intercept_[0], atol=1e-4)


def test_scores_match_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=(60, 5))
    y[0] = 1  # every class has a positive
    s = y * 0.6 + rng.random((60, 5))
    s[:10] = np.round(s[:10], 1)  # some tied scores
    assert mean_average_precision(y, s) == pytest.approx(average_precision_score(y, s, average="macro"))
    p = (s > 0.8).astype(int)
    assert micro_f1(y, p) == pytest.approx(f1_score(y, p, average="micro"))

    t = rng.integers(-1, 4, size=(5, 16, 16))  # -1 = unlabelled
    q = np.where(rng.random(t.shape) < 0.7, t, rng.integers(0, 4, size=t.shape)).clip(0)
    keep = t != -1
    ref = jaccard_score(t[keep], q[keep], average="macro", labels=[0, 1, 2, 3])
    assert miou(t, q, 4) == pytest.approx(ref)
    with pytest.raises(ValueError, match="labels must lie"):
        miou(t + 5, q, 4)


def test_segmentation_probe_learns_a_linearly_separable_map():
    rng = np.random.default_rng(5)
    cls = rng.integers(0, 3, size=(40, 4, 4))  # one class per 4x4-pixel patch
    feats = np.eye(3)[cls] * 2 + 0.1 * rng.normal(size=(40, 4, 4, 3))  # (N, h, w, D)
    labels = cls.repeat(4, 1).repeat(4, 2)  # (N, 16, 16)
    labels[:, 0, :] = -1  # ignored row
    head = fit_segmentation_probe(feats[:30], labels[:30], 3, lr=0.05, epochs=30, seed=0)
    pred = predict_segmentation(head, feats[30:], (16, 16))
    assert pred.shape == (10, 16, 16)
    assert miou(labels[30:], pred, 3) > 0.6
    head2 = fit_segmentation_probe(feats[:30], labels[:30], 3, lr=0.05, epochs=30, seed=0)
    np.testing.assert_array_equal(predict_segmentation(head2, feats[30:], (16, 16)), pred)  # seeded


def test_all_nodata_chips_are_reported_not_scored():
    from pipelines.evaluation.extract import Features
    from pipelines.evaluation.hook import load_probe_set
    from pipelines.evaluation.task import TaskInfo

    f = Features(["a", "b", "c"], np.array(["train", "test", "train"]), np.array([0, 1, 2]),
                 {"x": np.arange(6.0).reshape(3, 2)}, np.array([False, True, False]))
    kept, dropped = f.without_empty()
    assert dropped == ["b"] and kept.ids == ["a", "c"] and kept.labels.tolist() == [0, 2]
    assert kept.features["x"].tolist() == [[0.0, 1.0], [4.0, 5.0]] and kept.splits.tolist() == ["train", "train"]

    class Reader:  # chip "b" lies wholly in a swath gap: every pixel NaN
        def rows(self):
            return [{"id": i, "split": "train"} for i in "abc"]

        def load(self, row):
            x = np.full((4, 4, 1, 2), np.nan if row["id"] == "b" else 1.0, np.float32)
            return {"sentinel2_l2a": x}, np.zeros(1, np.int64), np.int64(0)

        def info(self):
            return TaskInfo("t", "classification", ["c0", "c1"])

    ps = load_probe_set(Reader())
    assert ps.ids == ["a", "c"] and ps.excluded == ["b"] and len(ps.chips) == 2
