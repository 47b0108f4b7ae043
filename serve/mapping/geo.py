"""Embedding rasters on the serving side: their GeoTIFF profile and bytes, the COG copy, int8 quantisation.
(The UTM grid of an area of interest is `pipelines.imagery.grid`.)"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# GeoTIFF / COG


def embedding_profile(crs_wkt: str, transform, width: int, height: int, count: int, dtype: str,
                      nodata=None) -> dict:  # fmt: skip
    from affine import Affine
    from rasterio.crs import CRS

    t = transform if isinstance(transform, Affine) else Affine(*transform[:6])
    prof = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype,
                crs=CRS.from_wkt(crs_wkt), transform=t)  # fmt: skip
    if nodata is not None:
        prof["nodata"] = nodata
    return prof


def write_geotiff_bytes(emb: np.ndarray, crs_wkt: str, transform, tags: dict | None = None) -> bytes:
    """emb (h, w, D) float32 -> a GeoTIFF (one band per embedding dimension, deflate, pixel-interleaved),
    tiled in blocks of up to 256 px when both sides are multiples of 16, returned as bytes."""
    from affine import Affine
    from rasterio.crs import CRS

    from pipelines.imagery.geotiff import geotiff_bytes

    h, w, _ = emb.shape
    block = None
    if w >= 16 and h >= 16 and w % 16 == 0 and h % 16 == 0:
        block = (16 * max(1, min(16, w // 16)), 16 * max(1, min(16, h // 16)))
    t = transform if isinstance(transform, Affine) else Affine(*transform[:6])
    return geotiff_bytes(np.moveaxis(emb.astype(np.float32), -1, 0), CRS.from_wkt(crs_wkt), t, compress="deflate",
                         block=block, tags=tags, interleave=None)  # fmt: skip


def to_cog(src_path: str, dst_path: str) -> None:
    """Copy a (tiled) GeoTIFF into a Cloud-Optimized GeoTIFF with overviews (GDAL's COG driver)."""
    from rasterio.shutil import copy as rio_copy

    # deflate (every GDAL reads it) at level 1 on all cores: float32 embeddings barely compress at any level
    # (mantissa noise), and this copy is the last step of an area job, which a higher level only lengthens
    rio_copy(src_path, dst_path, driver="COG", compress="deflate", level=1, num_threads="ALL_CPUS",
             overviews="auto", blocksize=256, copy_src_overviews=False)  # fmt: skip


def quantise_int8(emb: np.ndarray, scale: float) -> np.ndarray:
    """float embeddings -> int8 with value = q * scale (-127..127; -128 is nodata)."""
    q = np.clip(np.round(emb / scale), -127, 127)
    q = np.where(np.isfinite(emb), q, -128)
    return q.astype(np.int8)


def dequantise_int8(q: np.ndarray, scale: float) -> np.ndarray:
    out = q.astype(np.float32) * np.float32(scale)
    out[q == -128] = np.nan
    return out
