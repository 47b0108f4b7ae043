"""What an evaluation task is: a kind, class names and a list of labelled chips split into train/val/test.

A reader (pipelines/evaluation/readers.py) describes each chip as a small JSON-able row
    {"id": str, "split": "train" | "val" | "test", "label": int | list[int] | None, ...reader fields}
and loads it on demand:
    reader.load(row) -> (x, months, label)
        x:      {modality: float32 (H, W, T, C)} raw units, registry band order, NaN where missing
        months: int64 (T,) month index 0..11
        label:  int (classification) | int64 (K,) 0/1 (multilabel) | int64 (H, W) class ids, -1 unlabelled
                (segmentation) | float32 (K,) (regression) | float32 (K, H, W), NaN unlabelled (pixel_regression)
Rows are plain data so that Ray Data can ship them to the embedding actors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

KINDS = ("classification", "multilabel", "segmentation", "regression", "pixel_regression")
SPLITS = ("train", "val", "test")


@dataclass
class TaskInfo:
    name: str
    kind: str
    class_names: list[str] = field(default_factory=list)  # classes, or for regression the target names

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def metric(self) -> str:
        return {"classification": "accuracy", "multilabel": "micro_f1", "segmentation": "miou",
                "regression": "rmse", "pixel_regression": "rmse"}[self.kind]


def assign_splits(groups: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Deal whole groups (tiles, regions) to train/val/test, so that no group lands in two splits.

    Groups are ordered by a seeded hash (stable across machines and Python runs), then cut by cumulative
    fraction; with >= 2 groups train and test each get at least one."""
    uniq = sorted(set(groups), key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    n = len(uniq)
    if n == 0:
        return {}
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers (train, val, test), got {fractions}")
    cuts = np.round(np.cumsum(f / f.sum()) * n).astype(int)
    n_train, n_val = cuts[0], cuts[1] - cuts[0]
    if n >= 2:
        n_train = min(max(n_train, 1), n - 1)
        n_val = min(n_val, n - 1 - n_train)
    out = {}
    for i, g in enumerate(uniq):
        out[g] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return out


def split_sizes(rows: list[dict]) -> dict[str, int]:
    return {s: sum(r["split"] == s for r in rows) for s in SPLITS}
