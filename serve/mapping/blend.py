"""The weights that blend overlapping tiles back into one mosaic: per tile, per output token, 1 inside and a
linear ramp over the `overlap / p` tokens shared with a neighbour, so the mosaic equals each tile's own
embedding wherever only that tile reaches."""

from __future__ import annotations

import numpy as np

from pipelines.imagery.grid import Tile


def ramp(n: int, m: int, before: bool, after: bool) -> np.ndarray:
    """1-D weights over n tokens: linear ramp over m tokens at a side that has a neighbour."""
    w = np.ones(n, dtype=np.float32)
    if m > 0:
        r = (np.arange(m, dtype=np.float32) + 0.5) / m
        if before:
            w[:m] = np.minimum(w[:m], r)
        if after:
            w[n - m :] = np.minimum(w[n - m :], r[::-1])
    return w


def tile_weights(tile: Tile, tiles_per_row: int, tiles_per_col: int, overlap_tokens: int, size_tokens: int):
    """(size_tokens, size_tokens) weights of `tile`; ramps only on the sides that have a neighbouring tile."""
    wy = ramp(size_tokens, overlap_tokens, tile.row > 0, tile.row < tiles_per_col - 1)
    wx = ramp(size_tokens, overlap_tokens, tile.col > 0, tile.col < tiles_per_row - 1)
    return wy[:, None] * wx[None, :]  # (ht, wt)
