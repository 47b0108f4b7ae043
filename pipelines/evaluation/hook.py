"""The in-loop probe: score the encoder being trained on a small in-memory labelled set, every N steps,
on rank 0, without Ray Data. Build the set once, before the loop:

    from pipelines.evaluation.hook import load_probe_set, probe
    from pipelines.evaluation.synth_task import SynthTaskReader
    probe_set = load_probe_set(SynthTaskReader(root=corpus_uri, chip_size=32, max_timesteps=3), max_chips=256)
    ...
    if rank == 0 and step % probe_every == 0:
        scores = probe(model.encoder, probe_set)     # {"synth/knn_accuracy": 0.61, "synth/linear_accuracy": 0.66}

`probe` puts the encoder in eval mode under torch.no_grad() and restores its mode afterwards; it never
changes parameters or the global RNG. The same probe set gives comparable figures across steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.evaluation.extract import Features, embed_in_process, has_valid_pixel
from pipelines.evaluation.score import score_task
from pipelines.evaluation.task import TaskInfo


@dataclass
class ProbeSet:
    info: TaskInfo
    chips: list[tuple[dict[str, np.ndarray], np.ndarray]]  # (x {modality: (H, W, T, C)}, months (T,))
    labels: np.ndarray
    splits: np.ndarray
    ids: list[str]
    excluded: list[str]  # chips with no valid pixel (all nodata): not scored

    @property
    def name(self) -> str:
        return self.info.name


def load_probe_set(reader, max_chips: int = 0, seed: int = 0) -> ProbeSet:
    """Read a reader's chips into memory (a seeded subset of at most max_chips, keeping every split)."""
    rows = reader.rows()
    if max_chips and len(rows) > max_chips:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_chips, replace=False))
        rows = [rows[i] for i in keep]
    loaded = [reader.load(r) for r in rows]
    has_data = [has_valid_pixel(x) for x, _, _ in loaded]
    excluded = [r["id"] for r, ok in zip(rows, has_data, strict=True) if not ok]
    rows = [r for r, ok in zip(rows, has_data, strict=True) if ok]
    loaded = [c for c, ok in zip(loaded, has_data, strict=True) if ok]
    return ProbeSet(reader.info(), [(x, m) for x, m, _ in loaded], np.stack([np.asarray(l) for _, _, l in loaded]),
                    np.array([r["split"] for r in rows]), [r["id"] for r in rows], excluded)


def probe(encoder: torch.nn.Module, task: ProbeSet, patch_size: int = 4, k: int = 20, linear: bool = True,
          pooling: str = "mean", batch_size: int = 32, baselines: bool = False) -> dict[str, float]:
    """kNN (and logistic-regression) scores of `encoder` on `task`: {"<task>/<probe>_<metric>": value}.
    baselines=True adds the raw band-statistics baseline as "<task>/band_stats/<probe>_<metric>"."""
    rng = torch.random.get_rng_state()
    sources: dict[str, object] = {"encoder": encoder}
    if baselines:
        sources["band_stats"] = None
    dense = task.info.kind == "segmentation"
    try:
        feats = embed_in_process(task.chips, sources, patch_size=patch_size, pooling=pooling, dense=dense,
                                 batch_size=batch_size)
    finally:
        torch.random.set_rng_state(rng)
    probes = ("knn", "linear") if linear else ("knn",)
    out = {}
    for name, f in feats.items():
        recs = score_task(task.info, Features(task.ids, task.splits, task.labels, {name: f}), k=k, probes=probes,
                          seg_epochs=20)
        prefix = task.name if name == "encoder" else f"{task.name}/{name}"
        out.update({f"{prefix}/{r['probe']}_{r['metric']}": r["value"] for r in recs})
    return out


def make_probe(uri: str, chip_size: int, max_timesteps: int, max_chips: int = 0, seed: int = 0):
    """The in-loop probe of pretraining (`fit(cfg, probe=...)`): `probe(encoder) -> scores` on the
    EUROSAT_LIKE task of the labelled synthetic corpus at `uri`, with the chip size and timesteps given,
    its set read into memory once, here. Picklable, so it travels to the training workers."""
    import functools

    from pipelines.evaluation.synth_task import EUROSAT_LIKE, SynthTaskReader

    reader = SynthTaskReader(root=uri, **dict(EUROSAT_LIKE, chip_size=chip_size, max_timesteps=max_timesteps))
    return functools.partial(probe, task=load_probe_set(reader, max_chips=max_chips, seed=seed))
