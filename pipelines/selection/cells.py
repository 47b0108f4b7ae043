"""Cell arithmetic of the selection: which corpus cells a feature touches, the seeded rank of a cell in a
category's draw, a cell's one-year window and its polygon in lon/lat.

The rule (ours; the original used 0.001-degree tiles and one random node per feature): a feature is put on the
UTM zone of the centre of its lon/lat bounding box (`grid.utm_epsg`), projected there, and is a candidate for
every 2560 m cell of that zone its geometry touches (`grid.cells_of_geometry`: a node's cell, the cells a way's
line passes through, an area's cells including its interior). A feature spanning two zones stays on one.

Ranks and windows come from blake2b hashes of (seed, category, cell id) and (seed, cell id): the same seed gives
the same cells and windows on any number of tasks in any order.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib

from pipelines.imagery import grid


@functools.lru_cache(maxsize=128)
def _to_utm(epsg: int):
    from pyproj import Transformer

    return Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)


@functools.lru_cache(maxsize=128)
def _to_lonlat(epsg: int):
    from pyproj import Transformer

    return Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)


def feature_cells(geom) -> tuple[int, list[tuple[int, int]]]:
    """A shapely geometry in lon/lat -> (UTM EPSG code, [(col, row), ...] of the cells it touches)."""
    import shapely

    minx, miny, maxx, maxy = geom.bounds
    epsg = grid.utm_epsg((minx + maxx) / 2, (miny + maxy) / 2)
    t = _to_utm(epsg)
    utm = shapely.transform(geom, lambda xy: _stack(t.transform(xy[:, 0], xy[:, 1])))
    return epsg, grid.cells_of_geometry(utm)


def _stack(xy):
    import numpy as np

    return np.column_stack(xy)


def cell_id(epsg: int, col: int, row: int) -> str:
    return f"EPSG:{epsg}_{col}_{row}"


def _hash64(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def rank(seed: int, category: str, cid: str) -> int:
    """The cell's place in the category's draw: the `cap` smallest ranks are drawn."""
    return _hash64(seed, "draw", category, cid)


def window(seed: int, cid: str, start_year: int, end_year: int) -> tuple[str, str]:
    """(start_date, end_date) ISO: 12 whole months inside start_year..end_year, the start month drawn uniformly
    from those that fit; end_date is the window's last day (inclusive)."""
    months = (end_year - start_year + 1) * 12 - 11  # start months with 12 months left in the range
    m = _hash64(seed, "window", cid) % months
    start = dt.date(start_year + m // 12, m % 12 + 1, 1)
    after = dt.date(start.year + 1, start.month, 1)
    return start.isoformat(), (after - dt.timedelta(days=1)).isoformat()


def cell_polygon_lonlat(cid: str):
    """The cell's square in lon/lat (edges densified every 256 m, so the UTM square's curvature is kept)."""
    import shapely

    crs, left, bottom, right, top = grid.cell_bounds(cid)
    square = shapely.segmentize(shapely.box(left, bottom, right, top), 256.0)
    t = _to_lonlat(int(crs.split(":")[1]))
    return shapely.transform(square, lambda xy: _stack(t.transform(xy[:, 0], xy[:, 1])))
