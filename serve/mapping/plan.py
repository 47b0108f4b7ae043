"""What an area job will do, settled on the driver before any work: the area's 10 m UTM grid and its tiles,
the pixel source (found and checked once, then rebuilt on every worker from its spec), and the manifest that
keeps a rerun from mixing in the tiles of a different job.

An area given in lon/lat without `crs` that spans several UTM zones (or both sides of the equator) is planned
as one sub-area per zone (`plan_zones`): each with its own grid and tiles in its zone's CRS."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from pipelines.common.storage import Storage, join
from pipelines.corpus.source import CorpusSource
from pipelines.imagery.grid import Grid, Tile, area_grid, bbox_to_crs, make_tiles, utm_zone_parts
from pipelines.imagery.sources import GeoTiffSource, ImageSource
from pipelines.imagery.stac import StacSource
from serve.mapping.config import EmbedAreaConfig

SOURCE_KINDS = {"geotiffs": GeoTiffSource, "corpus": CorpusSource, "stac": StacSource}  # spec()["kind"] -> source class


def plan(cfg: EmbedAreaConfig) -> tuple[Grid, list[Tile]]:
    """The area's grid (corners snapped to whole tokens) and the tiles that cover it."""
    crs, (x0, y0), w, h = area_grid(tuple(cfg.bbox), cfg.bbox_crs, cfg.crs, 10.0, snap=10.0 * cfg.patch_size)
    grid = Grid(crs, x0, y0, w, h)
    return grid, make_tiles(grid, cfg.tile_size, cfg.overlap, cfg.patch_size)


@dataclass(frozen=True)
class Zone:
    """One UTM zone's part of an area spanning several."""

    name: str  # zarr group and file suffix: utm17, utm18s (serve/mapping/mosaic.zone_group_name)
    grid: Grid
    tiles: list[Tile]


def plan_zones(cfg: EmbedAreaConfig) -> list[Zone] | None:
    """The area cut at the UTM zone meridians and the equator, one grid per part (corners snapped as in
    `plan`); None when `crs` is given or the bbox lies in one zone (then `plan` is the job's one grid)."""
    from serve.mapping.mosaic import zone_group_name

    if cfg.crs is not None:
        return None
    lonlat = cfg.bbox if cfg.bbox_crs.upper() in ("EPSG:4326", "OGC:CRS84") else bbox_to_crs(cfg.bbox, cfg.bbox_crs, "EPSG:4326")
    parts = utm_zone_parts(lonlat)
    if len(parts) < 2:
        return None
    zones = []
    for crs, box in parts:
        _, (x0, y0), w, h = area_grid(box, "EPSG:4326", crs, 10.0, snap=10.0 * cfg.patch_size)
        grid = Grid(crs, x0, y0, w, h)
        zones.append(Zone(zone_group_name(crs), grid, make_tiles(grid, cfg.tile_size, cfg.overlap, cfg.patch_size)))
    return zones


def refuse_zones(cfg: EmbedAreaConfig, job: str) -> None:
    """For jobs that map one grid only: a ValueError naming the zones of a bbox that spans several."""
    zones = plan_zones(cfg)
    if zones:
        raise ValueError(f"bbox {list(cfg.bbox)} spans {len(zones)} UTM zones ({', '.join(z.name for z in zones)}); "
                         f"{job} maps one grid: give crs (e.g. --crs {zones[0].grid.crs}) or one bbox per zone")


def make_source(cfg: EmbedAreaConfig, storage: Storage, grid: Grid) -> ImageSource:
    """The job's pixel source, on the driver: finds and checks the input files of the area."""
    if cfg.geotiffs:
        return GeoTiffSource(cfg.geotiffs, cfg.months or None, storage)
    if cfg.stac:  # the item search, once for the whole area
        return StacSource(cfg.stac, cfg.collections, storage, cfg.time_start, cfg.time_end, grid=grid,
                          assets=cfg.assets, composite=cfg.composite, cloud_classes=cfg.cloud_classes,
                          sign=cfg.sign)  # fmt: skip
    return CorpusSource(cfg.source, cfg.modalities, storage, cfg.time_start, cfg.time_end, grid=grid)


def source_from_spec(spec: dict, storage: Storage) -> ImageSource:
    """A worker's copy of the driver's source (`source.spec()`), without listing or opening files."""
    return SOURCE_KINDS[spec["kind"]].from_spec(spec, storage)


def job_signature(cfg: EmbedAreaConfig, grid: Grid) -> dict:
    """What makes tile results reusable by a rerun: same grid, tiles, model and inputs."""
    return {"grid": asdict(grid), "tile_size": cfg.tile_size, "overlap": cfg.overlap, "patch_size": cfg.patch_size,
            "model_uri": cfg.model_uri, "source": cfg.source, "geotiffs": cfg.geotiffs, "modalities": cfg.modalities,
            "time": [cfg.time_start, cfg.time_end], "months": cfg.months,
            # only with STAC input, so that the manifests of earlier jobs still match
            **({"stac": [cfg.stac, cfg.collections, cfg.assets, cfg.composite, cfg.cloud_classes]} if cfg.stac else {})}  # fmt: skip


def zones_signature(cfg: EmbedAreaConfig, zones: list[Zone]) -> dict:
    """job_signature of a job over several zones: every zone's grid."""
    return {**job_signature(cfg, zones[0].grid), "grid": {z.name: asdict(z.grid) for z in zones}}


def signature_hash(sig: dict) -> str:
    return hashlib.sha1(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_manifest(storage: Storage, cfg: EmbedAreaConfig, sig: dict) -> None:
    """out/manifest.json: written by the first run; a later run into the same folder must match it."""
    uri = join(cfg.out, "manifest.json")
    if storage.exists(uri):
        old = json.loads(storage.read_text(uri))
        diff = sorted(k for k in set(old["signature"]) | set(sig) if old["signature"].get(k) != sig.get(k))
        if diff:
            raise ValueError(f"out {cfg.out} holds tiles of a different job (differs in {diff}); use a new out "
                             "folder or delete the old one")  # fmt: skip
    else:
        storage.makedirs(cfg.out)
        storage.write_text(uri, json.dumps({"signature": sig, "signature_hash": signature_hash(sig)}, indent=1))
