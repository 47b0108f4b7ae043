"""Masking and monthly compositing of the scenes a STAC source reads (`pipelines.imagery.stac`).

    clear = clear_pixels("sentinel2_l2a", scl, classes=None)   # (h, w) bool: not cloud / shadow / nodata
    comp = Composite("first", (h, w, c))
    for pixels, clear in scenes_sorted_by_cloud_cover:        # (h, w, c) float32 NaN = nodata
        comp.add(pixels, clear)
        if comp.full: break                                    # the rest of the month's scenes are not read
    month = comp.result()                                      # (h, w, c), NaN where no scene was clear

As the original's monthly mosaics: per pixel the first clear value over the month's scenes in order of
`eo:cloud_cover` ("first"), or the per-band median of the clear values ("median"). A pixel no scene saw clear
stays NaN (a MISSING token): nothing is filled with made-up values.

Cloud masks: Sentinel-2 L2A by its scene classification (SCL) classes, Landsat Collection 2 by QA_PIXEL bits;
a pixel whose mask value is missing (outside the mask raster, its nodata) is not clear.
"""

from __future__ import annotations

import numpy as np

# SCL classes that are not clear ground: 0 no data, 3 cloud shadow, 8 / 9 cloud medium / high probability,
# 10 thin cirrus (1 saturated / defective is left to the band values' own nodata)
SCL_NOT_CLEAR = (0, 3, 8, 9, 10)
# QA_PIXEL bits that mark a pixel not clear: 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud, 4 cloud shadow
QA_PIXEL_NOT_CLEAR = (0, 1, 2, 3, 4)
# how each modality's mask asset is read: "classes" (a class per value) or "bits" (a flag per bit)
MASK_KIND = {"sentinel2_l2a": "classes", "landsat": "bits"}
DEFAULT_NOT_CLEAR = {"sentinel2_l2a": SCL_NOT_CLEAR, "landsat": QA_PIXEL_NOT_CLEAR}
METHODS = ("first", "median")


def clear_pixels(modality: str, mask: np.ndarray, not_clear=None) -> np.ndarray:
    """(h, w) bool: where the mask raster (float, NaN = missing) says the ground is seen clearly.
    `not_clear`: the SCL classes (Sentinel-2) or QA_PIXEL bit positions (Landsat) to drop; None: defaults."""
    codes = tuple(DEFAULT_NOT_CLEAR.get(modality, ()) if not_clear is None else not_clear)
    seen = np.isfinite(mask)
    if MASK_KIND.get(modality) == "bits":
        flags = np.where(seen, mask, 0).astype(np.uint32)
        bad = np.uint32(sum(1 << int(b) for b in codes))
        return seen & ((flags & bad) == 0)
    return seen & ~np.isin(mask, np.asarray(codes, dtype=np.float32))


class Composite:
    """One month of one modality on one tile, built from its scenes in order (best first)."""

    def __init__(self, method: str, shape: tuple[int, int, int]):
        if method not in METHODS:
            raise ValueError(f"composite: {' or '.join(METHODS)}, got {method!r}")
        self.method, self.shape = method, shape
        self.scenes = 0  # scenes added
        self._out = np.full(shape, np.nan, dtype=np.float32) if method == "first" else None
        self._stack: list[np.ndarray] = []

    def add(self, pixels: np.ndarray, clear: np.ndarray | None) -> None:
        """pixels (h, w, c) float32, NaN = nodata; clear (h, w) bool or None (no mask: every pixel counts)."""
        self.scenes += 1
        vals = pixels if clear is None else np.where(clear[..., None], pixels, np.float32(np.nan))
        if self.method == "first":  # where the composite has no value yet, this scene's (NaN or not)
            np.copyto(self._out, vals, where=np.isnan(self._out))
        else:
            self._stack.append(vals.astype(np.float32, copy=False))

    @property
    def full(self) -> bool:
        """Every pixel and band has a value: later (cloudier) scenes cannot change a "first" composite."""
        return self.method == "first" and not np.isnan(self._out).any()

    def result(self) -> np.ndarray:
        if self.method == "first":
            return self._out
        if not self._stack:
            return np.full(self.shape, np.nan, dtype=np.float32)
        stack = np.stack(self._stack)
        out = np.full(self.shape, np.nan, dtype=np.float32)
        seen = ~np.isnan(stack).all(0)
        out[seen] = np.nanmedian(stack[:, seen], axis=0)  # only where some scene is clear: no empty-slice warning
        return out
