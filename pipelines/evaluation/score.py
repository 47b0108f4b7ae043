"""Score every feature source of a task with the probes: kNN and a logistic-regression probe for
(multi-label) classification, a per-patch linear probe for segmentation. Each figure comes back as one
record naming the task, features, probe, metric, the split it is measured on and the split sizes."""

from __future__ import annotations

import numpy as np

from pipelines.evaluation.extract import Features
from pipelines.evaluation.knn import knn_predict, knn_scores
from pipelines.evaluation.linear_probe import (
    predict_segmentation,
    select_and_fit_logistic,
    select_and_fit_segmentation,
)
from pipelines.evaluation.metrics import accuracy, mean_average_precision, micro_f1, miou
from pipelines.evaluation.task import TaskInfo


def _holdout(train_idx: np.ndarray, val_idx: np.ndarray, fraction: float, seed: int):
    """The split that picks hyper-parameters: the task's val split, else a seeded slice of train."""
    if len(val_idx):
        return train_idx, val_idx
    rng = np.random.default_rng(seed)
    perm = rng.permutation(train_idx)
    n_val = int(round(len(perm) * fraction))
    if n_val == 0 or n_val >= len(perm):
        return train_idx, train_idx  # too few samples to hold any out: select on train (reported as such)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _safe_map(y, s):
    try:
        return mean_average_precision(y, s)
    except ValueError:
        return float("nan")


def score_task(info: TaskInfo, feats: Features, k: int = 20, Cs=(0.01, 0.1, 1.0, 10.0), val_fraction: float = 0.2,
               seg_lrs=(1e-3, 1e-2, 1e-1), seg_epochs: int = 50, seed: int = 0, probes=("knn", "linear")) -> list[dict]:
    tr, va, te = feats.split("train"), feats.split("val"), feats.split("test")
    if len(tr) == 0:
        raise ValueError(f"task {info.name}: no training sample")
    ev, ev_name = (te, "test") if len(te) else (va, "val")
    if len(ev) == 0:
        raise ValueError(f"task {info.name}: no test or val sample to score on")
    y = feats.labels
    records = []

    def rec(source, probe, metric, value, n_train, n_val, **hyper):
        records.append({"task": info.name, "kind": info.kind, "features": source, "probe": probe, "metric": metric,
                        "value": float(value), "split": ev_name, "n_train": int(n_train), "n_val": int(n_val),
                        "n_eval": int(len(ev)), "hyper": hyper})

    fit_idx, sel_idx = _holdout(tr, va, val_fraction, seed)
    n_sel = len(sel_idx) if sel_idx is not tr else 0
    for source, f in feats.features.items():
        f = np.asarray(f, np.float64)
        if info.kind == "segmentation":
            if "linear" in probes:
                head, lr, _ = select_and_fit_segmentation(f[fit_idx], y[fit_idx], f[sel_idx], y[sel_idx],
                                                          info.num_classes, lrs=seg_lrs, epochs=seg_epochs, seed=seed)
                pred = predict_segmentation(head, f[ev], y.shape[-2:])
                rec(source, "linear", "miou", miou(y[ev], pred, info.num_classes), len(fit_idx), n_sel, lr=lr)
            continue
        if "knn" in probes:
            pred = knn_predict(f[tr], y[tr], f[ev], info.num_classes, k=k)
            if info.kind == "classification":
                rec(source, "knn", "accuracy", accuracy(y[ev], pred), len(tr), 0, k=k)
            else:
                rec(source, "knn", "micro_f1", micro_f1(y[ev], pred), len(tr), 0, k=k)
                rec(source, "knn", "map", _safe_map(y[ev], knn_scores(f[tr], y[tr], f[ev], info.num_classes, k)),
                    len(tr), 0, k=k)
        if "linear" in probes:
            if info.kind == "classification":
                score = lambda yt, m, x: accuracy(yt, m.predict(x))  # noqa: E731
            else:
                score = lambda yt, m, x: micro_f1(yt, m.predict(x))  # noqa: E731
            model, C, _ = select_and_fit_logistic(f[fit_idx], y[fit_idx], f[sel_idx], y[sel_idx], info.num_classes,
                                                  score, Cs=Cs)
            if info.kind == "classification":
                rec(source, "linear", "accuracy", accuracy(y[ev], model.predict(f[ev])), len(fit_idx), n_sel, C=C)
            else:
                rec(source, "linear", "micro_f1", micro_f1(y[ev], model.predict(f[ev])), len(fit_idx), n_sel, C=C)
                rec(source, "linear", "map", _safe_map(y[ev], model.proba(f[ev])), len(fit_idx), n_sel, C=C)
    return records


def format_record(r: dict) -> str:
    """One printed line per figure."""
    return (f"eval task={r['task']} features={r['features']} probe={r['probe']} metric={r['metric']} "
            f"value={r['value']:.4f} split={r['split']} n_train={r['n_train']} n_val={r['n_val']} "
            f"n_{r['split']}={r['n_eval']}")


def markdown_table(records: list[dict], title: str = "") -> str:
    """Features as rows, (probe, metric) as columns; split sizes in the caption."""
    cols = list(dict.fromkeys((r["probe"], r["metric"]) for r in records))
    rows = list(dict.fromkeys(r["features"] for r in records))
    val = {(r["features"], r["probe"], r["metric"]): r["value"] for r in records}
    lines = []
    if title:
        lines += [f"### {title}", ""]
    if records:
        r0 = records[0]
        lines += [f"task `{r0['task']}` ({r0['kind']}), scored on `{r0['split']}` (n={r0['n_eval']}); "
                  f"train n={max(r['n_train'] for r in records)}", ""]
    lines.append("| features | " + " | ".join(f"{p} {m}" for p, m in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for f in rows:
        cells = [f"{val[(f, p, m)]:.4f}" if (f, p, m) in val else "" for p, m in cols]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
