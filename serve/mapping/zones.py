"""An area job over several UTM zones: the area given in lon/lat (no `crs`) is cut at the zone meridians and the
equator (serve/mapping/plan.py `plan_zones`), and each part is embedded on its own zone's 10 m grid, so no part
is warped into a far zone's CRS. One map, zone by zone:

    sources:  every zone's source found and checked on the driver before any work (a STAC search per zone)
    encode:   each zone through the same encode stage as a one-grid job (embed_area.encode_into: a Ray Data
              actor pool, results blended while they arrive); its tile results live under
              out/zones/<zone>/tiles, so tile ids never meet across zones and a rerun skips every zone's finished
              tiles (one manifest, out/manifest.json, holds every zone's grid)
    outputs:  out/embeddings.zarr        one group per zone (utm17/, utm18/, ...), listed in `olmoearth:groups`
              out/embeddings_<zone>.tif  one COG per zone, in that zone's CRS
              out/preview_<zone>.png     one preview per zone
              out/chips.parquet          one table, each row with its zone's grid_crs and a zone-prefixed chip id
              out/item.json              one asset per zone COG (serve/mapping/stac_item.py write_zones_item)
              out/report.json            the totals, and per zone its grid and tiles (encoded / skipped / failed /
                                         empty); failed and empty tiles named <zone>/<tile id>

int8 maps share one scale over all zones (the zarr's root `geoemb:quantization` is one scalar): every zone is
encoded before any is finished (an int8 mosaic is written in finish() anyway)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace

from pipelines.common.storage import Storage, join
from pipelines.imagery.grid import Tile
from serve.mapping.assemble import StreamingMosaic, upload
from serve.mapping.config import EmbedAreaConfig
from serve.mapping.embed_area import encode_into, make_report
from serve.mapping.plan import Zone, check_manifest, make_source, signature_hash, zones_signature
from serve.mapping.tile_store import finished_tiles

ZONE_REPORT_KEYS = ("grid", "area_km2", "tiles", "encoded", "skipped_finished", "failed", "empty", "gaps")


@dataclass
class ZoneRun:
    """One zone's encode stage: its config (out = the zone's folder of tile results), tiles and results."""

    zone: Zone
    cfg: EmbedAreaConfig
    todo: list[Tile]
    done: dict
    rows: list[dict]
    seconds: dict
    mosaic: StreamingMosaic
    items: list[dict]


def zone_out(cfg: EmbedAreaConfig, zone: Zone) -> str:
    return join(cfg.out, "zones", zone.name)


def embed_zones(cfg: EmbedAreaConfig, storage: Storage, zones: list[Zone], t_start: float) -> dict:
    """Run the job over every zone -> the report (also written to out/report.json)."""
    sources = [make_source(cfg, storage, z.grid) for z in zones]  # all inputs checked before any work
    sig = zones_signature(cfg, zones)
    check_manifest(storage, cfg, sig)
    workdir = tempfile.mkdtemp(prefix="olmoearth-mosaic-")
    try:
        runs = [encode_zone(cfg, storage, z, s, workdir) for z, s in zip(zones, sources, strict=True)]
        outputs = upload(storage, cfg.out, finish_zones(runs, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    written = [r for r in runs if r.mosaic.writer is not None]
    if cfg.stac_item:
        from serve.mapping.stac_item import write_zones_item

        writer = written[0].mosaic.writer
        items = [i for r in runs for i in r.items]
        outputs["stac_item"] = write_zones_item(storage, cfg, {r.zone.name: r.zone.grid for r in written}, outputs,
                                                writer.dim, writer.scale, items,
                                                f"olmoearth-embeddings-{signature_hash(sig)}")  # fmt: skip
    report = zones_report(cfg, runs, outputs, t_start)
    storage.write_text(join(cfg.out, "report.json"), json.dumps(report, indent=1))
    return report


def encode_zone(cfg: EmbedAreaConfig, storage: Storage, zone: Zone, source, workdir: str) -> ZoneRun:
    """Encode the zone's unfinished tiles into its streaming mosaic (not finished yet)."""
    zcfg = replace(cfg, out=zone_out(cfg, zone))
    done = finished_tiles(storage, zcfg.out)
    todo = [t for t in zone.tiles if done.get(t.id, {}).get("status") != "ok"]
    items = list(getattr(source, "items", []))
    spec = source.spec(todo, zone.grid) if items and todo else source.spec()
    folder = os.path.join(workdir, zone.name)
    os.makedirs(folder)
    mosaic = StreamingMosaic(zcfg, zone.grid, zone.tiles, storage, folder, zone=zone.name,
                             zarr_path=os.path.join(workdir, "embeddings.zarr"))  # fmt: skip
    rows, seconds = encode_into(zcfg, zone.grid, zone.tiles, todo, spec, done, mosaic, items, f"embedding {zone.name}")
    return ZoneRun(zone, zcfg, todo, done, rows, seconds, mosaic, items)


