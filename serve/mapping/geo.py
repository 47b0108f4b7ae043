"""Georeferencing helpers of the serving side: embedding rasters as GeoTIFF / COG bytes, int8 quantisation,
and the UTM grid of an area of interest."""

from __future__ import annotations

import math

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
    """emb (h, w, D) float32 -> a GeoTIFF (one band per embedding dimension), returned as bytes."""
    from rasterio.io import MemoryFile

    h, w, d = emb.shape
    prof = embedding_profile(crs_wkt, transform, w, h, d, "float32")
    prof.update(compress="deflate", tiled=w >= 16 and h >= 16 and w % 16 == 0 and h % 16 == 0)
    if prof["tiled"]:
        prof.update(blockxsize=16 * max(1, min(16, w // 16)), blockysize=16 * max(1, min(16, h // 16)))
    with MemoryFile() as mem:
        with mem.open(**prof) as ds:
            ds.write(np.moveaxis(emb.astype(np.float32), -1, 0))
            if tags:
                ds.update_tags(**{k: str(v) for k, v in tags.items()})
        return mem.read()


def to_cog(src_path: str, dst_path: str) -> None:
    """Copy a (tiled) GeoTIFF into a Cloud-Optimized GeoTIFF with overviews (GDAL's COG driver)."""
    from rasterio.shutil import copy as rio_copy

    # deflate (every GDAL reads it) at level 1 on all cores: float32 embeddings barely compress at any level
    # (mantissa noise), and this copy is the last step of an area job (level 6 on one core: ~2x the time)
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


# ----------------------------------------------------------------------------------------------------------
# Area of interest -> UTM grid


def utm_epsg(lon: float, lat: float) -> int:
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def bbox_to_crs(bbox: tuple[float, float, float, float], src_crs: str, dst_crs: str) -> tuple:
    """(minx, miny, maxx, maxy) in src_crs -> the bounding box in dst_crs (densified edges)."""
    from rasterio.warp import transform_bounds

    return tuple(transform_bounds(src_crs, dst_crs, *bbox, densify_pts=21))


def area_grid(bbox, bbox_crs: str, crs: str | None, resolution: float, snap: float) -> tuple[str, tuple, int, int]:
    """The output pixel grid covering bbox: (crs, (x0, y0) top-left, width px, height px) at `resolution`
    metres, corners snapped outward to multiples of `snap` metres. crs None: the UTM zone of the bbox centre."""
    if crs is None:
        if bbox_crs.upper() not in ("EPSG:4326", "OGC:CRS84"):
            lon_lat = bbox_to_crs(bbox, bbox_crs, "EPSG:4326")
        else:
            lon_lat = bbox
        crs = f"EPSG:{utm_epsg((lon_lat[0] + lon_lat[2]) / 2, (lon_lat[1] + lon_lat[3]) / 2)}"
    minx, miny, maxx, maxy = bbox if bbox_crs == crs else bbox_to_crs(bbox, bbox_crs, crs)
    x0, y1 = math.floor(minx / snap) * snap, math.ceil(maxy / snap) * snap
    x1, y0 = math.ceil(maxx / snap) * snap, math.floor(miny / snap) * snap
    return crs, (x0, y1), int(round((x1 - x0) / resolution)), int(round((y1 - y0) / resolution))

