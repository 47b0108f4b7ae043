"""`olmoearth select-cells`: choose corpus cells from an OpenStreetMap extract by feature category (logic in
pipelines/selection/job.py).

    olmoearth select-cells --config configs/select_cells.yaml --osm finland-latest.osm.pbf --out s3://bucket/cells

--osm is an .osm.pbf extract, or a GeoParquet (.parquet, .geoparquet) / GeoPackage (.gpkg) of OSM features:
GDAL's OSM layout (`ogr2ogr out.gpkg extract.osm.pbf`: tag columns plus `other_tags`) or a `tags` column (JSON
object or map). Writes cells.parquet (the cells for materialisation), summary.csv, cells.png and report.json
under --out and prints the per-category table. Exits 2 on bad input (an unreadable PBF or table, a table
without tags, an unknown file type, an unknown tag in the category table)."""

from __future__ import annotations

import sys

from pipelines.common.config import load_config
from pipelines.common.ray_start import init_ray


def main(argv: list[str] | None = None) -> int:
    from pipelines.selection.config import SelectCellsConfig, check_config
    from pipelines.selection.job import select_cells

    cfg = load_config(SelectCellsConfig, argv, description=__doc__)
    try:
        check_config(cfg)
        from pipelines.selection import features_table
        from pipelines.selection.categories import load_table
        from pipelines.selection.config import osm_format
        from pipelines.selection.pbf import index_blobs

        load_table(cfg.categories)  # bad tables and unreadable files fail here, before Ray starts
        if osm_format(cfg.osm) == "pbf":
            index_blobs(cfg.osm)
        else:
            features_table.plan(cfg.osm, cfg.features_per_task)
    except (ValueError, FileNotFoundError) as e:
        print(f"select-cells: {e}", file=sys.stderr)
        return 2
    init_ray()
    report = select_cells(cfg)
    print(report["summary_text"])
    print(f"{report['cells']} cells from {report['features_read_total']} features "
          f"({report['relations_skipped']} matching relations skipped) -> {cfg.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
