"""The raw corpus as an image source (`pipelines.imagery.sources.ImageSource`): the pixels of a tile of an area's
10 m UTM grid, read from the corpus layout (`pipelines.corpus.raw_layout`) of the same CRS.

The corpus is UTM cells of 256 x 256 px (2560 m), each with its own run of 30-day periods. The area's timeline
is the 30-day periods from time_start to time_end (<= 12); a cell's image lands in the period holding the middle
day of its slot on the cell's timeline (as `read_sample` puts it: slots of 30 days from the cell's first image;
the first image wins if two land in one period); periods a cell lacks stay NaN (MISSING tokens).

On the driver (`grid` given) it lists only the folders of `modalities`, keeps the cells of the grid's CRS that
meet the area and their rows of the timestep CSVs, and works out which bands of each file hold a timestep in
range (the plan). A worker gets that plan (`from_spec`) and a tile then reads, per cell it meets and bandset
file, only those bands inside its window.
"""

from __future__ import annotations

import datetime as dt
from bisect import bisect_left, bisect_right

import numpy as np

from olmoearth.modalities import BASE_GSD, MODALITIES, TILE_METRES, TILE_SIZE
from pipelines.common.storage import Storage
from pipelines.corpus import raw_layout as rl
from pipelines.imagery.grid import Grid, Tile
from pipelines.imagery.sources import Handles
from pipelines.imagery.units import repeat_pixels, to_model_units

MAX_PERIODS = 12  # the model's timesteps


