"""Where the pixels of an area come from, behind one interface (`ImageSource`): for a tile of the area's 10 m
grid, `read(tile, grid) -> {modality: (size, size, T, C)}` float32 raw units, NaN missing, with one `months`
(T,) shared by the whole area. Consumers never know which source they hold.

    GeoTiffSource   a set of GeoTIFFs per modality (T*C bands each, time-major), in any CRS: each tile is
                    warped (nearest neighbour) onto the area grid; where files overlap the first one wins
    CorpusSource    a raw corpus in the OlmoEarth layout (`pipelines.corpus.source`, beside the layout it reads)

Each source is built twice: once on the driver, which finds and checks the files (`spec()` is what it found),
and once per worker from that spec (`from_spec`), so workers neither list folders nor re-open every file.
Workers keep their GDAL file handles open (`Handles`) and read only the window of a tile: ranged reads of the
blocks needed, with GDAL's block cache shared by neighbouring tiles.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Protocol

import numpy as np

from olmoearth.modalities import MISSING_VALUE, MODALITIES
from pipelines.common.storage import Storage
from pipelines.imagery.geotiff import DRIVER, SAFE_ENV
from pipelines.imagery.grid import Grid, Tile

READ_THREADS = 8  # files one worker reads at once (object storage latency, not CPU, bounds a tile's reads)


class ImageSource(Protocol):
    """What every pixel source offers the jobs that read it."""

    months: np.ndarray  # (T,) month (0 = January) of each timestep, the same for every tile

    @property
    def modalities(self) -> list[str]: ...

    def read(self, tile: Tile, grid: Grid) -> dict[str, np.ndarray]:
        """{modality: (tile.size, tile.size, T, C) float32}, NaN where there is no data."""
        ...

    def spec(self) -> dict:
        """What the driver found, small and picklable; `type(source).from_spec(spec, storage)` rebuilds it."""
        ...


def gdal_env(storage: Storage) -> dict:
    """GDAL settings under which rasterio opens s3:// URIs on `storage`'s endpoint (any S3 server), without
    listing the file's folder on open (a corpus folder holds one file per cell)."""
    env = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES"}
    ep = storage.endpoint
    if ep:
        scheme, _, host = ep.partition("://")
        env.update(AWS_S3_ENDPOINT=host, AWS_HTTPS="YES" if scheme == "https" else "NO", AWS_VIRTUAL_HOSTING="FALSE")
    return env


class Handles:
    """Open rasterio datasets by URI, least recently used closed beyond `size`: one open (header read) per
    file and worker instead of one per tile. Thread-safe; `map` reads several files at once in `threads`
    reader threads, so a tile's waits on object storage (one round trip per band file) overlap."""

    def __init__(self, storage: Storage, size: int = 64, threads: int = READ_THREADS):
        self.env, self.size, self.threads = {**SAFE_ENV, **gdal_env(storage)}, size, threads
        self._open: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._pool = None  # the reader threads, started on first use

    def get(self, uri: str):
        import rasterio

        with self._lock:
            ds = self._open.get(uri)
            if ds is not None:
                self._open.move_to_end(uri)
                return ds
        with rasterio.Env(**self.env):  # outside the lock: other threads open theirs meanwhile
            ds = rasterio.open(uri, driver=DRIVER)  # GeoTIFF/COG only, as every reader of ours
        with self._lock:
            if uri in self._open:  # another thread opened it first: keep one
                ds.close()
                ds = self._open[uri]
            self._open[uri] = ds
            self._open.move_to_end(uri)
            while len(self._open) > self.size:
                self._open.popitem(last=False)[1].close()
        return ds

    def drop(self, uri: str) -> None:
        """Close and forget the handle of `uri` (after a failed read: the next try opens it afresh)."""
        with self._lock:
            ds = self._open.pop(uri, None)
        if ds is not None:
            ds.close()

    def close(self) -> None:
        """Close every open file."""
        with self._lock:
            handles, self._open = list(self._open.values()), OrderedDict()
        for ds in handles:
            ds.close()

    def map(self, fn, items: list) -> list:
        """[fn(item) for item in items], run in the reader threads (each inside this GDAL environment); the
        first exception is raised."""
        if self.threads <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cog-read", initializer=self._enter_env)
        return list(self._pool.map(fn, items))

    def _enter_env(self) -> None:
        import rasterio

        rasterio.Env(**self.env).__enter__()  # GDAL's options are per thread: held for the thread's lifetime

    def env_ctx(self):
        import rasterio

        return rasterio.Env(**self.env)


