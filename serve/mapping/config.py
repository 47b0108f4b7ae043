"""The large-area job's configuration (`olmoearth embed`, configs/embed_area.yaml) and its one validation.

The dataclass travels as itself: the driver checks it once (`check_config`) and the Ray Data workers receive
the same object. Where the bytes live is not a field: `Storage()` reads AWS_ENDPOINT_URL (the CLI's global
`--s3_endpoint`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from olmoearth.precision import resolve_precision


@dataclass
class EmbedAreaConfig:
    """Large-area embedding job."""

    # area
    bbox: list[float] = field(default_factory=list)  # minx, miny, maxx, maxy in bbox_crs
    bbox_crs: str = "EPSG:4326"  # CRS of bbox (default lon/lat)
    crs: str | None = None  # output CRS; None: the bbox's UTM zone (lon/lat bbox across zones: one grid per zone)
    # input: a raw corpus (source) or GeoTIFFs per modality
    source: str = ""  # root URI of a raw corpus in the OlmoEarth layout (or give geotiffs)
    geotiffs: dict = field(default_factory=dict)  # {modality: [GeoTIFF URI, ...]}, T*C bands each, time-major
    modalities: list[str] = field(default_factory=lambda: ["sentinel2_l2a"])  # modalities read from the corpus
    time_start: str = ""  # ISO date; with time_end picks the corpus timesteps (<= 12 periods of 30 days)
    time_end: str = ""  # ISO date; one empty: 12 x 30 days from the other; both: the 12 x 30 days with most images
    months: list[int] = field(default_factory=list)  # GeoTIFF input: month (0-11) of each timestep (default 0..T-1)
    # input: a STAC catalog, searched once per area, its COGs read by window (pipelines/imagery/stac.py)
    stac: str = ""  # STAC API URL, or a static catalog / collection / ItemCollection JSON URI (local, s3://, http(s)://)
    collections: dict = field(default_factory=dict)  # STAC input: {modality: collection id}, e.g. {sentinel2_l2a: sentinel-2-l2a}
    assets: dict = field(default_factory=dict)  # STAC input: {modality: {band: asset key}} where the names differ from the defaults
    composite: str = "first"  # STAC input: per month the first clear pixel by eo:cloud_cover (first) or the median
    cloud_classes: dict = field(default_factory=dict)  # STAC input: {sentinel2_l2a: [SCL classes], landsat: [QA_PIXEL bits]} to drop; {}: defaults
    # model
    model_uri: str = "random:nano"  # encoder to load: exported encoder, checkpoint, v1 folder or random:<size>
    patch_size: int = 4  # px per token side, 1..8
    tile_size: int = 64  # px per tile side (the model's input size), a multiple of patch_size
    overlap: int = 16  # px shared by neighbouring tiles (blended), a multiple of patch_size
    # engine
    engine: str = "ray_data"  # ray_data (actor pool with the encoder) or serve (actors call serve_url)
    serve_url: str = ""  # endpoint of engine=serve, e.g. http://127.0.0.1:8000
    num_actors: int = 1  # encoder actors in the Ray Data pool
    batch_size: int = 4  # tiles per encoder forward
    num_cpus_per_actor: float = 1.0  # Ray CPUs each actor holds
    num_gpus_per_actor: float = 0.0  # Ray GPUs each actor holds; > 0 runs the encoder on CUDA
    torch_threads: int = 0  # torch threads per actor; 0: torch's default
    precision: str = "auto"  # encoder precision: auto (bf16 on GPU, fp32 on CPU) | bf16 (autocast) | fp32
    # output
    out: str = ""  # output folder URI (s3:// or local); also holds the per-tile results a rerun resumes from
    formats: list[str] = field(default_factory=lambda: ["cog", "zarr"])  # outputs: cog and / or zarr
    int8: bool = False  # quantise to int8 (value = q * scale, -128 nodata) instead of float32
    preview: bool = True  # also write preview.png (PCA false colour)
    preview_detile: bool = True  # the PNG leaves out the tiling's position component (serve/mapping/assemble.py)
    block_tokens: int = 64  # output block in tokens per side, a multiple of 16; the mosaic is written in bands of it
    stac_item: bool = True  # also write item.json: a STAC Item of the map (embeddings extension, derived_from links)
    chips_parquet: bool = False  # also write chips.parquet: GeoParquet, one row per chip (polygon, time, sources, mean vector)
    chip_tokens: int = 16  # chip side in tokens for chips.parquet; divides block_tokens
    sign: str = ""  # STAC input: sign asset hrefs before reading: "" (none) or planetary_computer (needs that package)


def check_config(cfg: EmbedAreaConfig) -> None:
    """Every check of a job's settings, before any work: a ValueError naming the field."""
    if len(cfg.bbox) != 4:
        raise ValueError(f"bbox: expected [minx, miny, maxx, maxy], got {cfg.bbox}")
    if not (cfg.bbox[0] < cfg.bbox[2] and cfg.bbox[1] < cfg.bbox[3]):
        raise ValueError(f"bbox: need minx < maxx and miny < maxy, got {cfg.bbox}")
    if sum(map(bool, (cfg.source, cfg.geotiffs, cfg.stac))) != 1:
        raise ValueError("give exactly one of source (raw corpus URI), geotiffs ({modality: [URIs]}) or stac (a STAC "
                         "API or catalog URI)")  # fmt: skip
    if cfg.stac:
        check_stac(cfg)
    if not cfg.out:
        raise ValueError("out: output folder URI required")
    resolve_precision(cfg.precision, "cpu")  # the field's check (the rule's owner: olmoearth/precision.py)
    if cfg.engine not in ("ray_data", "serve"):
        raise ValueError(f"engine: 'ray_data' or 'serve', got {cfg.engine!r}")
    if cfg.engine == "serve" and not cfg.serve_url:
        raise ValueError("serve_url: required with engine=serve")
    bad = set(cfg.formats) - {"cog", "zarr"}
    if bad or not cfg.formats:
        raise ValueError(f"formats: choose from cog, zarr; got {cfg.formats}")
    if not 1 <= cfg.patch_size <= 8:
        raise ValueError(f"patch_size: 1..8, got {cfg.patch_size}")
    if cfg.block_tokens < 16 or cfg.block_tokens % 16:
        raise ValueError(f"block_tokens: a multiple of 16 (the GeoTIFF's and zarr's block), got {cfg.block_tokens}")
    if cfg.chips_parquet and (cfg.chip_tokens < 1 or cfg.block_tokens % cfg.chip_tokens):
        raise ValueError(f"chip_tokens: a divisor of block_tokens ({cfg.block_tokens}), got {cfg.chip_tokens}")


