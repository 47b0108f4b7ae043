"""A per-process cache of decoded corpus tiles for fine-tuning readers.

Training visits chips in a shuffled order, so chips of one 256 px tile rarely come one after another; without
a cache every chip decodes its whole tile again (all bandset files, all months). Tiles are kept trimmed to the
run's timesteps, least recently used first out beyond `MAX_BYTES` (per process: each Ray Train worker has its
own), and label maps likewise by count.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from pipelines.common.storage import Storage

MAX_BYTES = 512 * 2**20  # decoded pixels kept per process
MAX_LABEL_MAPS = 512  # label maps kept per process (256 x 256 int64: 0.5 MiB each)

_TILES: OrderedDict = OrderedDict()  # (root, sample, modalities, T) -> (x, months, nbytes)
_LABELS: OrderedDict = OrderedDict()  # (root, sample) -> (256, 256) int64


def corpus_tile(root: str, sample_id: str, modalities: tuple[str, ...], max_timesteps: int):
    """(x {m: (256, 256, T', C)} with T' <= max_timesteps, months (T',)) of a corpus sample; raises
    FileNotFoundError naming the sample when it has none of `modalities`."""
    from pipelines.corpus.sample import read_sample

    key = (root, sample_id, tuple(modalities), max_timesteps)
    hit = _TILES.get(key)
    if hit is not None:
        _TILES.move_to_end(key)
        return hit[0], hit[1]
    x, months, _ = read_sample(root, sample_id, Storage(), modalities=list(modalities))
    if not x:
        raise FileNotFoundError(f"{root}: sample {sample_id} has none of {list(modalities)}")
    x = {m: np.ascontiguousarray(v[:, :, :max_timesteps], np.float32) for m, v in x.items()}
    months = np.asarray(months[:max_timesteps], np.int64)
    nbytes = sum(v.nbytes for v in x.values())
    _TILES[key] = (x, months, nbytes)
    while len(_TILES) > 1 and sum(v[2] for v in _TILES.values()) > MAX_BYTES:
        _TILES.popitem(last=False)
    return x, months


def synth_label_map(root: str, sample_id: str) -> np.ndarray:
    """The labelled synthetic corpus's (256, 256) class map of a sample, -1 unlabelled."""
    from pipelines.evaluation.synth_task import read_label_map

    key = (root, sample_id)
    if key not in _LABELS:
        _LABELS[key] = read_label_map(root, sample_id, Storage())
        while len(_LABELS) > MAX_LABEL_MAPS:
            _LABELS.popitem(last=False)
    _LABELS.move_to_end(key)
    return _LABELS[key]
