"""Static maps of one cell (WorldCover, SRTM, canopy height, CDL, WorldCereal) from any GeoTIFF / COG mosaic.

    vals = read_map(handles, "s3://maps/worldcover.tif", "worldcover", cell)   # float32 (C, 256, 256), NaN = none

The mosaic may be in any CRS and resolution: the cell's window is read (ranged reads of its blocks only) and
warped by nearest neighbour onto the cell's grid at the map's stored resolution (10 m for every map of the
registry) by the one windowed reader of the image sources (`pipelines.imagery.sources.warp_window`); where the
mosaic has its nodata value, or does not reach, the result is NaN. A mosaic must hold the map's bands in the
registry's order (WorldCereal: its 8 products as 8 bands).
"""

from __future__ import annotations

import numpy as np

from olmoearth.modalities import MODALITIES
from pipelines.corpus import raw_layout as rl
from pipelines.imagery.sources import Handles, as_crs, warp_window


def read_map(handles: Handles, uri: str, modality: str, epsg: int, col: int, row: int) -> np.ndarray:
    """float32 (C, n, n) of map `modality` on the cell at its stored resolution, NaN where it has no data.
    ValueError naming the map and file when the mosaic cannot serve it (band count, CRS)."""
    from rasterio.warp import transform_bounds

    mod = MODALITIES[modality]
    (bs,) = mod.bandsets
    n = rl.cell_size(bs.resolution)
    dst_t = rl.cell_transform(col, row, bs.resolution)
    ds = handles.get(uri)
    if ds.count != mod.num_bands:
        raise ValueError(f"maps.{modality}: {uri} has {ds.count} bands; {modality} needs {mod.num_bands} "
                         f"({', '.join(mod.bands)})")  # fmt: skip
    if ds.crs is None:
        raise ValueError(f"maps.{modality}: {uri} has no CRS")
    crs = f"EPSG:{epsg}"
    bounds = rl.cell_bounds(col, row)
    want = bounds if ds.crs == as_crs(crs) else transform_bounds(crs, ds.crs, *bounds, densify_pts=21)
    part = warp_window(ds, want, crs, dst_t, (mod.num_bands, n, n))
    return part if part is not None else np.full((mod.num_bands, n, n), np.nan, np.float32)
