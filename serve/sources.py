"""Where the pixels of an area come from: `read(tile) -> {modality: (size, size, T, C)}` raw units, NaN missing,
on the area's 10 m grid, with one `months` (T,) shared by the whole area.

    GeoTiffSource   a set of GeoTIFFs per modality (T*C bands each, time-major), in any CRS: each tile is
                    warped (nearest neighbour) onto the area grid; where files overlap the first one wins
    CorpusSource    a raw corpus in the OlmoEarth layout (`pipelines.raw_layout`): the 2560 m UTM cells that
                    meet the tile are read and pasted; the time range picks the timesteps by month
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict

import numpy as np

from olmoearth.modalities import MISSING_VALUE, MODALITIES
from pipelines.storage import Storage
from serve.tiling import Grid, Tile


def months_in_range(start: str, end: str) -> list[int]:
    """Month indices (0..11, January = 0) of the calendar months that [start, end] touches, in time order."""
    a, b = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    if b < a:
        raise ValueError(f"time range ends ({end}) before it starts ({start})")
    n = (b.year - a.year) * 12 + b.month - a.month + 1
    if n > 12:
        raise ValueError(f"time range {start}..{end} spans {n} months; the model takes at most 12 (one year)")
    return [(a.month - 1 + i) % 12 for i in range(n)]


def gdal_env(storage: Storage) -> dict:
    """GDAL settings under which rasterio opens s3:// URIs on `storage`'s endpoint (any S3 server)."""
    ep = storage.endpoint
    if not ep:
        return {}
    scheme, _, host = ep.partition("://")
    return {"AWS_S3_ENDPOINT": host, "AWS_HTTPS": "YES" if scheme == "https" else "NO", "AWS_VIRTUAL_HOSTING": "FALSE"}


class GeoTiffSource:
    def __init__(self, files: dict[str, list[str]], months: list[int] | None, storage: Storage):
        import rasterio

        if not files:
            raise ValueError("geotiffs: give at least one modality with a list of GeoTIFF URIs")
        self.files, self.storage = {m: list(v) for m, v in files.items()}, storage
        self.t = None
        with rasterio.Env(**gdal_env(storage)):
            for m, uris in self.files.items():
                if m not in MODALITIES or not MODALITIES[m].encoder_input:
                    raise ValueError(f"geotiffs: {m!r} is not an encoder modality")
                if not uris:
                    raise ValueError(f"geotiffs.{m}: empty list of files")
                c = MODALITIES[m].num_bands
                for uri in uris:
                    try:
                        with rasterio.open(uri) as ds:
                            n, crs = ds.count, ds.crs
                    except Exception as e:
                        raise ValueError(f"geotiffs.{m}: cannot open {uri}: {e}") from None
                    if crs is None:
                        raise ValueError(f"geotiffs.{m}: {uri} has no CRS")
                    if n % c:
                        raise ValueError(f"geotiffs.{m}: {uri} has {n} bands, not a multiple of {c} ({MODALITIES[m].bands})")
                    if self.t is not None and n // c != self.t:
                        raise ValueError(f"geotiffs.{m}: {uri} has {n // c} timesteps, others {self.t}")
                    self.t = n // c
        self.months = np.asarray(months if months else [i % 12 for i in range(self.t)], dtype=np.int64)
        if len(self.months) != self.t:
            raise ValueError(f"months: {len(self.months)} given but the GeoTIFFs hold {self.t} timesteps")

    @property
    def modalities(self) -> list[str]:
        return list(self.files)

    def read(self, tile: Tile, grid: Grid) -> dict[str, np.ndarray]:
        import rasterio
        from affine import Affine
        from rasterio.warp import Resampling, reproject, transform_bounds

        r = grid.resolution
        left, bottom, right, top = tile.bounds(grid)
        dst_t = Affine(r, 0, left, 0, -r, top)
        out = {}
        with rasterio.Env(**gdal_env(self.storage)):
            for m, uris in self.files.items():
                c = MODALITIES[m].num_bands
                dst = np.full((self.t * c, tile.size, tile.size), np.nan, dtype=np.float32)
                for uri in uris:
                    with rasterio.open(uri) as ds:
                        win = source_window(ds, transform_bounds(grid.crs, ds.crs, left, bottom, right, top,
                                                                 densify_pts=21))  # fmt: skip
                        if win is None:
                            continue
                        src = ds.read(window=win, boundless=False).astype(np.float32)
                        if ds.nodata is not None:
                            src[src == ds.nodata] = np.nan
                        src[src == MISSING_VALUE] = np.nan
                        part = np.full_like(dst, np.nan)
                        reproject(src, part, src_transform=ds.window_transform(win), src_crs=ds.crs,
                                  dst_transform=dst_t, dst_crs=grid.crs, resampling=Resampling.nearest,
                                  src_nodata=np.nan, dst_nodata=np.nan)  # fmt: skip
                    fill = np.isnan(dst) & ~np.isnan(part)
                    dst[fill] = part[fill]
                out[m] = np.moveaxis(dst, 0, -1).reshape(tile.size, tile.size, self.t, c)
        return out


