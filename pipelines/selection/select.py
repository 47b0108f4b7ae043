"""The cell selection (`olmoearth select-cells`): OSM features -> (category, cell) candidates -> a seeded draw of at
most `cap` cells per category -> one row per drawn cell with all the categories it was drawn for.

    features   pbf.feature_dataset: Ray tasks over blob groups, the node-location join inside
    candidates Ray tasks, one per feature block: each feature's categories x the cells it touches
               (cells.feature_cells), split by a hash of the cell id into `partitions`
    reduce     Ray tasks, one per partition: the unique (category, cell) pairs, their count per category and
               each category's `cap` lowest ranks (cells.rank). Partitions hold disjoint cells, so counts add
               up exactly, and the global `cap` lowest ranks are among the partitions' `cap` lowest.
    merge      the driver: per category the `cap` lowest of <= partitions x cap ranks (the draw is bounded by
               cap x categories, never by the extract), then one row per cell, its categories in table order

No step holds all features: features live in the blocks of the dataset, candidates in their partitions.
"""

from __future__ import annotations

import json
import zlib
from collections import defaultdict

import numpy as np

from pipelines.selection import cells as cellmath
from pipelines.selection.categories import CategoryTable


def candidates(batch: dict, table: CategoryTable) -> dict:
    """A batch of feature rows -> its unique (category, cell_id) candidates."""
    import shapely

    pairs = set()
    for tags, wkb in zip(batch["tags"], batch["wkb"], strict=True):
        names = table.categories_of(json.loads(tags))
        if not names:
            continue
        epsg, touched = cellmath.feature_cells(shapely.from_wkb(wkb))
        pairs.update((name, cellmath.cell_id(epsg, c, r)) for name in names for c, r in touched)
    pairs = sorted(pairs)
    return {"category": np.array([p[0] for p in pairs], dtype=object),
            "cell_id": np.array([p[1] for p in pairs], dtype=object)}


def block_candidates(block, table: CategoryTable, partitions: int) -> tuple:
    """A block of feature rows (pyarrow table) -> its unique (category, cell_id) candidates as `partitions`
    lists by cell-id hash (one task per block does both: the candidates never travel unsplit)."""
    pairs = candidates({"tags": block.column("tags").to_pylist(), "wkb": block.column("wkb").to_pylist()}, table)
    out = [[] for _ in range(partitions)]
    for category, cid in zip(pairs["category"], pairs["cell_id"], strict=True):
        out[zlib.crc32(cid.encode()) % partitions].append((category, cid))
    return tuple(out) if partitions > 1 else out[0]


def reduce_partition(seed: int, cap: int, *parts: list) -> dict:
    """One cell-hash partition -> {category: (candidate count, [(rank, cell_id), ...] its cap lowest)}."""
    by_category = defaultdict(set)
    for part in parts:
        for category, cid in part:
            by_category[category].add(cid)
    out = {}
    for category, ids in by_category.items():
        ranked = sorted((cellmath.rank(seed, category, cid), cid) for cid in ids)
        out[category] = (len(ids), ranked[:cap])
    return out


def merge_draws(results: list[dict], table: CategoryTable, cap: int) -> tuple[dict, dict, dict]:
    """Partition results -> (candidates per category, drawn per category, {cell_id: [categories]})."""
    counts, ranked = defaultdict(int), defaultdict(list)
    for result in results:
        for category, (n, best) in result.items():
            counts[category] += n
            ranked[category].extend(best)
    drawn, cell_categories = {}, defaultdict(list)
    for name in table.names:  # table order, so each cell's list is in table order too
        chosen = sorted(ranked.get(name, []))[:cap]
        drawn[name] = len(chosen)
        for _, cid in chosen:
            cell_categories[cid].append(name)
    return {n: counts.get(n, 0) for n in table.names}, drawn, dict(cell_categories)


def draw_cells(features, table: CategoryTable, seed: int, cap: int, partitions: int) -> tuple[dict, dict, dict]:
    """A feature Dataset -> merge_draws' (candidates, drawn, cells) through the Ray stages above."""
    import ray

    split = ray.remote(block_candidates).options(num_returns=partitions)
    table_ref = ray.put(table)
    pieces = [split.remote(b, table_ref, partitions) for b in features.to_arrow_refs()]
    if partitions == 1:
        pieces = [[p] for p in pieces]
    reduce = ray.remote(reduce_partition)
    results = ray.get([reduce.remote(seed, cap, *[p[i] for p in pieces]) for i in range(partitions)])
    return merge_draws(results, table, cap)


def cell_rows(cell_categories: dict, seed: int, start_year: int, end_year: int):
    """{cell_id: [categories]} -> the GeoDataFrame of cells.parquet, sorted by cell id."""
    import geopandas as gpd

    ids = sorted(cell_categories)
    windows = [cellmath.window(seed, cid, start_year, end_year) for cid in ids]
    return gpd.GeoDataFrame(
        {"cell_id": ids, "crs": [cid.split("_", 1)[0] for cid in ids],
         "categories": [list(cell_categories[cid]) for cid in ids],
         "start_date": [w[0] for w in windows], "end_date": [w[1] for w in windows]},
        geometry=[cellmath.cell_polygon_lonlat(cid) for cid in ids], crs="EPSG:4326",
    )
