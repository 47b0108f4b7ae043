"""GeoTIFF in and out: the project's one reader and one writer.

    arr, prof = read_geotiff("s3://raw/10_srtm/EPSG:32618_12_-170_10.tif")   # (bands, H, W), profile
    arr, prof = read_geotiff(data, name="upload.tif")                        # from bytes
    data = geotiff_bytes(arr, 32618, transform, nodata=0)                    # (bands, H, W) -> bytes

Reading goes through rasterio; a URI is local or s3:// (through Storage), and a `window` reads only that part
(from S3 a ranged read: only the needed blocks travel). Only GeoTIFF (and COG, which is GeoTIFF) is read:
the first bytes must be TIFF's or BigTIFF's, GDAL may use its GTiff driver alone, and it looks for no sidecar
file; so a VRT (or any format that names other files or URLs) is refused, never followed. A `check` sees the
header (size, band count, dtype) before any pixel is decoded. Every failure raises `GeoTiffError` naming the file,
`GeoTiffVanished` when the file is not there at all: callers turn these into their own errors (the corpus
build into rejects, the endpoint into a 400).

Writing encodes in memory: tiled (square `block` px tiles when the raster is at least one block on each side),
band-interleaved, zstd level 1 by default: the encoding of the raw corpus files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

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


# GDAL opens whatever it recognises; these files come from buckets and uploads, so only GeoTIFF (COG is
# GeoTIFF) is opened, after its magic bytes, with no sidecar (.aux.xml, .ovr, .msk, world file) probing: a
# VRT or any other format that can name other files or URLs never reaches a driver.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF and BigTIFF, both byte orders
DRIVER = "GTiff"  # the one GDAL driver the reader may use
SAFE_ENV = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_PAM_ENABLED": "NO",
            "GDAL_GEOREF_SOURCES": "INTERNAL"}  # fmt: skip


class _Refused(Exception):  # noqa: N818 - carries a caller's check failure past the reader's own handling
    def __init__(self, error: BaseException):
        self.error = error


def read_geotiff(uri_or_bytes, storage: Storage | None = None, window=None, name: str | None = None,
                 check: Callable[[dict], None] | None = None) -> tuple[np.ndarray, dict]:  # fmt: skip
    """A GeoTIFF from a URI (s3:// or local) or from bytes -> (array (bands, H, W), profile).

    `window`: a rasterio Window to read only that part. `name`: the file name errors give (default: the
    URI, or "<bytes>"). `check(profile)`: called after the header is read and before any pixel is
    decoded (width, height, count, dtype are known): whatever it raises propagates unchanged, so a caller
    can refuse a declared size. Only TIFF/BigTIFF files are opened, with the GTiff driver alone. Raises
    GeoTiffVanished if the file does not exist, GeoTiffError if it is not a GeoTIFF or cannot be decoded."""
    is_bytes = isinstance(uri_or_bytes, (bytes, bytearray, memoryview))
    if name is None:
        name = "<bytes>" if is_bytes else str(uri_or_bytes)
    try:
        with rasterio.Env(**SAFE_ENV):
            if is_bytes:
                data = bytes(uri_or_bytes)
                _check_magic(data[:4], name)
                with MemoryFile(data, ext=".tif") as mf, mf.open(driver=DRIVER) as ds:
                    return _read(ds, window, check, name)
            uri = str(uri_or_bytes)
            if uri.startswith("/vsi"):
                raise GeoTiffError(name, "GDAL virtual paths (/vsi...) are not opened; give a local path or s3://")
            if is_s3(uri):
                with (storage or Storage()).fs(uri).open(uri, "rb") as fh:
                    _check_magic(fh.read(4), name)
                    fh.seek(0)
                    with rasterio.open(fh, driver=DRIVER) as ds:
                        return _read(ds, window, check, name)
            if not os.path.exists(uri):  # rasterio reports a missing file as any other open failure
                raise FileNotFoundError(f"no such file: {uri}")
            with open(uri, "rb") as fh:
                _check_magic(fh.read(4), name)
            with rasterio.open(uri, driver=DRIVER) as ds:
                return _read(ds, window, check, name)
    except _Refused as r:
        raise r.error from None
    except GeoTiffError:
        raise
    except FileNotFoundError as e:
        raise GeoTiffVanished(name, str(e)) from None
    except (RasterioError, OSError, ValueError) as e:
        # GDAL's text names the in-memory path; the caller's name is what a reader of the error knows
        raise GeoTiffError(name, "cannot read GeoTIFF: " + re.sub(r"/vsimem/\S+", name, str(e))) from None


def _check_magic(head: bytes, name: str) -> None:
    if head not in TIFF_MAGIC:
        raise GeoTiffError(name, "not a TIFF file (only GeoTIFF / COG is read)")


def _read(ds, window, check, name: str) -> tuple[np.ndarray, dict]:
    prof = profile(ds)
    if ds.driver != DRIVER:  # the open allows nothing else; kept as the one place that says so
        raise GeoTiffError(name, f"opened as {ds.driver}, only GeoTIFF is read")
    if check is not None:
        try:
            check(prof)
        except Exception as e:
            raise _Refused(e) from None
    return ds.read(window=window), prof


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
