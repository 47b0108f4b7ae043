"""The stored form of a bandset (what the corpus shards hold) and its gridding onto 10 m.

A bandset is stored in its raw dtype (lossless), except Sentinel-1, which is stored in dB as float16
(NaN = nodata); at max(its resolution, 10 m): OpenStreetMap's 2.5 m is strided to 10 m when the build reads
it, coarser bandsets keep their pixels. The training stream grids only the crops it cuts (`cut_stored`, then
`grid_crop`, which repeats coarse pixels onto 10 m), which gives the same values as gridding the whole
sample first.
"""

from __future__ import annotations

import numpy as np

from olmoearth.modalities import BASE_GSD, MODALITIES, TILE_SIZE
from pipelines.imagery.units import RAW_FORMAT, nodata_to_nan, repeat_pixels

COARSEST = 4  # the largest 10 m pixels per stored pixel of any bandset (Sentinel-2 at 40 m)


def stored_dtype(modality: str) -> np.dtype:
    return np.dtype(np.float16) if modality == "sentinel1" else np.dtype(RAW_FORMAT[modality][0])


def stored_fill(modality: str):
    """The value a missing timestep holds in stored form (the nodata value; NaN for Sentinel-1)."""
    nodata = RAW_FORMAT[modality][1]
    return np.nan if modality == "sentinel1" else (0 if nodata is None else nodata)


def stored_resolution(resolution: float) -> float:
    return max(float(resolution), BASE_GSD)


def _factor(resolution: float) -> int:
    """10 m pixels per stored pixel (per side) of a bandset stored at `resolution`."""
    return int(round(stored_resolution(resolution) / BASE_GSD))


def grid_crop(modality: str, arrays: list[np.ndarray], y0: int = 0, x0: int = 0, side: int = TILE_SIZE
              ) -> np.ndarray:  # fmt: skip
    """Stored bandsets [(T_m, C_bs, n, n) per bandset] -> float32 (side, side, T_m, C) model units of the 10 m
    crop at rows y0.., columns x0..; coarser bandsets are repeated onto 10 m (only the crop's pixels)."""
    mod = MODALITIES[modality]
    t = arrays[0].shape[0]
    out = np.empty((side, side, t, mod.num_bands), np.float32)
    for bs, sl, a in zip(mod.bandsets, mod.bandset_slices(), arrays, strict=True):
        f = _factor(bs.resolution)
        if f == 1:
            c = a[:, :, y0 : y0 + side, x0 : x0 + side]
        else:  # the coarse pixels under the crop, repeated, then cut to the crop
            cy, cx = y0 // f, x0 // f
            c = repeat_pixels(a[:, :, cy : (y0 + side - 1) // f + 1, cx : (x0 + side - 1) // f + 1], f)
            c = c[:, :, y0 - cy * f : y0 - cy * f + side, x0 - cx * f : x0 - cx * f + side]
        out[..., sl] = nodata_to_nan(modality, c).transpose(2, 3, 0, 1)
    return out


def cut_stored(modality: str, arrays: list[np.ndarray], y0: int, x0: int, side: int
               ) -> tuple[list[np.ndarray], int, int]:  # fmt: skip
    """The stored pixels under a 10 m crop (copies, all timesteps), cut on a COARSEST-aligned frame so that
    every bandset starts at the same 10 m offset -> (arrays, dy, dx): `grid_crop(modality, arrays, dy, dx,
    side)` then gives the crop."""
    mod = MODALITIES[modality]
    y_a, x_a = y0 - y0 % COARSEST, x0 - x0 % COARSEST
    y_b, x_b = -(-(y0 + side) // COARSEST) * COARSEST, -(-(x0 + side) // COARSEST) * COARSEST
    out = []
    for bs, a in zip(mod.bandsets, arrays, strict=True):
        f = _factor(bs.resolution)
        out.append(a[:, :, y_a // f : y_b // f, x_a // f : x_b // f].copy())
    return out, y0 - y_a, x0 - x_a
