"""The OSM raster of every cell of a materialisation, as one Ray Data stage over the extract.

    written = write_osm_rasters(cfg, cells)     # the sample ids whose OSM raster file was written

The extract's features that any OSM category wants come from the selection's PBF reader as a Ray Dataset
(`pipelines.selection.pbf.feature_dataset`: blob ranges scanned by Ray tasks, the node-location join spread
over buckets) or, for a GeoParquet / GeoPackage of features, from that table. Each feature is sent to the
job's cells it meets (an STRtree of the cells' lon/lat boxes, built once per batch task), the features are
grouped by cell, and each group is rasterised (`osm_raster.rasterise`) and written to the cell's
`10_openstreetmap_raster/` file. No step holds more than one batch of features or one cell's features; the
driver gets back only the sample ids written. Cells without any feature get their all-zero raster from their
cell task (pipelines/corpus/materialize_cell.py), which also removes the file again if the cell ends empty or
failed.
"""

from __future__ import annotations

import numpy as np

from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.cells import CellRecord
from pipelines.corpus.osm_raster import RESOLUTION, matches, rasterise
from pipelines.imagery.geotiff import geotiff_bytes

OSM_FOLDER = "10_openstreetmap_raster"


def osm_file(cell: CellRecord) -> str:
    """The cell's OSM raster file, relative to the corpus root."""
    return f"{OSM_FOLDER}/{rl.file_name(cell.epsg, cell.col, cell.row, RESOLUTION)}"


def feature_source(uri: str):
    """The extract's wanted features as a Ray Dataset of rows {wkb, tags (JSON), osm_type}: the selection's
    readers as Ray tasks (a .osm.pbf, or a GeoParquet / GeoPackage of features)."""
    from pipelines.selection.config import osm_format

    if osm_format(uri) == "pbf":
        from pipelines.selection.pbf import feature_dataset
    else:
        from pipelines.selection.features_table import feature_dataset
    return feature_dataset(uri, matches).select_columns(["wkb", "tags", "osm_type"])


def assign_cells(batch: dict, sids: list[str], boxes: list[tuple]) -> dict:
    """A batch of features -> one row per (cell, feature) for the job's cells (lon/lat boxes) each meets."""
    from shapely import STRtree, from_wkb
    from shapely.geometry import box

    tree = STRtree([box(*b) for b in boxes])
    wkbs = np.asarray(batch["wkb"], dtype=object)
    feat_idx, cell_idx = tree.query(from_wkb(wkbs), predicate="intersects")
    return {"sid": np.asarray([sids[i] for i in cell_idx], dtype=object), "wkb": wkbs[feat_idx],
            "tags": np.asarray(batch["tags"], dtype=object)[feat_idx],
            "osm_type": np.asarray(batch["osm_type"], dtype=object)[feat_idx]}  # fmt: skip


def write_cell(group: dict, out: str) -> dict:
    """One cell's features -> its OSM raster file written (atomically) -> {"sid": [sid]}."""
    import json

    from shapely import from_wkb

    sid = str(group["sid"][0])
    epsg, col, row = rl.parse_sample_id(sid)
    geoms = from_wkb(np.asarray(group["wkb"], dtype=object))
    feats = [(g, json.loads(t), k or None) for g, t, k in zip(geoms, group["tags"], group["osm_type"], strict=True)]
    data = geotiff_bytes(rasterise(feats, epsg, col, row), epsg, rl.cell_transform(col, row, RESOLUTION), None)
    Storage().write_bytes(join(out, f"{OSM_FOLDER}/{rl.file_name(epsg, col, row, RESOLUTION)}"), data)
    return {"sid": np.asarray([sid], dtype=object)}


def write_osm_rasters(cfg, cells: list[CellRecord], storage: Storage) -> set[str]:
    """Rasterise and write the OSM raster of every cell with at least one feature; returns their sample ids."""
    ds = feature_source(cfg.osm) if cells else None
    if ds is None:
        return set()
    sids, boxes = [c.sid for c in cells], [c.lonlat_bounds() for c in cells]
    pairs = ds.map_batches(assign_cells, fn_kwargs={"sids": sids, "boxes": boxes}, batch_format="numpy",
                           batch_size=4096)  # fmt: skip
    parts = max(1, min(200, len(cells) // 16))  # hash partitions of the shuffle: a few per core, not 200 for 4 cells
    written = pairs.groupby("sid", num_partitions=parts).map_groups(write_cell, fn_kwargs={"out": cfg.out}, batch_format="numpy",
                                              num_cpus=cfg.num_cpus_per_task)  # fmt: skip
    return {str(r["sid"]) for r in written.take_all()}
