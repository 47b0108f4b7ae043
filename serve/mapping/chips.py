"""Per-chip pooled embeddings as GeoParquet (`<out>/chips.parquet`, `chips_parquet: true`): one row per chip of
`chip_tokens` x `chip_tokens` tokens of the mosaic, for vector search and joins with labels (geopandas,
DuckDB, pyarrow).

Columns: chip (id `r<row>_c<col>` on the chip lattice), geometry (the chip's polygon in EPSG:4326, the file's
CRS), grid_crs and grid_bbox (the same chip in the map's UTM CRS, exact), time_start / time_end, tiles (ids of
the job's tiles that reach it), source_ids (the STAC items whose footprint meets it; empty for other
inputs), valid_fraction (of its tokens with data) and embedding (fixed-size list<float32>[D]: the mean of
its tokens with data, taken from the blended float mosaic before any int8 quantisation). Chips without any
token with data get no row.

A map over several UTM zones writes one table per zone (chip ids prefixed with the zone, `utm17_r0000_c0000`,
grid_crs that zone's) and merges them into one file (`merge_chip_files`).

Rows are collected while the mosaic's blocks are written (block sides are multiples of chip_tokens), so the
table costs one vector per chip, not a second pass over the map."""

from __future__ import annotations

import os

import numpy as np

from pipelines.imagery.grid import Grid, Tile, bbox_to_crs


class ChipTable:
    def __init__(self, grid: Grid, patch_size: int, chip_tokens: int, prefix: str = ""):
        """prefix: before each chip id (one UTM zone of a map over several: "utm17_")."""
        self.grid, self.p, self.c, self.prefix = grid, patch_size, chip_tokens, prefix
        self.rows: list[tuple[int, int, float, np.ndarray]] = []  # (chip row, chip col, valid fraction, mean)

    def add_block(self, by: int, bx: int, block: np.ndarray) -> None:
        """block (bh, bw, D) float32 at token (by, bx), NaN nodata; by, bx multiples of chip_tokens."""
        c = self.c
        for y in range(0, block.shape[0], c):
            for x in range(0, block.shape[1], c):
                part = block[y : y + c, x : x + c].reshape(-1, block.shape[-1])
                ok = np.isfinite(part).all(-1)
                if ok.any():
                    self.rows.append(((by + y) // c, (bx + x) // c, float(ok.mean()), part[ok].mean(0, dtype=np.float64)))

    def chip_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS, clipped to the map."""
        g, side = self.grid, self.c * self.p * self.grid.resolution
        left, top = g.x0 + col * side, g.y0 - row * side
        right, bottom = min(left + side, g.x0 + g.width * g.resolution), max(top - side, g.y0 - g.height * g.resolution)
        return left, bottom, right, top

    def write(self, path: str, tiles: list[Tile], source_items: list[dict], time_range: tuple[str, str]) -> str | None:
        """Write the GeoParquet file at local `path` -> path (None when no chip has data)."""
        if not self.rows:
            return None
        import geopandas as gpd
        import pyarrow as pa
        from shapely.geometry import box

        boxes = [self.chip_box(r, c) for r, c, _, _ in self.rows]
        lonlat = [bbox_to_crs(b, self.grid.crs, "EPSG:4326") for b in boxes]
        tile_ids, tile_boxes = [t.id for t in tiles], [t.bounds(self.grid) for t in tiles]
        recs = [r for r in source_items if r.get("bbox")]
        item_ids, item_boxes = [str(r["id"]) for r in recs], [_bbox4(r["bbox"]) for r in recs]
        dim = len(self.rows[0][3])
        vectors = np.stack([v for *_, v in self.rows]).astype(np.float32)  # (N, D)
        frame = gpd.GeoDataFrame({
            "chip": [f"{self.prefix}r{r:04d}_c{c:04d}" for r, c, _, _ in self.rows],
            "grid_crs": self.grid.crs, "grid_bbox": [list(b) for b in boxes],
            "time_start": time_range[0], "time_end": time_range[1],
            "tiles": _meeting(boxes, tile_boxes, tile_ids),
            "source_ids": [sorted(set(ids)) for ids in _meeting(lonlat, item_boxes, item_ids)],
            "valid_fraction": [f for _, _, f, _ in self.rows],
        }, geometry=[box(*ll) for ll in lonlat], crs="EPSG:4326")  # fmt: skip
        table = pa.Table.from_pandas(frame.to_wkb(), preserve_index=False)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
        table = table.append_column("embedding", emb)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **_geo_metadata(frame)})
        import pyarrow.parquet as pq

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        pq.write_table(table, path)
        return path


def merge_chip_files(paths: list[str], path: str) -> str:
    """The chips.parquet of the zones of one map as one file at local `path` (rows keep their zone's grid_crs and
    zone-prefixed chip ids; the GeoParquet bbox covers all) -> path."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in paths]
    geos = [json.loads(t.schema.metadata[b"geo"]) for t in tables]
    boxes = np.array([g["columns"]["geometry"]["bbox"] for g in geos])  # (zones, 4)
    geo = geos[0]
    geo["columns"]["geometry"]["bbox"] = [*boxes[:, :2].min(0).tolist(), *boxes[:, 2:].max(0).tolist()]
    table = pa.concat_tables([t.replace_schema_metadata(tables[0].schema.metadata) for t in tables])
    table = table.replace_schema_metadata({**table.schema.metadata, b"geo": json.dumps(geo).encode()})
    pq.write_table(table, path)
    return path


def _geo_metadata(frame) -> dict:
    """The GeoParquet `geo` metadata geopandas would write for `frame` (the vector column is added by pyarrow,
    since geopandas has no fixed-size list type)."""
    import json

    crs = frame.crs.to_json_dict()
    bounds = [float(v) for v in frame.total_bounds]
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs, "bbox": bounds}}}
    return {b"geo": json.dumps(geo).encode()}


def _bbox4(b) -> tuple:
    return tuple(b) if len(b) == 4 else (b[0], b[1], b[3], b[4])


def _meeting(boxes: list, others: list, names: list[str]) -> list[list[str]]:
    """For each box, the names of the `others` boxes it overlaps (vectorised over `others`)."""
    if not others:
        return [[] for _ in boxes]
    o = np.asarray(others, dtype=np.float64)  # (M, 4)
    out = []
    for b in boxes:
        hit = ~((o[:, 0] >= b[2]) | (o[:, 2] <= b[0]) | (o[:, 1] >= b[3]) | (o[:, 3] <= b[1]))
        out.append([names[i] for i in np.flatnonzero(hit)])
    return out