class CorpusSource:
    def __init__(self, root: str, modalities: list[str], storage: Storage, time_start: str, time_end: str,
                 grid: Grid | None = None, _plan: dict | None = None):  # fmt: skip
        """`grid`: find the area's cells (driver); `_plan`: what the driver found (`spec()["plan"]`, workers).
        Without time_start / time_end: the 12 periods holding the most images of the area (`default_time`)."""
        self.root, self.storage, self.mods = root, storage, list(modalities)
        for m in self.mods:
            if m not in MODALITIES or not MODALITIES[m].encoder_input:
                raise ValueError(f"modalities: {m!r} is not an encoder modality")
        if _plan is None:
            found, table = self._find(grid)
            if not (time_start and time_end):
                time_start, time_end = default_time(self.root, found, table, time_start, time_end)
        elif not (time_start and time_end):
            raise ValueError("time_start and time_end: required with a plan (the driver's spec() holds them)")
        self.time = (time_start, time_end)
        self.start, self.end, self.months = period_timeline(time_start, time_end)
        # sid -> {"left", "top", "files": {modality: [[uri, resolution, n_images, [band (1-based)], [period]]]}}
        self.cells = _plan if _plan is not None else self._build(found, table)
        self.handles = Handles(storage)

    @classmethod
    def from_spec(cls, spec: dict, storage: Storage) -> CorpusSource:
        # the driver's time range: it may have filled in a default
        return cls(spec["root"], spec["modalities"], storage, *spec["time"], _plan=spec["plan"])

    def spec(self) -> dict:
        return {"kind": "corpus", "root": self.root, "modalities": self.mods, "time": list(self.time),
                "plan": self.cells}  # fmt: skip

    @property
    def modalities(self) -> list[str]:
        return list(self.mods)

    # ---- the driver: which cells, which bands ------------------------------------------------------------

    def _find(self, grid: Grid | None) -> tuple[dict, dict]:
        """({sid: {modality: {resolution: uri}}} of the cells meeting `grid`, the timestep table of modalities)."""
        if grid is None:
            raise ValueError("CorpusSource: give the area's grid (driver) or a plan (worker)")
        found, crs_seen = {}, set()
        for m in self.mods:
            for epsg, col, row, res, uri in self._list(m):
                crs_seen.add(f"EPSG:{epsg}")
                if f"EPSG:{epsg}" == grid.crs and _meets(rl.cell_bounds(col, row), grid):
                    found.setdefault(rl.sample_id(epsg, col, row), {}).setdefault(m, {})[res] = uri
        if not found:
            if crs_seen and grid.crs not in crs_seen:
                raise ValueError(f"source {self.root}: corpus cells are in {sorted(crs_seen)}, the area grid in "
                                 f"{grid.crs}; set crs to the corpus's CRS")  # fmt: skip
            raise ValueError(f"source {self.root}: no sample of {self.mods} found in the raw corpus layout inside "
                             "the area")  # fmt: skip
        return found, rl.read_timesteps(self.root, self.storage, self.mods)

    def _list(self, modality: str):
        """(epsg, col, row, resolution, uri) of every corpus file in the folder of `modality`."""
        fs = self.storage.fs(self.root)
        prefix = "s3://" if self.root.startswith("s3://") else ""
        try:
            names = fs.ls(rl.join(self.root, MODALITIES[modality].raw_folder), detail=False)
        except FileNotFoundError:
            return
        for name in names:
            try:
                epsg, col, row, res = rl.parse_sample_name(name)
            except ValueError:
                continue  # not a corpus file (the corpus build reports those)
            yield epsg, col, row, res, (prefix + name if prefix and not name.startswith(prefix) else name)

    def _build(self, found: dict, table: dict) -> dict:
        """Per cell: its corner and, per bandset file, which bands (timesteps in range) land in which period."""
        cells = {}
        for sid, by_mod in sorted(found.items()):
            _, col, row = rl.parse_sample_id(sid)
            cl, _, _, ct = rl.cell_bounds(col, row)
            periods = {m: table.get(m, {}).get(sid, []) for m in by_mod}
            starts = [p[1] for v in periods.values() for p in v]
            t0 = min(starts) if starts else None
            files = {m: self._cell_files(sid, m, by_res, periods[m], t0) for m, by_res in by_mod.items()}
            cells[sid] = {"left": cl, "top": ct, "files": files}
        return cells

    def _cell_files(self, sid: str, m: str, by_res: dict, periods: list, t0: dt.date) -> list:
        """Per bandset of modality `m` in cell `sid`: [uri, resolution, n_images, [band], [period]]."""
        mod = MODALITIES[m]
        for bs in mod.bandsets:
            if bs.resolution not in by_res:
                raise ValueError(f"source {self.root}: sample {sid} lacks the {bs.resolution:g} m file of {m}")
        if not periods:
            raise ValueError(f"source {self.root}: sample {sid} has no rows in {mod.raw_folder}.csv")
        images = self._images_in_range(periods, t0)  # [(image_idx, period)]
        return [[by_res[bs.resolution], bs.resolution, len(periods),
                 [i * bs.num_bands + b + 1 for i, _ in images for b in range(bs.num_bands)],
                 [k for _, k in images]] for bs in mod.bandsets]  # fmt: skip

    def _images_in_range(self, periods: list, t0: dt.date) -> list[tuple[int, int]]:
        """[(image_idx, period k of the area's timeline)] of the images whose slot's middle day is in range."""
        taken, out = set(), []
        for idx, start, _end in sorted(periods, key=lambda p: (round((p[1] - t0).days / rl.PERIOD_DAYS), p[0])):
            slot = round((start - t0).days / rl.PERIOD_DAYS)
            mid = t0 + dt.timedelta(days=slot * rl.PERIOD_DAYS + rl.PERIOD_DAYS // 2)
            k = (mid - self.start).days // rl.PERIOD_DAYS
            if self.start <= mid <= self.end and 0 <= k < len(self.months) and k not in taken:
                taken.add(k)
                out.append((idx, k))
        return out

    # ---- the workers: a tile's pixels ----------------------------------------------------------------------

    def read(self, tile: Tile, grid: Grid) -> dict[str, np.ndarray]:
        out = {m: np.full((tile.size, tile.size, len(self.months), MODALITIES[m].num_bands), np.nan, np.float32)
               for m in self.mods}  # fmt: skip
        bounds = tile.bounds(grid)
        with self.handles.env_ctx():
            for cell in self.cells.values():
                win = _cell_window(cell, bounds, grid.resolution)
                if win is not None:
                    self._read_cell(out, cell, win)
        return out

    def _read_cell(self, out: dict, cell: dict, win: tuple) -> None:
        """Place the bands in range of one cell's files inside window `win` into the tile arrays `out`."""
        tx, ty, cx, cy, w, h = win
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

    def _read_window(self, uri: str, modality: str, res: float, count: int, bands: list[int],
                     cx: int, cy: int, w: int, h: int) -> np.ndarray:  # fmt: skip
        """Bands `bands` (1-based) of the 10 m window (cx, cy, w, h) of one cell's file stored at `res` metres
        -> (len(bands), h, w) float32 in model units on the 10 m grid (coarser pixels repeated)."""
        from rasterio.windows import Window

        ds = self.handles.get(uri)
        f = int(round(res / BASE_GSD))
        n = int(round(TILE_METRES / res))
        if ds.count != count or (ds.width, ds.height) != (n, n):
            raise ValueError(f"{uri}: {ds.count} bands of {ds.width} x {ds.height} px, expected {count} of {n} x {n} "
                             "(the timestep CSV and the layout)")  # fmt: skip
        c0, r0 = cx // f, cy // f
        c1, r1 = -(-(cx + w) // f), -(-(cy + h) // f)
        vals = to_model_units(modality, ds.read(indexes=bands, window=Window(c0, r0, c1 - c0, r1 - r0)))
        if f > 1:
            vals = repeat_pixels(vals, f)
            vals = vals[:, cy - r0 * f : cy - r0 * f + h, cx - c0 * f : cx - c0 * f + w]
        return vals


def _meets(bounds: tuple, grid: Grid) -> bool:
    """Whether cell `bounds` (left, bottom, right, top) overlaps the grid's area."""
    cl, cb, cr, ct = bounds
    left, top = grid.x0, grid.y0
    right, bottom = left + grid.width * grid.resolution, top - grid.height * grid.resolution
    return not (cl >= right or cr <= left or ct <= bottom or cb >= top)


def _cell_window(cell: dict, bounds: tuple, r: float) -> tuple[int, int, int, int, int, int] | None:
    """Where a cell and a tile (`bounds`, pixels of r metres) overlap: (tile x, tile y, cell x, cell y, w, h) px;
    None when they do not."""
    left, bottom, right, top = bounds
    cl, ct, span = cell["left"], cell["top"], TILE_SIZE * r
    if cl >= right or cl + span <= left or ct <= bottom or ct - span >= top:
        return None
    x0, x1 = max(left, cl), min(right, cl + span)
    y0, y1 = min(top, ct), max(bottom, ct - span)
    tx, ty = int(round((x0 - left) / r)), int(round((top - y0) / r))
    cx, cy = int(round((x0 - cl) / r)), int(round((ct - y0) / r))
    return tx, ty, cx, cy, int(round((x1 - x0) / r)), int(round((y0 - y1) / r))


def period_timeline(time_start: str, time_end: str) -> tuple[dt.date, dt.date, np.ndarray]:
    """(start, end, months (T,)): the 30-day periods from time_start to time_end, each named by the month of its
    middle day."""
    start, end = dt.date.fromisoformat(time_start), dt.date.fromisoformat(time_end)
    n = (end - start).days // rl.PERIOD_DAYS + 1
    if end < start or n > MAX_PERIODS:
        raise ValueError(f"time range {time_start}..{time_end}: must be 1..{MAX_PERIODS} periods of "
                         f"{rl.PERIOD_DAYS} days")  # fmt: skip
    mid = rl.PERIOD_DAYS // 2
    months = [(start + dt.timedelta(days=k * rl.PERIOD_DAYS + mid)).month - 1 for k in range(n)]
    return start, end, np.asarray(months, dtype=np.int64)


def default_time(root: str, found: dict, table: dict, time_start: str, time_end: str) -> tuple[str, str]:
    """12 periods of 30 days from time_start, up to time_end, or, with neither, the 12 periods starting on an
    image's start date that hold the most images of the area's cells (the earliest such window)."""
    span = dt.timedelta(days=MAX_PERIODS * rl.PERIOD_DAYS - 1)
    if time_start:
        return time_start, (dt.date.fromisoformat(time_start) + span).isoformat()
    if time_end:
        return (dt.date.fromisoformat(time_end) - span).isoformat(), time_end
    starts = sorted(p[1] for sid, by_mod in found.items() for m in by_mod for p in table.get(m, {}).get(sid, []))
    if not starts:
        raise ValueError(f"source {root}: no timestep rows for the area's cells; give time_start / time_end")
    # images in [a, a + span] for each start a (sorted, so two binary searches); the earliest best wins
    best = max(starts, key=lambda a: (bisect_right(starts, a + span) - bisect_left(starts, a), -a.toordinal()))
    return best.isoformat(), (best + span).isoformat()
