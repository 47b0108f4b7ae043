"""The cell-selection job's configuration (`olmoearth select-cells`, configs/select_cells.yaml) and its one
validation. The dataclass travels as itself to the Ray tasks; where the bytes live is not a field (`Storage()`
reads AWS_ENDPOINT_URL, the CLI's global `--s3_endpoint`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SelectCellsConfig:
    """Choose corpus cells from an OpenStreetMap extract by feature category."""

    # the OSM extract, local path or s3:// URI: a .osm.pbf (e.g. a Geofabrik download), or a GeoParquet
    # (.parquet, .geoparquet) / GeoPackage (.gpkg) of OSM features (GDAL's OSM layout or a `tags` column)
    osm: str = ""
    categories: str = "configs/osm_categories.yaml"  # category table YAML: category -> OSM tag filters
    out: str = ""  # output folder URI: cells.parquet, summary.csv, cells.png, report.json
    cap: int = 10000  # at most this many cells drawn per category (the original: 10,000)
    start_year: int = 2016  # first year of the time windows (the original: 2016)
    end_year: int = 2024  # last year of the time windows (the original: 2024); each window is 12 months inside
    seed: int = 0  # seed of the draw and the windows: same seed, same cells, whatever the task count
    blocks_per_task: int = 8  # PBF data blobs (~8,000 features each) read by one Ray task
    features_per_task: int = 100000  # GeoParquet / GeoPackage rows read by one Ray task (whole row groups)
    buckets: int = 0  # node / way partitions of the location join; 0: one per reading task
    partitions: int = 4  # cell-hash partitions of the candidate reduce
    map: bool = True  # also draw cells.png (the drawn cells over the extract's extent)


def osm_format(uri: str) -> str:
    """"pbf", "geoparquet" or "gpkg" by the suffix of the `osm` file; a ValueError naming it otherwise."""
    from pipelines.selection.features_table import table_kind

    if uri.lower().endswith(".pbf"):
        return "pbf"
    kind = table_kind(uri)
    if kind is None:
        raise ValueError(f"osm: {uri}: unknown format; expected an .osm.pbf extract, a GeoParquet (.parquet, "
                         f".geoparquet) or a GeoPackage (.gpkg) of OSM features")
    return kind


def check_config(cfg: SelectCellsConfig) -> None:
    """Every check of the settings, before any work: a ValueError naming the field."""
    if not cfg.osm:
        raise ValueError("osm: the OSM extract (.osm.pbf, .parquet / .geoparquet, .gpkg) is required")
    osm_format(cfg.osm)
    if not cfg.out:
        raise ValueError("out: output folder URI required")
    if not cfg.categories:
        raise ValueError("categories: a category table YAML is required")
    if cfg.cap < 1:
        raise ValueError(f"cap: at least 1 cell per category, got {cfg.cap}")
    if not 1900 <= cfg.start_year <= cfg.end_year <= 2100:
        raise ValueError(f"start_year / end_year: need 1900 <= start_year <= end_year <= 2100, got "
                         f"{cfg.start_year}..{cfg.end_year}")  # fmt: skip
    for name in ("blocks_per_task", "features_per_task", "partitions"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: at least 1, got {getattr(cfg, name)}")
    if cfg.buckets < 0:
        raise ValueError(f"buckets: 0 (one per reading task) or more, got {cfg.buckets}")
