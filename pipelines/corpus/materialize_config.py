"""The materialisation job's configuration (`olmoearth materialize`, configs/materialize.yaml) and its one
validation (`check_config`). The dataclass travels to the Ray tasks as itself. Where the bytes live is not a
field: `Storage()` reads AWS_ENDPOINT_URL (the CLI's global `--s3_endpoint`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from olmoearth.modalities import MAP_MODALITIES

STAC_MODALITIES = ("sentinel2_l2a", "sentinel1", "landsat")  # the modalities read from STAC
MAP_SOURCES = tuple(m for m in MAP_MODALITIES if m != "openstreetmap_raster")  # read from GeoTIFF mosaics


@dataclass
class MaterializeConfig:
    """Materialise cells from STAC imagery and map mosaics into the raw corpus layout."""

    # cells: one of the three
    cells: str = ""  # GeoParquet of cells (the output of olmoearth select-cells: cell_id, start_date, end_date)
    bbox: list[float] = field(default_factory=list)  # or every 2560 m cell meeting [minx, miny, maxx, maxy] in bbox_crs
    bbox_crs: str = "EPSG:4326"  # CRS of bbox: lon/lat (cells in the UTM zones of its corners) or a UTM CRS
    cell_ids: list[str] = field(default_factory=list)  # or these cells, e.g. [EPSG:32618_172_-1631]
    time_start: str = ""  # bbox / cell_ids: ISO date, first calendar month of every cell's window
    time_end: str = ""  # bbox / cell_ids: ISO date, last calendar month (at most 12 months in all)
    # imagery: a STAC catalog per modality, searched once per UTM zone and window on the driver
    stac: str = "https://earth-search.aws.element84.com/v1"  # STAC API URL or static catalog JSON URI for every modality
    stac_urls: dict = field(default_factory=dict)  # {modality: STAC URL} for modalities read from another catalog
    collections: dict = field(default_factory=dict)  # {modality: collection id}; modalities left out are not read
    assets: dict = field(default_factory=dict)  # {modality: {band: asset key}} where the catalog's names differ
    composite: str = "first"  # per month the first clear pixel by eo:cloud_cover (first) or the median
    cloud_classes: dict = field(default_factory=dict)  # {sentinel2_l2a: [SCL classes], landsat: [QA_PIXEL bits]}; {}: defaults
    # maps
    maps: dict = field(default_factory=dict)  # {map modality: GeoTIFF / COG mosaic URI} (worldcover, srtm, cdl, ...)
    osm: str = ""  # OSM extract for openstreetmap_raster: .osm.pbf, or a GeoParquet / GeoPackage of features
    # output and engine
    out: str = ""  # root URI of the raw corpus written (s3:// or a path); olmoearth build-corpus reads it
    num_cpus_per_task: float = 1.0  # Ray CPUs each cell task holds
    max_in_flight: int = 0  # most cell tasks submitted at once (bounds driver memory); 0: 4 per cluster CPU


def check_config(cfg: MaterializeConfig) -> None:
    """Every check of the job's settings, before any work: a ValueError naming the field."""
    given = [name for name, v in (("cells", cfg.cells), ("bbox", cfg.bbox), ("cell_ids", cfg.cell_ids)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of cells (GeoParquet), bbox or cell_ids; got {given or 'none'}")
    if not cfg.cells and not (cfg.time_start and cfg.time_end):
        raise ValueError(f"time_start and time_end: required with {given[0]} (ISO dates, at most 12 months)")
    if not cfg.out:
        raise ValueError("out: the root URI of the raw corpus to write is required")
    for m, coll in cfg.collections.items():
        if m not in STAC_MODALITIES:
            raise ValueError(f"collections: {m!r} is not read from STAC; use one of {', '.join(STAC_MODALITIES)}")
        if not isinstance(coll, str) or not coll:
            raise ValueError(f"collections.{m}: a collection id, got {coll!r}")
    for m in cfg.stac_urls:
        if m not in cfg.collections:
            raise ValueError(f"stac_urls.{m}: no collection given for {m} in collections")
    if cfg.collections and not (cfg.stac or len(cfg.stac_urls) == len(cfg.collections)):
        raise ValueError("stac: a STAC URL is needed for the modalities without one in stac_urls")
    for m, uri in cfg.maps.items():
        if m not in MAP_SOURCES:
            known = ", ".join(MAP_SOURCES)
            hint = " (give openstreetmap_raster's extract as osm)" if m == "openstreetmap_raster" else ""
            raise ValueError(f"maps: {m!r} is not a map read from a mosaic ({known}){hint}")
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"maps.{m}: a GeoTIFF / COG URI, got {uri!r}")
    if not (cfg.collections or cfg.maps or cfg.osm):
        raise ValueError("nothing to read: give collections (STAC imagery), maps and / or osm")
    if not cfg.collections:
        raise ValueError("collections: at least one of sentinel2_l2a, sentinel1, landsat (a sample needs one)")
    if cfg.composite not in ("first", "median"):
        raise ValueError(f"composite: first or median, got {cfg.composite!r}")
    if cfg.num_cpus_per_task <= 0:
        raise ValueError(f"num_cpus_per_task: must be > 0, got {cfg.num_cpus_per_task}")
    if cfg.max_in_flight < 0:
        raise ValueError(f"max_in_flight: must be >= 0, got {cfg.max_in_flight}")

