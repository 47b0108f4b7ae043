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
