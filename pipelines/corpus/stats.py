"""Per-band statistics of the corpus (count, mean, M2, min, max over valid pixels, in model units), kept as
mergeable (5, NB) accumulators: each part task computes its part's while writing the shard, the driver
merges the parts' (Chan et al.'s parallel mean/variance merge plus min/max) into norm_stats.json."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

from olmoearth.modalities import MODALITIES

ALL_BANDS = [(m, b) for m, mod in MODALITIES.items() for b in mod.bands]  # 67, registry order
BAND_OFFSET = {
    m: sum(MODALITIES[p].num_bands for p in list(MODALITIES)[:i]) for i, m in enumerate(MODALITIES)
}
NB = len(ALL_BANDS)


def empty_stats() -> np.ndarray:
    out = np.zeros((5, NB))
    out[3], out[4] = np.inf, -np.inf
    return out


def stats_vector(per_modality: dict[str, np.ndarray]) -> np.ndarray:
    """{modality: (5, C)} (from load_bandsets' meta["stats"]) -> (5, NB) over all registered bands."""
    out = empty_stats()
    for name, st in per_modality.items():
        o = BAND_OFFSET[name]
        out[:, o : o + st.shape[1]] = st
    return out


def merge_stats(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al.'s parallel merge of two (5, NB) accumulators."""
    na, nb = a[0], b[0]
    n = na + nb
    safe = np.where(n > 0, n, 1)
    delta = b[1] - a[1]
    mean = a[1] + delta * nb / safe
    m2 = a[2] + b[2] + delta**2 * na * nb / safe
    return np.stack([n, mean, m2, np.minimum(a[3], b[3]), np.maximum(a[4], b[4])])


def stats_to_norm_json(acc: np.ndarray) -> dict:
    """(5, NB) -> {modality: {band: {"mean", "std"} | {"min", "max"}}} in the layout of norm_stats.json
    (maps given there as min/max keep min/max). A band never observed falls back to the published value and
    is listed under "_fallback"."""
    default = json.loads(resources.files("olmoearth").joinpath("data/norm_stats.json").read_text())
    out, fallback = {}, []
    for i, (m, b) in enumerate(ALL_BANDS):
        n, mean, m2, lo, hi = acc[:, i]
        ref = default[m][b]
        if n <= 0:
            out.setdefault(m, {})[b] = dict(ref)
            fallback.append(f"{m}.{b}")
        elif "min" in ref:
            out.setdefault(m, {})[b] = {"min": float(lo), "max": float(hi) if hi > lo else float(lo) + 1.0}
        else:
            std = float(np.sqrt(m2 / n))
            out.setdefault(m, {})[b] = {"mean": float(mean), "std": std if std > 0 else 1.0}
        out[m][b]["count"] = int(n)
    out["_fallback"] = fallback
    return out
