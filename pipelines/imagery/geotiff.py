"""GeoTIFF in and out: the project's one reader and one writer.

    arr, prof = read_geotiff("s3://raw/10_srtm/EPSG:32618_12_-170_10.tif")   # (bands, H, W), profile
    arr, prof = read_geotiff(data, name="upload.tif")                        # from bytes
    data = geotiff_bytes(arr, 32618, transform, nodata=0)                    # (bands, H, W) -> bytes

Reading goes through rasterio; a URI is local or s3:// (through Storage), and a `window` reads only that part
(from S3 a ranged read: only the needed blocks travel). Every failure raises `GeoTiffError` naming the file,
`GeoTiffVanished` when the file is not there at all: callers turn these into their own errors (the corpus
build into rejects, the endpoint into a 400).

Writing encodes in memory: tiled (square `block` px tiles when the raster is at least one block on each side),
band-interleaved, zstd level 1 by default: the encoding of the raw corpus files.
"""

from __future__ import annotations

import os

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile

from pipelines.common.storage import Storage, is_s3


class GeoTiffError(ValueError):
    """A file that is not a readable GeoTIFF (corrupt, truncated, not a TIFF)."""

    def __init__(self, file: str, detail: str):
        self.file, self.detail = file, detail
        super().__init__(f"{file}: {detail}")


class GeoTiffVanished(GeoTiffError):
    """The file is not there (deleted since it was listed, or never written)."""


def read_geotiff(uri_or_bytes, storage: Storage | None = None, window=None, name: str | None = None
                 ) -> tuple[np.ndarray, dict]:  # fmt: skip
    """A GeoTIFF from a URI (s3:// or local) or from bytes -> (array (bands, H, W), profile).

    `window`: a rasterio Window to read only that part. `name`: the file name errors give (default: the
    URI, or "<bytes>"). Raises GeoTiffVanished if the file does not exist, GeoTiffError if it cannot be
    opened or decoded."""
    is_bytes = isinstance(uri_or_bytes, (bytes, bytearray, memoryview))
    if name is None:
        name = "<bytes>" if is_bytes else str(uri_or_bytes)
    try:
        if is_bytes:
            with MemoryFile(bytes(uri_or_bytes)) as mf, mf.open() as ds:
                return ds.read(window=window), profile(ds)
        uri = str(uri_or_bytes)
        if is_s3(uri):
            with (storage or Storage()).fs(uri).open(uri, "rb") as fh, rasterio.open(fh) as ds:
                return ds.read(window=window), profile(ds)
        if not os.path.exists(uri):  # rasterio reports a missing file as any other open failure
            raise FileNotFoundError(f"no such file: {uri}")
        with rasterio.open(uri) as ds:
            return ds.read(window=window), profile(ds)
    except FileNotFoundError as e:
        raise GeoTiffVanished(name, str(e)) from None
    except (RasterioError, OSError, ValueError) as e:
        raise GeoTiffError(name, f"cannot read GeoTIFF: {e}") from None


def profile(ds) -> dict:
    """An open rasterio dataset's profile, with its band count, size and (first band's) dtype."""
    p = dict(ds.profile)
    p["count"], p["width"], p["height"] = ds.count, ds.width, ds.height
    p["dtype"] = ds.dtypes[0] if ds.count else None
    return p


def geotiff_bytes(arr: np.ndarray, crs, transform, nodata=None, compress: str | None = "zstd",
                  block: int | tuple[int, int] | None = 256, tags: dict | None = None,
                  interleave: str | None = "band") -> bytes:  # fmt: skip
    """Encode arr (bands, H, W) as a GeoTIFF in memory.

    crs: an EPSG code (int), or anything rasterio takes ("EPSG:32618", WKT, a CRS). compress: a GDAL
    compression name (zstd at level 1), None for none. block: tile side in px, or (width, height); the file
    is tiled only if it is at least one block on each side (else striped); None: striped. tags: metadata
    written as strings. interleave: "band", "pixel", or None for GDAL's default."""
    bands, h, w = arr.shape
    prof = dict(driver="GTiff", width=w, height=h, count=bands, dtype=str(arr.dtype),
                crs=f"EPSG:{crs}" if isinstance(crs, int) else crs, transform=transform, nodata=nodata)  # fmt: skip
    if compress:
        prof["compress"] = compress
    if compress == "zstd":
        prof["zstd_level"] = 1
    bx, by = (block, block) if isinstance(block, int) else (block or (0, 0))
    prof["tiled"] = block is not None and w >= bx and h >= by
    if prof["tiled"]:
        prof.update(blockxsize=bx, blockysize=by)
    if interleave:
        prof["interleave"] = interleave
    with MemoryFile() as mf:
        with mf.open(**prof) as ds:
            ds.write(arr)
            if tags:
                ds.update_tags(**{k: str(v) for k, v in tags.items()})
        return bytes(mf.read())
