"""The prediction job's configuration (`olmoearth predict`, configs/predict_area.yaml) and its one validation.

`PredictConfig` is the area job's config (serve/mapping/config.py: area, sources, tiling, engine) with a
fine-tuned model and the map's outputs; the fields the model decides (patch size, modalities, and for scene
tasks the window) default to 0 / empty and are filled from the model file's task by `resolve`, which then
checks everything once (the area job's checks, then the prediction's)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from serve.mapping.config import EmbedAreaConfig, check_config


@dataclass
class PredictConfig(EmbedAreaConfig):
    """Large-area prediction job with a fine-tuned model."""

    model_uri: str = ""  # fine-tuned model file (olmoearth export of a fine-tuning run): path or s3:// URI
    modalities: list[str] = field(default_factory=list)  # modalities read from the corpus; []: the model's
    patch_size: int = 0  # encoder px per token side; 0: the model's (another value is refused)
    tile_size: int = 0  # px per tile side; 0: the model's chip size (scene tasks: always the chip size)
    overlap: int = -1  # px shared by neighbouring tiles, averaged; -1: a quarter tile (scene tasks: always 0)
    formats: list[str] = field(default_factory=lambda: ["cog"])  # outputs: cog (the map's GeoTIFFs)
    probabilities: bool = False  # also write probabilities.tif (per-class probabilities) for class tasks
    probabilities_dtype: str = "uint8"  # probabilities.tif as uint8 (p * 254, 255 nodata) or float32
    block_tokens: int = 256  # output block in map pixels per side, a multiple of 16; written in bands of it
    stac_item: bool = False  # not for prediction maps (item.json describes embedding maps)
    chips_parquet: bool = False  # not for prediction maps (chips.parquet holds embedding vectors)


def resolve(cfg: PredictConfig, task) -> PredictConfig:
    """`cfg` with the model's settings filled in (task: the model file's TaskSpec), checked: a ValueError
    naming the field."""
    scene = not task.per_pixel
    p = cfg.patch_size or task.patch_size
    tile = task.chip_size if scene else (cfg.tile_size or task.chip_size)
    overlap = 0 if scene else (cfg.overlap if cfg.overlap >= 0 else (tile // 4) // p * p)
    modalities = cfg.modalities or list(task.modalities)
    out = replace(cfg, patch_size=p, tile_size=tile, overlap=overlap, modalities=modalities)
    check_predict(out, task, given=cfg)
    return out


def check_predict(cfg: PredictConfig, task, given: PredictConfig) -> None:
    """Every check of a prediction job (after `resolve` filled the model's settings); `given`: as the user set it."""
    if not cfg.model_uri:
        raise ValueError("model_uri: a fine-tuned model file is required (olmoearth export of a fine-tuning run)")
    check_config(cfg)
    if cfg.patch_size != task.patch_size:
        raise ValueError(f"patch_size: the model {cfg.model_uri} was fine-tuned with patch_size {task.patch_size}; "
                         f"got {cfg.patch_size} (leave it 0)")  # fmt: skip
    if not task.per_pixel and (given.tile_size not in (0, task.chip_size) or given.overlap not in (-1, 0)):
        raise ValueError(f"tile_size, overlap: a {task.kind} model gives one value per window of its chip size "
                         f"({task.chip_size} px) without overlap; leave tile_size 0 and overlap -1")  # fmt: skip
    if cfg.tile_size % cfg.patch_size or cfg.overlap % cfg.patch_size or not 0 <= cfg.overlap < cfg.tile_size:
        raise ValueError(f"tile_size ({cfg.tile_size}), overlap ({cfg.overlap}): multiples of patch_size "
                         f"{cfg.patch_size} with 0 <= overlap < tile_size")  # fmt: skip
    if cfg.formats != ["cog"]:
        raise ValueError(f"formats: a prediction map is written as Cloud-Optimized GeoTIFFs; give [cog], "
                         f"got {cfg.formats}")  # fmt: skip
    if cfg.stac_item or cfg.chips_parquet:
        raise ValueError("stac_item, chips_parquet: written for embedding maps only; leave them false")
    if cfg.int8:
        raise ValueError("int8: embedding quantisation does not apply to a prediction map (see probabilities_dtype)")
    if cfg.probabilities_dtype not in ("uint8", "float32"):
        raise ValueError(f"probabilities_dtype: 'uint8' or 'float32', got {cfg.probabilities_dtype!r}")
    if cfg.probabilities and task.kind in ("regression", "pixel_regression"):
        raise ValueError(f"probabilities: a {task.kind} model predicts values (values.tif), not class probabilities")
    extra = sorted(set(cfg.modalities) - set(task.modalities))
    if cfg.source and extra:
        raise ValueError(f"modalities: {extra} are not inputs of the model (it takes {task.modalities})")
    bad = sorted(set(cfg.geotiffs) - set(task.modalities))
    if bad:
        raise ValueError(f"geotiffs: {bad} are not inputs of the model (it takes {task.modalities})")