class GeoTiffSource:
    def __init__(self, files: dict[str, list[str]], months: list[int] | None, storage: Storage,
                 _checked: dict | None = None):  # fmt: skip
        """files {modality: [GeoTIFF URI]}; checks every file (readable, CRS, band count) unless `_checked`
        (from `spec()`) says what an earlier check found."""
        if not files:
            raise ValueError("geotiffs: give at least one modality with a list of GeoTIFF URIs")
        self.files, self.storage = {m: list(v) for m, v in files.items()}, storage
        self.handles = Handles(storage)
        if _checked:
            self.info, self.t = _checked["info"], _checked["t"]  # uri -> (crs wkt, bounds in its crs); timesteps
        else:
            self.info, self.t = self._check()
        self.months = np.asarray(months if months else [i % 12 for i in range(self.t)], dtype=np.int64)
        if len(self.months) != self.t:
            raise ValueError(f"months: {len(self.months)} given but the GeoTIFFs hold {self.t} timesteps")

    @classmethod
    def from_spec(cls, spec: dict, storage: Storage) -> GeoTiffSource:
        return cls(spec["files"], spec["months"], storage, _checked=spec["checked"])

    def spec(self) -> dict:
        return {"kind": "geotiffs", "files": self.files, "months": self.months.tolist(),
                "checked": {"info": self.info, "t": self.t}}  # fmt: skip

    @property
    def modalities(self) -> list[str]:
        return list(self.files)

    def _check(self) -> tuple[dict, int]:
        """({uri: (crs wkt, bounds)}, timesteps) of every file, all of which must agree on the timesteps."""
        import rasterio

        info, t = {}, None
        with rasterio.Env(**gdal_env(self.storage)):
            for m, uris in self.files.items():
                if m not in MODALITIES or not MODALITIES[m].encoder_input:
                    raise ValueError(f"geotiffs: {m!r} is not an encoder modality")
                if not uris:
                    raise ValueError(f"geotiffs.{m}: empty list of files")
                for uri in uris:
                    n, info[uri] = _check_file(m, uri)
                    if t is not None and n != t:
                        raise ValueError(f"geotiffs.{m}: {uri} has {n} timesteps, others {t}")
                    t = n
        return info, t

    def read(self, tile: Tile, grid: Grid) -> dict[str, np.ndarray]:
        from affine import Affine

        r = grid.resolution
        bounds = tile.bounds(grid)
        dst_t = Affine(r, 0, bounds[0], 0, -r, bounds[3])
        out = {}
        with self.handles.env_ctx():
            for m, uris in self.files.items():
                c = MODALITIES[m].num_bands
                dst = np.full((self.t * c, tile.size, tile.size), np.nan, dtype=np.float32)
                for uri in uris:
                    part = self._warp(uri, bounds, grid.crs, dst_t, dst.shape)
                    if part is not None:
                        fill = np.isnan(dst) & ~np.isnan(part)
                        dst[fill] = part[fill]
                out[m] = np.moveaxis(dst, 0, -1).reshape(tile.size, tile.size, self.t, c)
        return out

    def _warp(self, uri: str, bounds: tuple, crs: str, dst_t, shape: tuple) -> np.ndarray | None:
        """The part of file `uri` inside `bounds` (of `crs`), warped onto the tile's pixels -> (bands, h, w),
        NaN where the file has no data; None when the file does not reach the tile (then it is not opened)."""
        from rasterio.warp import transform_bounds

        crs_wkt, fb = self.info[uri]
        want = transform_bounds(crs, crs_wkt, *bounds, densify_pts=21)
        if want[0] >= fb[2] or want[2] <= fb[0] or want[1] >= fb[3] or want[3] <= fb[1]:
            return None
        return warp_window(self.handles.get(uri), want, crs, dst_t, shape)


def warp_window(ds, src_bounds: tuple, crs: str, dst_t, shape: tuple, indexes: list[int] | None = None
                ) -> np.ndarray | None:  # fmt: skip
    """The window of open dataset `ds` covering `src_bounds` (in its CRS), warped (nearest neighbour) onto the
    pixels `dst_t` of `crs` -> `shape` (bands, h, w) float32, NaN where it has no data (its nodata, the
    original's MISSING_VALUE, outside it); None when the window is empty. `indexes`: bands to read (all)."""
    from rasterio.warp import Resampling, reproject

    offset = aligned_offset(ds, crs, dst_t)
    if offset is not None:  # same CRS and pixel grid: nearest neighbour is a plain copy of the window
        return _copy_window(ds, offset, shape, indexes)
    if not _overlaps(ds, src_bounds):  # a file that only touches the area (a neighbouring scene): no pixel of it
        return None
    win = source_window(ds, src_bounds)
    if win is None:
        return None
    src = ds.read(indexes=indexes, window=win, boundless=False).astype(np.float32)
    if ds.nodata is not None:
        src[src == ds.nodata] = np.nan
    src[src == MISSING_VALUE] = np.nan
    part = np.full(shape, np.nan, dtype=np.float32)
    reproject(src, part, src_transform=ds.window_transform(win), src_crs=ds.crs,
              dst_transform=dst_t, dst_crs=crs, resampling=Resampling.nearest,
              src_nodata=np.nan, dst_nodata=np.nan)  # fmt: skip
    return part