def check_stac(cfg: EmbedAreaConfig) -> None:
    """The STAC input's fields (part of `check_config`)."""
    stac_modalities = ("sentinel2_l2a", "sentinel1", "landsat")
    if not cfg.collections or not isinstance(cfg.collections, dict):
        raise ValueError("collections: give {modality: collection id} with stac, e.g. {sentinel2_l2a: sentinel-2-l2a}")
    for name, value in (("collections", cfg.collections), ("assets", cfg.assets), ("cloud_classes", cfg.cloud_classes)):
        bad = sorted(set(value) - set(stac_modalities))
        if bad:
            raise ValueError(f"{name}: {bad} not among the modalities a STAC catalog feeds {list(stac_modalities)}")
    if any(not isinstance(v, dict) for v in cfg.assets.values()):
        raise ValueError(f"assets: {{modality: {{band: asset key}}}}, got {cfg.assets}")
    for m, codes in cfg.cloud_classes.items():
        if m == "sentinel1" or not isinstance(codes, list) or not all(isinstance(c, int) for c in codes):
            raise ValueError(f"cloud_classes.{m}: a list of SCL classes (sentinel2_l2a) or QA_PIXEL bits (landsat), "
                             f"got {codes!r}")  # fmt: skip
    if cfg.composite not in ("first", "median"):
        raise ValueError(f"composite: 'first' or 'median', got {cfg.composite!r}")
    if not (cfg.time_start and cfg.time_end):
        raise ValueError("time_start, time_end: both required with stac (the calendar months to composite, <= 12)")
    if cfg.sign not in ("", "planetary_computer"):
        raise ValueError(f"sign: '' or 'planetary_computer', got {cfg.sign!r}")
