"""The area's pixel grid, cut into overlapping square tiles, and the weights that blend them back together.

    grid: W x H pixels of 10 m from a top-left corner (x0, y0) in a projected CRS (UTM)
    tiles: `size` px squares stepping by size - overlap; the last row / column is shifted back to end at the
           grid's edge, so every tile lies inside the grid (a grid smaller than one tile gets one tile that
           sticks out past its right / bottom edge; what lies outside is cropped away)
    weights: per tile, per output token: 1 inside, a linear ramp over the `overlap / p` tokens shared with a
           neighbour; so the mosaic equals each tile's own embedding wherever only that tile reaches
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    crs: str
    x0: float  # left edge, metres
    y0: float  # top edge, metres
    width: int  # px
    height: int  # px
    resolution: float = 10.0

    def transform(self, scale: int = 1) -> tuple:
        """Affine (a, b, c, d, e, f) of this grid's pixels, or of pixels `scale` times larger (tokens)."""
        r = self.resolution * scale
        return (r, 0.0, self.x0, 0.0, -r, self.y0)

    @property
    def area_km2(self) -> float:
        return self.width * self.height * (self.resolution / 1000.0) ** 2


@dataclass(frozen=True)
class Tile:
    row: int
    col: int
    x: int  # left px inside the grid
    y: int  # top px inside the grid
    size: int  # px per side

    @property
    def id(self) -> str:
        return f"r{self.row:04d}_c{self.col:04d}"

    def bounds(self, grid: Grid) -> tuple[float, float, float, float]:
        r = grid.resolution
        left, top = grid.x0 + self.x * r, grid.y0 - self.y * r
        return left, top - self.size * r, left + self.size * r, top


def starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    out = list(range(0, length - size, stride))
    if out[-1] != length - size:
        out.append(length - size)
    return out


def make_tiles(grid: Grid, size: int, overlap: int, patch_size: int) -> list[Tile]:
    if size % patch_size or overlap % patch_size:
        raise ValueError(f"tile_size ({size}) and overlap ({overlap}) must be multiples of patch_size ({patch_size})")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap} for tile_size {size}")
    if grid.width % patch_size or grid.height % patch_size:
        raise ValueError(f"grid {grid.width} x {grid.height} px is not a multiple of patch_size {patch_size}")
    xs, ys = starts(grid.width, size, size - overlap), starts(grid.height, size, size - overlap)
    return [Tile(r, c, x, y, size) for r, y in enumerate(ys) for c, x in enumerate(xs)]


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
    wy = ramp(size_tokens, overlap_tokens, tile.row > 0, tile.row < tiles_per_col - 1)
    wx = ramp(size_tokens, overlap_tokens, tile.col > 0, tile.col < tiles_per_row - 1)
    return wy[:, None] * wx[None, :]  # (ht, wt)


def signature(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def grid_dict(grid: Grid) -> dict:
    return asdict(grid)