def aligned_offset(ds, crs: str, dst_t) -> tuple[int, int] | None:
    """(col, row) of the target's top-left pixel in open dataset `ds` when both share CRS, pixel size and
    pixel edges (no rotation); None otherwise."""
    t = ds.transform
    if t.b or t.d or dst_t.b or dst_t.d or abs(t.a - dst_t.a) > 1e-9 or abs(t.e - dst_t.e) > 1e-9:
        return None
    fx, fy = (dst_t.c - t.c) / t.a, (dst_t.f - t.f) / t.e
    if abs(fx - round(fx)) > 1e-6 or abs(fy - round(fy)) > 1e-6 or ds.crs != as_crs(crs):
        return None
    return int(round(fx)), int(round(fy))


def _overlaps(ds, bounds: tuple) -> bool:
    """Whether north-up dataset `ds` and `bounds` (its CRS) share some area; True for any other orientation
    (left to the window and the warp)."""
    t = ds.transform
    if t.b or t.d or t.a <= 0 or t.e >= 0:
        return True
    left, top = t.c, t.f
    right, bottom = left + t.a * ds.width, top + t.e * ds.height
    return left < bounds[2] and right > bounds[0] and bottom < bounds[3] and top > bounds[1]


def aligned_step(ds, crs: str, left: float, top: float, base: float) -> float | None:
    """The pixel size of open dataset `ds` when it is in `crs`, unrotated, square, an integer multiple of
    `base`, with a pixel corner at (left, top): then its window copied at that size and each pixel repeated
    onto `base` equals a nearest-neighbour warp onto `base`. None otherwise."""
    t = ds.transform
    if t.b or t.d or abs(t.a + t.e) > 1e-9 or ds.crs != as_crs(crs):
        return None
    k, fx, fy = t.a / base, (left - t.c) / t.a, (top - t.f) / t.e
    if k < 1 or abs(k - round(k)) > 1e-9 or abs(fx - round(fx)) > 1e-6 or abs(fy - round(fy)) > 1e-6:
        return None
    return float(t.a)


@functools.lru_cache(maxsize=64)
def as_crs(crs: str):
    from rasterio.crs import CRS

    return CRS.from_user_input(crs)


def _copy_window(ds, offset: tuple[int, int], shape: tuple, indexes) -> np.ndarray | None:
    """The target pixels (shape (bands, h, w)) that lie inside aligned dataset `ds`, read directly; NaN
    elsewhere and at its nodata / MISSING_VALUE; None when none lie inside."""
    from rasterio.windows import Window

    col, row = offset
    h, w = shape[1:]
    c0, r0, c1, r1 = max(col, 0), max(row, 0), min(col + w, ds.width), min(row + h, ds.height)
    if c0 >= c1 or r0 >= r1:
        return None
    src = ds.read(indexes=indexes, window=Window(c0, r0, c1 - c0, r1 - r0)).astype(np.float32)
    if ds.nodata is not None:
        src[src == ds.nodata] = np.nan
    src[src == MISSING_VALUE] = np.nan
    part = np.full(shape, np.nan, dtype=np.float32)
    part[:, r0 - row : r1 - row, c0 - col : c1 - col] = src
    return part


def _check_file(modality: str, uri: str) -> tuple[int, tuple]:
    """(timesteps, (crs wkt, bounds)) of one GeoTIFF of `modality`; a ValueError naming what is wrong."""
    import rasterio

    c = MODALITIES[modality].num_bands
    try:
        with rasterio.Env(**SAFE_ENV), rasterio.open(uri, driver=DRIVER) as ds:
            n, crs, bounds = ds.count, ds.crs, tuple(ds.bounds)
    except Exception as e:
        raise ValueError(f"geotiffs.{modality}: cannot open {uri}: {e}") from None
    if crs is None:
        raise ValueError(f"geotiffs.{modality}: {uri} has no CRS")
    if n % c:
        raise ValueError(f"geotiffs.{modality}: {uri} has {n} bands, not a multiple of {c} "
                         f"({MODALITIES[modality].bands})")  # fmt: skip
    return n // c, (crs.to_wkt(), bounds)


def source_window(ds, bounds):
    """The pixel window of open dataset `ds` covering `bounds` (its CRS), one pixel of margin; None if outside."""
    from rasterio.windows import Window

    inv = ~ds.transform
    xs, ys = zip(*[inv @ (x, y) for x in (bounds[0], bounds[2]) for y in (bounds[1], bounds[3])], strict=True)
    c0, c1 = max(0, int(np.floor(min(xs))) - 1), min(ds.width, int(np.ceil(max(xs))) + 1)
    r0, r1 = max(0, int(np.floor(min(ys))) - 1), min(ds.height, int(np.ceil(max(ys))) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)
