"""Scores of the probes, written out in numpy: accuracy, micro F1 and mAP (multi-label), mIoU (segmentation).
Pixels labelled IGNORE (-1) count in no segmentation score."""

from __future__ import annotations

import numpy as np

IGNORE = -1


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"accuracy: shapes {y_true.shape} and {y_pred.shape} must match and be non-empty")
    return float((y_true == y_pred).mean())


def micro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """y_true, y_pred: (N, K) 0/1. F1 of all (sample, class) decisions pooled together."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = np.sum(t & p)
    fp = np.sum(~t & p)
    fn = np.sum(t & ~p)
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall step curve of one class: sum_n (R_n - R_{n-1}) P_n over the
    distinct score thresholds, highest first (equal scores form one threshold)."""
    y = np.asarray(y_true).astype(bool)
    if not y.any():
        raise ValueError("average precision is undefined for a class with no positive sample")
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    s, y = np.asarray(score, dtype=np.float64)[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each equal-score run
    tp = np.cumsum(y)[last_of_run]
    precision = tp / (last_of_run + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro mAP over the classes that have at least one positive sample."""
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    present = [c for c in range(y_true.shape[1]) if y_true[:, c].any()]
    if not present:
        raise ValueError("mAP: no class has a positive sample")
    return float(np.mean([average_precision(y_true[:, c], scores[:, c]) for c in present]))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = truth; IGNORE pixels of y_true are left out."""
    t, p = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    keep = t != IGNORE
    t, p = t[keep].astype(np.int64), p[keep].astype(np.int64)
    if t.size and (t.max() >= num_classes or t.min() < 0):
        raise ValueError(f"labels must lie in [0, {num_classes}) or be {IGNORE}, got {t.min()}..{t.max()}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean intersection-over-union over the classes present in truth or prediction."""
    return miou_from_confusion(confusion(y_true, y_pred, num_classes))


def miou_from_confusion(cm: np.ndarray) -> float:
    """miou of a confusion matrix (rows truth, columns prediction), e.g. one summed over batches and ranks."""
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = union > 0
    if not present.any():
        raise ValueError("mIoU: no labelled pixel")
    return float(np.mean(inter[present] / union[present]))


def macro_f1_from_confusion(cm: np.ndarray) -> float:
    """Mean F1 over the classes present in truth or prediction; cm: (K, K) counts, rows = truth."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2 tp + fp + fn
    present = denom > 0
    if not present.any():
        raise ValueError("macro F1: no labelled sample")
    return float(np.mean(2 * tp[present] / denom[present]))
