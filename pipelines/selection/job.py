"""The cell-selection job from a config to its outputs (ray_jobs/select_cells.py is its CLI):

    <out>/cells.parquet   GeoParquet, one row per drawn cell: cell_id (EPSG:<code>_<col>_<row>, the corpus
                          layout's cell), crs ("EPSG:326xx"), geometry (the cell's square in EPSG:4326),
                          categories (list[str], table order), start_date, end_date (ISO, 12 months, end inclusive)
    <out>/summary.csv     category, candidates, drawn (every category of the table, 0s included)
    <out>/cells.png       the drawn cells over the extract's extent (a table's: the bounds of its features)
    <out>/report.json     the settings, the input's format, features read per kind, relations skipped /
                          unclosed / empty, refs without a location, ways skipped, matching table rows without
                          a usable geometry, cells, categories without candidates
The input is an .osm.pbf (pbf.py) or a GeoParquet / GeoPackage of OSM features (features_table.py): both give
the same feature rows, and everything after the reader is the same.
Every output is written atomically through Storage (any URI)."""

from __future__ import annotations

import json
import time

from pipelines.common.storage import Storage, join
from pipelines.selection import features_table, pbf, select, summary
from pipelines.selection.categories import load_table
from pipelines.selection.config import SelectCellsConfig, check_config, osm_format


def select_cells(cfg: SelectCellsConfig) -> dict:
    """Run the selection on the connected Ray cluster; returns report.json's content (plus `summary_text`)."""
    check_config(cfg)
    storage = Storage()
    table = load_table(cfg.categories, storage)
    t0 = time.time()
    stats: dict = {}
    fmt = osm_format(cfg.osm)
    if fmt == "pbf":
        features = pbf.feature_dataset(cfg.osm, table.matches, cfg.blocks_per_task, cfg.buckets or None, stats)
    else:
        features = features_table.feature_dataset(cfg.osm, table.matches, cfg.features_per_task, stats)
    candidates, drawn, cell_categories = select.draw_cells(features, table, cfg.seed, cfg.cap, cfg.partitions)
    cells = select.cell_rows(cell_categories, cfg.seed, cfg.start_year, cfg.end_year)
    seconds = time.time() - t0
    summary.write_cells(cells, join(cfg.out, "cells.parquet"), storage)
    storage.write_text(join(cfg.out, "summary.csv"), summary.summary_csv(candidates, drawn))
    report = _report(cfg, fmt, table, stats, candidates, drawn, len(cells), seconds)
    if cfg.map:
        if fmt == "pbf":
            extent = summary.extract_extent(pbf.read_ranges(cfg.osm, storage, [pbf.header_range(cfg.osm, storage)]))
        else:
            extent = tuple(stats["bounds"]) if stats.get("bounds") else None
        title = f"{len(cells)} cell(s) drawn, {sum(1 for n in candidates.values() if n)} categories with candidates"
        storage.write_bytes(join(cfg.out, "cells.png"), summary.cells_png(cells, extent, title))
    storage.write_text(join(cfg.out, "report.json"), json.dumps(report, indent=1))
    return {**report, "summary_text": summary.summary_text(candidates, drawn)}


def _report(cfg, fmt: str, table, stats: dict, candidates: dict, drawn: dict, n_cells: int, seconds: float) -> dict:
    # a table's rows may carry no osm_type: those are `untyped` (a PBF's features always have one)
    kinds = ("nodes", "ways", "relations") + (("untyped",) if fmt != "pbf" else ())
    read = {k: stats.get(k, 0) for k in kinds}
    return {
        "osm": cfg.osm, "osm_format": fmt, "categories_table": cfg.categories, "seed": cfg.seed, "cap": cfg.cap,
        "years": [cfg.start_year, cfg.end_year],
        "features_read": read, "features_read_total": sum(read.values()),
        "relations_skipped": stats.get("relations_skipped", 0),  # matching relations not of an area type (pbf.py)
        "relations_unclosed": stats.get("relations_unclosed", 0),  # multipolygons taken as their member lines
        "relations_empty": stats.get("relations_empty", 0),  # multipolygons without a located member
        "refs_missing": stats.get("refs_missing", 0),  # way node refs outside the extract (dropped)
        "ways_skipped": stats.get("ways_skipped", 0),  # matching ways with < 2 located nodes
        # matching rows of a GeoParquet / GeoPackage left out (no cells to give): null, unreadable, empty geometry
        "geometry_missing": stats.get("geometry_missing", 0),
        "geometry_invalid": stats.get("geometry_invalid", 0),
        "geometry_empty": stats.get("geometry_empty", 0),
        "categories": len(table.names), "cells": n_cells,
        "candidates": candidates, "drawn": drawn,
        "empty_categories": [n for n in table.names if not candidates[n]],
        "seconds": round(seconds, 3),
    }
