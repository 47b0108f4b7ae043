"""The one UTM pixel grid that every stage places its pixels on, and the square tiles a grid is cut into.

    grid:  W x H pixels of 10 m from a top-left corner (x0, y0) in a projected CRS (UTM), the corners snapped to
           a multiple of some cell (`area_grid`), so corpus cells, mapping tiles and selection cells of the same
           CRS line up pixel for pixel
    tiles: `size` px squares stepping by size - overlap; the last row / column is shifted back to end at the
           grid's edge, so every tile lies inside the grid (a grid smaller than one tile gets one tile that
           sticks out past its right / bottom edge; what lies outside is cropped away)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Grid:
    crs: str
    x0: float  # left edge, metres
    y0: float  # top edge, metres
    width: int  # px
    height: int  # px
    resolution: float = 10.0

    def transform(self, scale: int = 1) -> tuple:
        """Affine (a, b, c, d, e, f) of this grid's pixels, or of pixels `scale` times larger (tokens)."""
        r = self.resolution * scale
        return (r, 0.0, self.x0, 0.0, -r, self.y0)

    @property
    def area_km2(self) -> float:
        return self.width * self.height * (self.resolution / 1000.0) ** 2


@dataclass(frozen=True)
class Tile:
    row: int
    col: int
    x: int  # left px inside the grid
    y: int  # top px inside the grid
    size: int  # px per side

    @property
    def id(self) -> str:
        return f"r{self.row:04d}_c{self.col:04d}"

    def bounds(self, grid: Grid) -> tuple[float, float, float, float]:
        r = grid.resolution
        left, top = grid.x0 + self.x * r, grid.y0 - self.y * r
        return left, top - self.size * r, left + self.size * r, top


def starts(length: int, size: int, stride: int) -> list[int]:
    """Offsets of windows of `size` stepping by `stride` over `length`, the last one ending at the edge."""
    if length <= size:
        return [0]
    out = list(range(0, length - size, stride))
    if out[-1] != length - size:
        out.append(length - size)
    return out


def make_tiles(grid: Grid, size: int, overlap: int, patch_size: int) -> list[Tile]:
    if size % patch_size or overlap % patch_size:
        raise ValueError(f"tile_size ({size}) and overlap ({overlap}) must be multiples of patch_size ({patch_size})")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap} for tile_size {size}")
    if grid.width % patch_size or grid.height % patch_size:
        raise ValueError(f"grid {grid.width} x {grid.height} px is not a multiple of patch_size {patch_size}")
    xs, ys = starts(grid.width, size, size - overlap), starts(grid.height, size, size - overlap)
    return [Tile(r, c, x, y, size) for r, y in enumerate(ys) for c, x in enumerate(xs)]


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


# ----------------------------------------------------------------------------------------------------------
# Corpus / selection cells: 2560 m squares of a UTM zone, id EPSG:<code>_<col>_<row>, the same cells as the
# raw corpus layout (pipelines/corpus/raw_layout.py): upper-left corner (col * 2560, -row * 2560), rows
# growing southwards (northern cells have negative rows).

CELL_METRES = 2560.0  # = olmoearth.modalities.TILE_METRES (256 px of 10 m)


def cell_of(x: float, y: float) -> tuple[int, int]:
    """(col, row) of the cell holding UTM point (x, y); a point on a shared edge goes right / down."""
    return int(math.floor(x / CELL_METRES)), int(math.floor(-y / CELL_METRES))


def cell_bounds(cell_id: str) -> tuple[str, float, float, float, float]:
    """'EPSG:32635_150_-2630' -> (crs, left, bottom, right, top) in metres of that UTM CRS."""
    import re

    m = re.match(r"^EPSG:(\d+)_(-?\d+)_(-?\d+)$", cell_id)
    if not m:
        raise ValueError(f"not a cell id: {cell_id!r}; expected EPSG:<code>_<col>_<row>")
    col, row = int(m.group(2)), int(m.group(3))
    left, top = col * CELL_METRES, -row * CELL_METRES
    return f"EPSG:{m.group(1)}", left, top - CELL_METRES, left + CELL_METRES, top


def cells_of_geometry(geom) -> list[tuple[int, int]]:
    """(col, row) of every cell a shapely geometry in UTM metres touches: a point's cell, the cells a line
    passes through, a polygon's cells including its interior. Sorted; cells merely sharing an edge or corner
    with the geometry's boundary count too (shapely `intersects`)."""
    import numpy as np
    import shapely

    if geom.is_empty:
        return []
    minx, miny, maxx, maxy = geom.bounds
    c0, r1 = cell_of(minx, miny)
    c1, r0 = cell_of(maxx, maxy)
    if c0 == c1 and r0 == r1:
        return [(c0, r0)]
    cols, rows = np.meshgrid(np.arange(c0, c1 + 1), np.arange(r0, r1 + 1), indexing="ij")
    cols, rows = cols.ravel(), rows.ravel()
    boxes = shapely.box(cols * CELL_METRES, -(rows + 1) * CELL_METRES, (cols + 1) * CELL_METRES, -rows * CELL_METRES)
    hit = shapely.intersects(boxes, geom)
    return sorted(zip(cols[hit].tolist(), rows[hit].tolist(), strict=True))


# ----------------------------------------------------------------------------------------------------------
# An area spanning several UTM zones: one sub-area per zone (and hemisphere), each gridded in its own CRS


def utm_zone_parts(lonlat_bbox) -> list[tuple[str, tuple[float, float, float, float]]]:
    """(minlon, minlat, maxlon, maxlat) -> [(UTM CRS, the part of the box in that zone)], west to east, north
    before south: the box cut at the zones' 6-degree meridians and at the equator. A box that only touches a
    meridian or the equator (an edge on it) stays whole: edges count as shared, not as a second zone. The
    special zones of Norway and Svalbard are not applied (every zone is 6 degrees wide)."""
    minx, miny, maxx, maxy = (float(v) for v in lonlat_bbox)
    if not (-180.0 <= minx < maxx <= 180.0 and -90.0 <= miny < maxy <= 90.0):
        raise ValueError(f"bbox: not a lon/lat box inside [-180, -90, 180, 90] with min < max: {list(lonlat_bbox)}")
    first = int(math.floor((minx + 180.0) / 6.0))  # zone index 0..59 of the west edge
    last = min(int(math.ceil((maxx + 180.0) / 6.0)) - 1, 59)  # of the east edge (an edge on a meridian: the west one)
    halves = [(max(miny, 0.0), maxy, 32600)] if maxy > 0 else []
    if miny < 0:
        halves.append((miny, min(maxy, 0.0), 32700))
    parts = []
    for z in range(first, last + 1):
        west, east = max(minx, -180.0 + 6.0 * z), min(maxx, -174.0 + 6.0 * z)
        for south, north, base in halves:
            parts.append((f"EPSG:{base + z + 1}", (west, south, east, north)))
    return parts