def source_window(ds, bounds):
    """The pixel window of open dataset `ds` covering `bounds` (its CRS), one pixel of margin; None if outside."""
    from rasterio.windows import Window

    inv = ~ds.transform
    xs, ys = zip(*[inv * (x, y) for x in (bounds[0], bounds[2]) for y in (bounds[1], bounds[3])], strict=True)
    c0, c1 = max(0, int(np.floor(min(xs))) - 1), min(ds.width, int(np.ceil(max(xs))) + 1)
    r0, r1 = max(0, int(np.floor(min(ys))) - 1), min(ds.height, int(np.ceil(max(ys))) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


class CorpusSource:
    """The raw corpus layout (`pipelines.raw_layout`, read by `pipelines.raster.read_sample`): UTM cells of
    256 x 256 px (2560 m), each with its own run of 30-day periods. The area's timeline is the 30-day periods
    from time_start to time_end (<= 12); a cell's timestep lands in the period holding its middle day (the
    first one wins if two land in one period), periods a cell lacks stay NaN (MISSING tokens)."""

    def __init__(self, root: str, modalities: list[str], storage: Storage, time_start: str, time_end: str,
                 cache_cells: int = 16):  # fmt: skip
        from pipelines import raw_layout as rl

        if not (time_start and time_end):
            raise ValueError("time_start and time_end are required with a raw corpus source (<= 12 x 30 days)")
        self.root, self.storage, self.mods = root, storage, list(modalities)
        for m in self.mods:
            if m not in MODALITIES or not MODALITIES[m].encoder_input:
                raise ValueError(f"modalities: {m!r} is not an encoder modality")
        self.start, self.end = dt.date.fromisoformat(time_start), dt.date.fromisoformat(time_end)
        n = (self.end - self.start).days // rl.PERIOD_DAYS + 1
        if self.end < self.start or n > 12:
            raise ValueError(f"time range {time_start}..{time_end}: must be 1..12 periods of {rl.PERIOD_DAYS} days")
        self.months = np.asarray([(self.start + dt.timedelta(days=k * rl.PERIOD_DAYS + rl.PERIOD_DAYS // 2)).month - 1
                                  for k in range(n)], dtype=np.int64)  # fmt: skip
        self.cells = {}  # sample id -> (crs, left, top)
        for sid, files in rl.list_samples(root, storage).items():
            if any(m in files for m in self.mods):
                epsg, col, row = rl.parse_sample_id(sid)
                left, _, _, top = rl.cell_bounds(col, row)
                self.cells[sid] = (f"EPSG:{epsg}", left, top)
        if not self.cells:
            raise ValueError(f"source {root}: no sample of {self.mods} found in the raw corpus layout")
        self._periods = None
        self._cache: OrderedDict = OrderedDict()
        self._cache_cells = cache_cells

    def crs_of_cells(self) -> set[str]:
        return {v[0] for v in self.cells.values()}

    def _read_cell(self, sid: str) -> dict[str, np.ndarray]:
        """{modality: (256, 256, K, C)} on the area's timeline."""
        from pipelines import raw_layout as rl
        from pipelines.raster import read_sample

        if sid in self._cache:
            self._cache.move_to_end(sid)
            return self._cache[sid]
        if self._periods is None:
            self._periods = rl.read_timesteps(self.root, self.storage, self.mods)
        x, months, _meta = read_sample(self.root, sid, self.storage, modalities=self.mods)
        starts = [p[1] for m in self.mods for p in self._periods.get(m, {}).get(sid, [])]
        t0 = min(starts) if starts else None
        out = {}
        for m in self.mods:
            a = x.get(m)
            if a is None or t0 is None:
                continue
            cube = np.full((a.shape[0], a.shape[1], len(self.months), a.shape[3]), np.nan, np.float32)
            for t in range(a.shape[2]):
                mid = t0 + dt.timedelta(days=t * rl.PERIOD_DAYS + rl.PERIOD_DAYS // 2)
                k = (mid - self.start).days // rl.PERIOD_DAYS
                if self.start <= mid <= self.end and 0 <= k < len(self.months) and np.isnan(cube[:, :, k]).all():
                    cube[:, :, k] = a[:, :, t]
            out[m] = cube
        self._cache[sid] = out
        if len(self._cache) > self._cache_cells:
            self._cache.popitem(last=False)
        return out

    def read(self, tile: Tile, grid: Grid) -> dict[str, np.ndarray]:
        from pipelines.raw_layout import TILE_SIZE

        r = grid.resolution
        left, bottom, right, top = tile.bounds(grid)
        out = {m: np.full((tile.size, tile.size, len(self.months), MODALITIES[m].num_bands), np.nan, np.float32)
               for m in self.mods}  # fmt: skip
        span = TILE_SIZE * r
        for sid, (crs, cl, ct) in self.cells.items():
            if crs != grid.crs or cl >= right or cl + span <= left or ct <= bottom or ct - span >= top:
                continue
            data = self._read_cell(sid)
            x0, x1 = max(left, cl), min(right, cl + span)
            y0, y1 = min(top, ct), max(bottom, ct - span)
            tx, ty = int(round((x0 - left) / r)), int(round((top - y0) / r))
            cx, cy = int(round((x0 - cl) / r)), int(round((ct - y0) / r))
            w, h = int(round((x1 - x0) / r)), int(round((y0 - y1) / r))
            for m, a in data.items():
                out[m][ty : ty + h, tx : tx + w] = a[cy : cy + h, cx : cx + w]
        return out