def finish_zones(runs: list[ZoneRun], workdir: str) -> dict[str, str]:
    """Finish every zone with data (one int8 scale for all) -> {kind: local path}: zarr (shared), cog_<zone>,
    preview_<zone>, chips (the zones' tables merged). A zone without any ok tile writes nothing (its tiles are
    in the report); no zone with data is an error."""
    written = [r for r in runs if r.mosaic.has_data()]
    if not written:
        n = sum(len(r.zone.tiles) for r in runs)
        raise RuntimeError(f"no tile of {n} in zones {[r.zone.name for r in runs]} was embedded; see report.json "
                           f"and {runs[0].cfg.out}/tiles/*.json of each zone")  # fmt: skip
    if runs[0].cfg.int8:
        max_abs = max(r.mosaic.max_abs() for r in written)
        for r in written:
            r.mosaic.int8_max_abs = max_abs
    local, chips = {}, []
    for r in runs:
        r.seconds["assemble"] = 0.0
        if r not in written:
            continue
        t0 = time.time()
        for kind, path in r.mosaic.finish(upload_files=False).items():
            if kind == "chips":
                chips.append(path)
            else:
                local[kind if kind == "zarr" else f"{kind}_{r.zone.name}"] = path
        r.seconds["assemble"] = time.time() - t0
    if chips:
        from serve.mapping.chips import merge_chip_files

        local["chips"] = merge_chip_files(chips, os.path.join(workdir, "chips.parquet"))
    return local


def zones_report(cfg: EmbedAreaConfig, runs: list[ZoneRun], outputs: dict, t_start: float) -> dict:
    """report.json of a job over several zones: totals (tiles named <zone>/<tile id>) and each zone's own."""
    zones = {}
    for r in runs:
        rep = make_report(r.cfg, r.zone.grid, r.zone.tiles, r.todo, r.done, r.rows, {}, r.seconds, t_start)
        zones[r.zone.name] = {k: rep[k] for k in ZONE_REPORT_KEYS}
    rows = [row for r in runs for row in r.rows]
    t_enc = sum(r.seconds["encode"] for r in runs)
    km2 = sum(z["area_km2"] for z in zones.values())
    tiles = sum(z["tiles"] for z in zones.values())
    return {
        "zones": zones, "crs": [z["grid"]["crs"] for z in zones.values()], "area_km2": km2, "tiles": tiles,
        "encoded": len(rows), "skipped_finished": sum(z["skipped_finished"] for z in zones.values()),
        "failed": {f"{n}/{k}": v for n, z in zones.items() for k, v in z["failed"].items()},
        "empty": [f"{n}/{k}" for n, z in zones.items() for k in z["empty"]],
        "gaps": {f"{n}/{k}": v for n, z in zones.items() for k, v in z["gaps"].items()},
        "outputs": outputs, "engine": cfg.engine,
        "seconds": {"total": time.time() - t_start, "encode": t_enc,
                    "assemble": sum(r.seconds["assemble"] for r in runs),
                    "assemble_streamed": sum(r.seconds["assemble_streamed"] for r in runs),
                    "worker_read": sum(r["read_s"] for r in rows), "worker_embed": sum(r["embed_s"] for r in rows),
                    "worker_write": sum(r["write_s"] for r in rows)},
        "km2_per_s_encode": (sum(len(r.rows) * r.zone.grid.area_km2 / len(r.zone.tiles) for r in runs) / t_enc)
        if rows and t_enc > 0 else None,
    }  # fmt: skip
