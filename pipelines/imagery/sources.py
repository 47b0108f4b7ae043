"""Where the pixels of an area come from: `read(tile) -> {modality: (size, size, T, C)}` raw units, NaN missing,
on the area's 10 m grid, with one `months` (T,) shared by the whole area.

    GeoTiffSource   a set of GeoTIFFs per modality (T*C bands each, time-major), in any CRS: each tile is
                    warped (nearest neighbour) onto the area grid; where files overlap the first one wins
    CorpusSource    a raw corpus in the OlmoEarth layout (`pipelines.corpus.raw_layout`): the 2560 m UTM cells that
                    meet the tile; the time range picks the timesteps by 30-day period

Both are built twice: once on the driver, which finds and checks the files (`spec()` is what it found), and once
per worker from that spec (`from_spec`), so workers neither list the corpus nor re-open every file. Workers keep
their GDAL file handles open (`Handles`) and read only the window of a tile and, from the corpus, only the bands of
the timesteps in range: ranged reads of the blocks needed, with GDAL's block cache shared by neighbouring tiles.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict

import numpy as np

from olmoearth.modalities import BASE_GSD, MISSING_VALUE, MODALITIES
from pipelines.common.storage import Storage
from pipelines.imagery.grid import Grid, Tile


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
    file and worker instead of one per tile."""

    def __init__(self, storage: Storage, size: int = 64):
        self.env, self.size = gdal_env(storage), size
        self._open: OrderedDict = OrderedDict()

    def get(self, uri: str):
        import rasterio

        ds = self._open.get(uri)
        if ds is None:
            with rasterio.Env(**self.env):
                ds = rasterio.open(uri)
            self._open[uri] = ds
            while len(self._open) > self.size:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(uri)
        return ds

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
        self.info = _checked["info"] if _checked else self._check()  # uri -> (crs wkt, bounds in its crs)
        self.t = _checked["t"] if _checked else self._t
        self.months = np.asarray(months if months else [i % 12 for i in range(self.t)], dtype=np.int64)
        if len(self.months) != self.t:
            raise ValueError(f"months: {len(self.months)} given but the GeoTIFFs hold {self.t} timesteps")

    def _check(self) -> dict:
        import rasterio

        info, self._t = {}, None
        with rasterio.Env(**gdal_env(self.storage)):
            for m, uris in self.files.items():
                if m not in MODALITIES or not MODALITIES[m].encoder_input:
                    raise ValueError(f"geotiffs: {m!r} is not an encoder modality")
                if not uris:
                    raise ValueError(f"geotiffs.{m}: empty list of files")
                c = MODALITIES[m].num_bands
                for uri in uris:
                    try:
                        with rasterio.open(uri) as ds:
                            n, crs, bounds = ds.count, ds.crs, tuple(ds.bounds)
                    except Exception as e:
                        raise ValueError(f"geotiffs.{m}: cannot open {uri}: {e}") from None
                    if crs is None:
                        raise ValueError(f"geotiffs.{m}: {uri} has no CRS")
                    if n % c:
                        raise ValueError(f"geotiffs.{m}: {uri} has {n} bands, not a multiple of {c} ({MODALITIES[m].bands})")
                    if self._t is not None and n // c != self._t:
                        raise ValueError(f"geotiffs.{m}: {uri} has {n // c} timesteps, others {self._t}")
                    self._t = n // c
                    info[uri] = (crs.to_wkt(), bounds)
        return info

    def spec(self) -> dict:
        return {"kind": "geotiffs", "files": self.files, "months": self.months.tolist(),
                "checked": {"info": self.info, "t": self.t}}  # fmt: skip

    @property
    def modalities(self) -> list[str]:
        return list(self.files)

    def read(self, tile: Tile, grid: Grid) -> dict[str, np.ndarray]:
        from affine import Affine
        from rasterio.warp import Resampling, reproject, transform_bounds

        r = grid.resolution
        left, bottom, right, top = tile.bounds(grid)
        dst_t = Affine(r, 0, left, 0, -r, top)
        out = {}
        with self.handles.env_ctx():
            for m, uris in self.files.items():
                c = MODALITIES[m].num_bands
                dst = np.full((self.t * c, tile.size, tile.size), np.nan, dtype=np.float32)
                for uri in uris:
                    crs_wkt, fb = self.info[uri]
                    want = transform_bounds(grid.crs, crs_wkt, left, bottom, right, top, densify_pts=21)
                    if want[0] >= fb[2] or want[2] <= fb[0] or want[1] >= fb[3] or want[3] <= fb[1]:
                        continue  # this file does not reach the tile: not even opened
                    ds = self.handles.get(uri)
                    win = source_window(ds, want)
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
    """The raw corpus layout (`pipelines.corpus.raw_layout`): UTM cells of 256 x 256 px (2560 m), each with its own run
    of 30-day periods. The area's timeline is the 30-day periods from time_start to time_end (<= 12); a cell's
    image lands in the period holding the middle day of its slot on the cell's timeline (as `read_sample` puts
    it: slots of 30 days from the cell's first image; the first image wins if two land in one period), periods a
    cell lacks stay NaN (MISSING tokens).

    On the driver (`grid` given) it lists only the folders of `modalities`, keeps the cells of the grid's CRS that
    meet the area and their rows of the timestep CSVs, and works out which bands of each file hold a timestep in
    range. A tile then reads, per cell it meets and bandset file, only those bands inside its window."""

    def __init__(self, root: str, modalities: list[str], storage: Storage, time_start: str, time_end: str,
                 grid: Grid | None = None, _plan: dict | None = None):  # fmt: skip
        """`grid`: find the area's cells (driver); `_plan`: what the driver found (`spec()["plan"]`, workers).
        Without time_start / time_end: the 12 periods holding the most images of the area (`_default_time`)."""
        self.root, self.storage, self.mods = root, storage, list(modalities)
        for m in self.mods:
            if m not in MODALITIES or not MODALITIES[m].encoder_input:
                raise ValueError(f"modalities: {m!r} is not an encoder modality")
        if _plan is None:
            found, table = self._find(grid)
            if not (time_start and time_end):
                time_start, time_end = self._default_time(found, table, time_start, time_end)
        elif not (time_start and time_end):
            raise ValueError("time_start and time_end: required with a plan (the driver's spec() holds them)")
        self._set_time(time_start, time_end)
        # sid -> {"left", "top", "files": {modality: [[uri, resolution, n_images, [band (1-based)], [period]]]}}
        self.cells = _plan if _plan is not None else self._build(found, table)
        self.handles = Handles(storage)

    def _set_time(self, time_start: str, time_end: str) -> None:
        from pipelines.corpus import raw_layout as rl

        self.time = (time_start, time_end)
        self.start, self.end = dt.date.fromisoformat(time_start), dt.date.fromisoformat(time_end)
        n = (self.end - self.start).days // rl.PERIOD_DAYS + 1
        if self.end < self.start or n > 12:
            raise ValueError(f"time range {time_start}..{time_end}: must be 1..12 periods of {rl.PERIOD_DAYS} days")
        self.months = np.asarray([(self.start + dt.timedelta(days=k * rl.PERIOD_DAYS + rl.PERIOD_DAYS // 2)).month - 1
                                  for k in range(n)], dtype=np.int64)  # fmt: skip

    def spec(self) -> dict:
        return {"kind": "corpus", "root": self.root, "modalities": self.mods, "time": list(self.time),
                "plan": self.cells}  # fmt: skip

    def _default_time(self, found: dict, table: dict, time_start: str, time_end: str) -> tuple[str, str]:
        """12 periods of 30 days from time_start, up to time_end, or, with neither, the 12 periods starting on an
        image's start date that hold the most images of the area's cells (the earliest such window)."""
        from pipelines.corpus import raw_layout as rl

        span = dt.timedelta(days=12 * rl.PERIOD_DAYS - 1)
        if time_start:
            return time_start, (dt.date.fromisoformat(time_start) + span).isoformat()
        if time_end:
            return (dt.date.fromisoformat(time_end) - span).isoformat(), time_end
        starts = sorted(p[1] for sid, by_mod in found.items() for m in by_mod for p in table.get(m, {}).get(sid, []))
        if not starts:
            raise ValueError(f"source {self.root}: no timestep rows for the area's cells; give time_start / time_end")
        from bisect import bisect_left, bisect_right

        # images in [a, a + span] for each start a (sorted, so two binary searches); the earliest best wins
        best = max(starts, key=lambda a: (bisect_right(starts, a + span) - bisect_left(starts, a), -a.toordinal()))
        return best.isoformat(), (best + span).isoformat()

    def _find(self, grid: Grid) -> tuple[dict, dict]:
        """({sid: {modality: {resolution: uri}}} of the cells meeting `grid`, the timestep table of modalities)."""
        from pipelines.corpus import raw_layout as rl

        if grid is None:
            raise ValueError("CorpusSource: give the area's grid (driver) or a plan (worker)")
        fs = self.storage.fs(self.root)
        prefix = "s3://" if self.root.startswith("s3://") else ""
        found: dict[str, dict[str, dict[float, str]]] = {}  # sid -> modality -> resolution -> uri
        crs_seen = set()
        left, top = grid.x0, grid.y0
        right, bottom = left + grid.width * grid.resolution, top - grid.height * grid.resolution
        for m in self.mods:
            try:
                names = fs.ls(rl.join(self.root, MODALITIES[m].raw_folder), detail=False)
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    epsg, col, row, res = rl.parse_sample_name(name)
                except ValueError:
                    continue  # not a corpus file (the corpus build reports those)
                crs_seen.add(f"EPSG:{epsg}")
                cl, cb, cr, ct = rl.cell_bounds(col, row)
                if f"EPSG:{epsg}" != grid.crs or cl >= right or cr <= left or ct <= bottom or cb >= top:
                    continue
                uri = prefix + name if prefix and not name.startswith(prefix) else name
                found.setdefault(rl.sample_id(epsg, col, row), {}).setdefault(m, {})[res] = uri
        if not found:
            if crs_seen and grid.crs not in crs_seen:
                raise ValueError(f"source {self.root}: corpus cells are in {sorted(crs_seen)}, the area grid in "
                                 f"{grid.crs}; set crs to the corpus's CRS")  # fmt: skip
            raise ValueError(f"source {self.root}: no sample of {self.mods} found in the raw corpus layout inside "
                             "the area")  # fmt: skip
        return found, rl.read_timesteps(self.root, self.storage, self.mods)

    def _build(self, found: dict, table: dict) -> dict:
        """Per cell: its corner and, per bandset file, which bands (timesteps in range) land in which period."""
        from pipelines.corpus import raw_layout as rl

        cells = {}
        for sid, by_mod in sorted(found.items()):
            _, col, row = rl.parse_sample_id(sid)
            cl, _, _, ct = rl.cell_bounds(col, row)
            periods = {m: table.get(m, {}).get(sid, []) for m in by_mod}
            starts = [p[1] for v in periods.values() for p in v]
            t0 = min(starts) if starts else None
            files = {}
            for m, by_res in by_mod.items():
                mod = MODALITIES[m]
                for bs in mod.bandsets:
                    if bs.resolution not in by_res:
                        raise ValueError(f"source {self.root}: sample {sid} lacks the {bs.resolution:g} m file of {m}")
                if not periods[m]:
                    raise ValueError(f"source {self.root}: sample {sid} has no rows in {mod.raw_folder}.csv")
                images = self._images_in_range(periods[m], t0)  # [(image_idx, period)]
                files[m] = [[by_res[bs.resolution], bs.resolution, len(periods[m]),
                             [i * bs.num_bands + b + 1 for i, _ in images for b in range(bs.num_bands)],
                             [k for _, k in images]] for bs in mod.bandsets]  # fmt: skip
            cells[sid] = {"left": cl, "top": ct, "files": files}
        return cells

    def _images_in_range(self, periods: list, t0: dt.date) -> list[tuple[int, int]]:
        """[(image_idx, period k of the area's timeline)] of the images whose slot's middle day is in range."""
        from pipelines.corpus import raw_layout as rl

        taken, out = set(), []
        for idx, start, _end in sorted(periods, key=lambda p: (round((p[1] - t0).days / rl.PERIOD_DAYS), p[0])):
            slot = round((start - t0).days / rl.PERIOD_DAYS)
            mid = t0 + dt.timedelta(days=slot * rl.PERIOD_DAYS + rl.PERIOD_DAYS // 2)
            k = (mid - self.start).days // rl.PERIOD_DAYS
            if self.start <= mid <= self.end and 0 <= k < len(self.months) and k not in taken:
                taken.add(k)
                out.append((idx, k))
        return out

    def read(self, tile: Tile, grid: Grid) -> dict[str, np.ndarray]:
        from pipelines.corpus.raw_layout import TILE_SIZE

        r = grid.resolution
        left, bottom, right, top = tile.bounds(grid)
        out = {m: np.full((tile.size, tile.size, len(self.months), MODALITIES[m].num_bands), np.nan, np.float32)
               for m in self.mods}  # fmt: skip
        span = TILE_SIZE * r
        with self.handles.env_ctx():
            for cell in self.cells.values():
                cl, ct = cell["left"], cell["top"]
                if cl >= right or cl + span <= left or ct <= bottom or ct - span >= top:
                    continue
                x0, x1 = max(left, cl), min(right, cl + span)
                y0, y1 = min(top, ct), max(bottom, ct - span)
                tx, ty = int(round((x0 - left) / r)), int(round((top - y0) / r))
                cx, cy = int(round((x0 - cl) / r)), int(round((ct - y0) / r))
                w, h = int(round((x1 - x0) / r)), int(round((y0 - y1) / r))
                for m, bandsets in cell["files"].items():
                    start = 0
                    for (uri, res, n_images, bands, ks), bs in zip(bandsets, MODALITIES[m].bandsets, strict=True):
                        sl = slice(start, start + bs.num_bands)
                        start += bs.num_bands
                        if not bands:
                            continue  # no image of this cell in the time range
                        vals = self._read_window(uri, m, res, n_images * bs.num_bands, bands, cx, cy, w, h)
                        vals = vals.reshape(len(ks), bs.num_bands, h, w).transpose(2, 3, 0, 1)  # (h, w, n, c)
                        out[m][ty : ty + h, tx : tx + w, ks, sl] = vals
        return out

    def _read_window(self, uri: str, modality: str, res: float, count: int, bands: list[int],
                     cx: int, cy: int, w: int, h: int) -> np.ndarray:  # fmt: skip
        """Bands `bands` (1-based) of the 10 m window (cx, cy, w, h) of one cell's file stored at `res` metres
        -> (len(bands), h, w) float32 in model units on the 10 m grid (coarser pixels repeated)."""
        from rasterio.windows import Window

        from pipelines.corpus.raster import to_model_units

        ds = self.handles.get(uri)
        f = int(round(res / BASE_GSD))
        n = int(round(2560 / res))
        if ds.count != count or (ds.width, ds.height) != (n, n):
            raise ValueError(f"{uri}: {ds.count} bands of {ds.width} x {ds.height} px, expected {count} of {n} x {n} "
                             "(the timestep CSV and the layout)")  # fmt: skip
        c0, r0 = cx // f, cy // f
        c1, r1 = -(-(cx + w) // f), -(-(cy + h) // f)
        arr = ds.read(indexes=bands, window=Window(c0, r0, c1 - c0, r1 - r0))
        vals = to_model_units(modality, arr)
        if f > 1:
            vals = np.repeat(np.repeat(vals, f, axis=-2), f, axis=-1)
            vals = vals[:, cy - r0 * f : cy - r0 * f + h, cx - c0 * f : cx - c0 * f + w]
        return vals
