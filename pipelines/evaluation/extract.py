"""Embedding extraction over a labelled dataset with Ray Data: the chips' rows are a dataset, an actor pool
(`map_batches(..., compute=ActorPoolStrategy)`) loads each frozen encoder once per actor, reads the chips
of its batch and returns the features of every source side by side, so each chip is read once."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass
class Features:
    ids: list[str]
    splits: np.ndarray  # (N,) "train" / "val" / "test"
    labels: np.ndarray  # (N,) | (N, K) | (N, H, W)
    features: dict[str, np.ndarray]  # source -> (N, D) | (N, h, w, D)
    empty: np.ndarray | None = None  # (N,) bool: the chip has no valid pixel in any modality and timestep

    def split(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.splits == name)

    def without_empty(self) -> tuple[Features, list[str]]:
        """The chips that carry data, and the ids of those that do not (an all-nodata chip has no features
        to speak of: every encoder token is MISSING; it is reported, not scored)."""
        if self.empty is None or not self.empty.any():
            return self, []
        keep = np.flatnonzero(~self.empty)
        dropped = [self.ids[i] for i in np.flatnonzero(self.empty)]
        return Features([self.ids[i] for i in keep], self.splits[keep], self.labels[keep],
                        {k: v[keep] for k, v in self.features.items()}, self.empty[keep]), dropped


def has_valid_pixel(x: dict[str, np.ndarray]) -> bool:
    """Whether a chip {modality: (H, W, T, C)} has any finite pixel (else every encoder token is MISSING)."""
    return any(np.isfinite(v).any() for v in x.values())


def _stack(arrays: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{where}: chips of different shapes {sorted(shapes)}; crop them to one size")
    return np.stack(arrays)


class Embedder:
    """Ray Data actor: the reader and the frozen encoders live for the actor's lifetime."""

    def __init__(self, reader, sources: dict[str, dict], patch_size: int, pooling: str, dense: bool,
                 threads: int = 1):
        import torch

        from pipelines.evaluation.features import load_source

        torch.set_num_threads(max(1, threads))
        self.reader, self.patch_size, self.pooling, self.dense = reader, patch_size, pooling, dense
        self.sources = {name: load_source(spec) for name, spec in sources.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.evaluation.features import chip_features

        rows = [json.loads(r) for r in batch["row"]]
        loaded = [self.reader.load(r) for r in rows]
        # chips of one shape are encoded together; datasets with mixed sizes fall back to smaller groups
        groups = defaultdict(list)
        for i, (x, months, _) in enumerate(loaded):
            groups[tuple((m, v.shape) for m, v in sorted(x.items())) + (months.shape,)].append(i)
        feats: dict[str, list] = defaultdict(lambda: [None] * len(rows))
        for idx in groups.values():
            x = {m: np.stack([loaded[i][0][m] for i in idx]) for m in loaded[idx[0]][0]}
            months = np.stack([loaded[i][1] for i in idx])
            for name, f in chip_features(self.sources, x, months, self.patch_size, self.pooling, self.dense).items():
                for j, i in enumerate(idx):
                    feats[name][i] = f[j]
        out = {"i": np.asarray(batch["i"]), "label": _stack([l for _, _, l in loaded], "labels"),
               "empty": np.array([not has_valid_pixel(x) for x, _, _ in loaded])}
        for name, fl in feats.items():
            out[f"feat::{name}"] = _stack(fl, f"features of {name}")
        return out


def extract_features(reader, rows: list[dict], sources: dict[str, dict], patch_size: int = 4,
                     pooling: str = "mean", dense: bool = False, batch_size: int = 16, num_actors: int = 1,
                     threads_per_actor: int | None = None) -> Features:
    """Run the actor pool over `rows` and gather the features in row order (nothing dropped: the result
    has exactly one entry per row, checked)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if os.environ.get("TQDM_DISABLE"):
        DataContext.get_current().enable_progress_bars = False
    threads = threads_per_actor or max(1, (os.cpu_count() or 1) // num_actors)
    items = [{"i": i, "row": json.dumps(r)} for i, r in enumerate(rows)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 4 * num_actors)) or 1)
    out = ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(reader=reader, sources=sources, patch_size=patch_size, pooling=pooling,
                                   dense=dense, threads=threads),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=num_actors),
        num_cpus=1,
    )
    parts = list(out.iter_batches(batch_size=None, batch_format="numpy"))
    order = np.concatenate([p["i"] for p in parts])
    if sorted(order.tolist()) != list(range(len(rows))):
        raise RuntimeError(f"embedding returned {len(order)} rows for {len(rows)} chips")
    perm = np.argsort(order)
    labels = np.concatenate([p["label"] for p in parts])[perm]
    features = {k.split("::", 1)[1]: np.concatenate([p[k] for p in parts])[perm] for k in parts[0] if k.startswith("feat::")}
    empty = np.concatenate([p["empty"] for p in parts])[perm]
    return Features([r["id"] for r in rows], np.array([r["split"] for r in rows]), labels, features, empty)


def embed_in_process(reader_or_chips, sources: dict[str, object], patch_size: int = 4, pooling: str = "mean",
                     dense: bool = False, batch_size: int = 16):
    """The same features without Ray (the training hook, small sets): `reader_or_chips` is a list of
    (x, months) with x {modality: (H, W, T, C)} of one shape. Returns {source: features}."""
    from pipelines.evaluation.features import chip_features

    chips = reader_or_chips
    out: dict[str, list] = defaultdict(list)
    for start in range(0, len(chips), batch_size):
        part = chips[start : start + batch_size]
        x = {m: np.stack([c[0][m] for c in part]) for m in part[0][0]}
        months = np.stack([c[1] for c in part])
        for name, f in chip_features(sources, x, months, patch_size, pooling, dense).items():
            out[name].append(f)
    return {name: np.concatenate(v) for name, v in out.items()}
