"""The cells a materialisation writes, from wherever the user names them, as one kind of record.

    cells = cells_from_parquet("s3://sel/cells.parquet", storage)       # `olmoearth select-cells` output
    cells = cells_from_bbox([-76.2, 37.6, -76.1, 37.7], "2022-01-01", "2022-12-31")
    cells = cells_from_ids(["EPSG:32618_172_-1631"], "2022-01-01", "2022-12-31")

A cell is a 2560 m square of the raw layout's UTM grid (`pipelines.corpus.raw_layout`: upper-left corner at
(col * 2560, -row * 2560) in EPSG:<code>) plus the window of calendar months its time series cover (at most
12, `pipelines.imagery.stac.month_timeline`). The selection's GeoParquet gives each cell its own window
(columns `cell_id`, `start_date`, `end_date`; an `end_date` on the first day of the month after a 12-month
window is read as exclusive); a bbox or a cell list shares one window from the config. A bbox (lon/lat) takes
every cell of the UTM zone of each corner that meets it, so a box across a zone boundary yields the cells of
both zones.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from olmoearth.modalities import TILE_METRES
from pipelines.common.storage import Storage
from pipelines.corpus import raw_layout as rl
from pipelines.imagery.grid import Grid, bbox_to_crs, utm_epsg
from pipelines.imagery.stac import MAX_MONTHS, month_timeline


@dataclass(frozen=True)
class CellRecord:
    epsg: int
    col: int
    row: int
    start: str  # ISO date: first calendar month of the window
    end: str  # ISO date: last calendar month of the window (inclusive)

    @property
    def sid(self) -> str:
        return rl.sample_id(self.epsg, self.col, self.row)

    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    def lonlat_bounds(self) -> tuple[float, float, float, float]:
        """The cell's bounding box in lon/lat."""
        return bbox_to_crs(rl.cell_bounds(self.col, self.row), self.crs, "EPSG:4326")

    def grid(self) -> Grid:
        """The cell's 256 x 256 px 10 m grid."""
        left, _, _, top = rl.cell_bounds(self.col, self.row)
        return Grid(self.crs, left, top, rl.TILE_SIZE, rl.TILE_SIZE)


def window(start: str, end: str, where: str) -> tuple[str, str]:
    """(start, end) checked as a window of 1..12 calendar months; an end on the 1st of the month that would
    make it 13 is exclusive (the day before is used). ValueError naming `where`."""
    try:
        a, b = dt.date.fromisoformat(str(start)[:10]), dt.date.fromisoformat(str(end)[:10])
    except ValueError as e:
        raise ValueError(f"{where}: start/end must be ISO dates, got {start!r}, {end!r} ({e})") from None
    n = (b.year - a.year) * 12 + b.month - a.month + 1
    if n == MAX_MONTHS + 1 and b.day == 1:
        b -= dt.timedelta(days=1)
    try:
        month_timeline(a.isoformat(), b.isoformat())
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return a.isoformat(), b.isoformat()


def cells_from_ids(ids: list[str], start: str, end: str) -> list[CellRecord]:
    """Sample ids `EPSG:<code>_<col>_<row>` sharing one window; duplicates kept once."""
    w = window(start, end, "time_start/time_end")
    out = {}
    for sid in ids:
        try:
            epsg, col, row = rl.parse_sample_id(str(sid))
        except ValueError as e:
            raise ValueError(f"cell_ids: {e}") from None
        out.setdefault(sid, CellRecord(epsg, col, row, *w))
    return list(out.values())


def cells_from_bbox(bbox: list[float], start: str, end: str, bbox_crs: str = "EPSG:4326") -> list[CellRecord]:
    """Every cell meeting `bbox`, sharing one window: for a lon/lat bbox in the UTM zone(s) of its corners, for
    a bbox in a projected CRS (e.g. EPSG:32618) on that CRS's grid."""
    if len(bbox) != 4 or not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
        raise ValueError(f"bbox: expected [minx, miny, maxx, maxy] in {bbox_crs}, got {bbox}")
    w = window(start, end, "time_start/time_end")
    if bbox_crs.upper() in ("EPSG:4326", "OGC:CRS84"):
        zones = sorted({utm_epsg(lon, lat) for lon in (bbox[0], bbox[2]) for lat in (bbox[1], bbox[3])})
    else:
        from rasterio.crs import CRS

        crs = CRS.from_user_input(bbox_crs)
        if not crs.is_projected or crs.to_epsg() is None:
            raise ValueError(f"bbox_crs: lon/lat or a projected CRS with an EPSG code (UTM), got {bbox_crs!r}")
        zones = [crs.to_epsg()]
    out = []
    for epsg in zones:
        same = bbox_crs.upper() == f"EPSG:{epsg}"
        minx, miny, maxx, maxy = bbox if same else bbox_to_crs(tuple(bbox), "EPSG:4326", f"EPSG:{epsg}")
        c0, c1 = math.floor(minx / TILE_METRES), math.ceil(maxx / TILE_METRES)
        r0, r1 = math.floor(-maxy / TILE_METRES), math.ceil(-miny / TILE_METRES)  # rows grow southwards
        out += [CellRecord(epsg, c, r, *w) for r in range(r0, r1) for c in range(c0, c1)]
    return out


def cells_from_parquet(uri: str, storage: Storage) -> list[CellRecord]:
    """The selection's GeoParquet (columns cell_id, start_date, end_date; geometry not needed) -> cells, each
    with its own window. A row that does not parse raises ValueError naming the file and row."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri)
    try:
        table = pq.read_table(path, filesystem=fs, columns=["cell_id", "start_date", "end_date"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cells {uri}: cannot read cell_id, start_date, end_date: {e}") from None
    out = {}
    for i, r in enumerate(table.to_pylist()):
        where = f"cells {uri}: row {i} ({r.get('cell_id')!r})"
        try:
            epsg, col, row = rl.parse_sample_id(str(r["cell_id"]))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out.setdefault(r["cell_id"], CellRecord(epsg, col, row, *window(r["start_date"], r["end_date"], where)))
    return list(out.values())


def month_periods(start: str, n: int) -> list[tuple[dt.date, dt.date]]:
    """(first day, first day of the next month) of each of the n calendar months from `start`'s month."""
    a = dt.date.fromisoformat(start)
    out = []
    for k in range(n):
        y, m = divmod(a.month - 1 + k, 12)
        first = dt.date(a.year + y, m + 1, 1)
        y2, m2 = divmod(m + 1, 12)
        out.append((first, dt.date(a.year + y + y2, m2 + 1, 1)))
    return out
