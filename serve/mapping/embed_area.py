"""Embeddings for a whole area as one georeferenced map: the job's run loop.

    plan:     area (bbox in lon/lat or a CRS) -> 10 m UTM grid -> overlapping square tiles (serve/mapping/plan.py)
    encode:   Ray Data `map_batches` over the unfinished tiles with an actor pool (serve/mapping/worker.py); each
              actor reads its tiles from the source, embeds them and writes one result per encoder batch under
              out/tiles (serve/mapping/tile_store.py)
              -> resumable per tile: a rerun skips tiles some result says are "ok"; a failing tile is recorded
              and reported
    assemble: in the driver while the workers encode (serve/mapping/assemble.py): tiles blended (linear ramps over the
              overlaps) in bands of `block_tokens` token rows, each as soon as all its tiles are done, into
              out/embeddings.tif  Cloud-Optimized GeoTIFF, one band per dimension (float32, or int8 with
                                  `scale` in the metadata: value = q * scale, -128 nodata)
              out/embeddings.zarr zarr v3 by the geo-embeddings Zarr convention: `geoemb:` root attributes and
                                  a group per UTM zone (e.g. utm18/) holding (band, y, x) with x / y and CF
                                  `spatial_ref` (xarray / rioxarray read the CRS and transform; mosaic.py)
              out/preview.png     PCA false colour (first 3 components)
              out/chips.parquet   (chips_parquet) GeoParquet of per-chip mean embeddings (serve/mapping/chips.py)
              out/item.json       a STAC Item of the map, derived_from its source items (serve/mapping/stac_item.py)
              out/report.json     tiles done / skipped / failed / empty (with reasons), months without a clear
                                  pixel of written tiles (gaps), km², timings

An area given in lon/lat (no `crs`) that spans several UTM zones gets a grid per zone, embedded zone by zone into
one map (serve/mapping/zones.py): a zarr group per zone, embeddings_<zone>.tif and preview_<zone>.png.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict

from pipelines.common.faults import fault_plan
from pipelines.common.storage import Storage, join
from pipelines.imagery.grid import Grid, Tile
from serve.mapping.config import EmbedAreaConfig, check_config
from serve.mapping.plan import check_manifest, job_signature, make_source, plan, plan_zones
from serve.mapping.tile_store import finished_tiles
from serve.mapping.worker import TileWorker


def embed_area(cfg: EmbedAreaConfig) -> dict:
    """Run the whole job; returns the report (also written to out/report.json)."""
    check_config(cfg)
    storage = Storage()
    t_start = time.time()
    zones = plan_zones(cfg)
    if zones:  # an area across UTM zones: a grid per zone (serve/mapping/zones.py)
        from serve.mapping.zones import embed_zones

        return embed_zones(cfg, storage, zones, t_start)
    grid, tiles = plan(cfg)
    source = make_source(cfg, storage, grid)  # finds and checks the input on the driver, before any work
    check_manifest(storage, cfg, job_signature(cfg, grid))
    done = finished_tiles(storage, cfg.out)
    todo = [t for t in tiles if done.get(t.id, {}).get("status") != "ok"]
    # the mosaic is blended band by band in this driver while the workers encode (serve/mapping/assemble.py)
    workdir = tempfile.mkdtemp(prefix="olmoearth-mosaic-")
    items = list(getattr(source, "items", []))  # STAC records: the map's derived_from and chips' source ids
    # a STAC source ships its items to the workers partitioned by tile block (through the object store)
    spec = source.spec(todo, grid) if items and todo else source.spec()
    try:
        rows, outputs, seconds = encode_and_assemble(cfg, storage, grid, tiles, todo, spec, done, workdir,
                                                     source_items=items)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if cfg.stac_item:
        from serve.mapping.plan import signature_hash
        from serve.mapping.stac_item import write_item

        outputs["stac_item"] = write_item(storage, cfg, grid, outputs, seconds["dim"], seconds["scale"], items,
                                          f"olmoearth-embeddings-{signature_hash(job_signature(cfg, grid))}")  # fmt: skip
    report = make_report(cfg, grid, tiles, todo, done, rows, outputs, seconds, t_start)
    storage.write_text(join(cfg.out, "report.json"), json.dumps(report, indent=1))
    return report


def encode_and_assemble(cfg: EmbedAreaConfig, storage: Storage, grid: Grid, tiles: list[Tile], todo: list[Tile],
                        source_spec: dict, done: dict, workdir: str, mosaic=None,
                        source_items: list[dict] | None = None, desc: str = "embedding"
                        ) -> tuple[list[dict], dict, dict]:  # fmt: skip
    """Encode `todo` while blending every result into the mosaic; `done` gains each tile's final status.
    mosaic: the blend to feed (default the embedding StreamingMosaic; `olmoearth predict` gives its class map's).
    source_items: the STAC records of the area (chips.parquet's source ids). desc: the progress bar's label.
    -> (the workers' rows, {kind: uri} of the outputs, seconds (and the time the encode stage began, and the
    map's embedding dimension `dim` and int8 `scale` (None: float32)))."""
    from serve.mapping.assemble import StreamingMosaic

    mosaic = mosaic or StreamingMosaic(cfg, grid, tiles, storage, workdir)
    rows, seconds = encode_into(cfg, grid, tiles, todo, source_spec, done, mosaic, source_items, desc)
    t_asm = time.time()
    outputs = mosaic.finish()
    seconds["assemble"] = time.time() - t_asm
    writer = getattr(mosaic, "writer", None)
    seconds["dim"], seconds["scale"] = getattr(writer, "dim", None), getattr(writer, "scale", None)
    return rows, outputs, seconds


def encode_into(cfg: EmbedAreaConfig, grid: Grid, tiles: list[Tile], todo: list[Tile], source_spec: dict,
                done: dict, mosaic, source_items: list[dict] | None, desc: str) -> tuple[list[dict], dict]:  # fmt: skip
    """The encode stage of `encode_and_assemble`: every result blended into `mosaic` as it arrives (the mosaic
    is not finished) -> (the workers' rows, seconds)."""
    from tqdm import tqdm

    skipped = len(tiles) - len(todo)
    # counted in tiles (km² summed per tile would overshoot the total by rounding)
    bar = tqdm(total=len(tiles), unit="tile", desc=f"{desc} {grid.area_km2:.1f} km²", initial=skipped)
    mosaic.source_items = list(source_items or [])
    for tile_id, st in done.items():  # finished by an earlier run (the others are encoded again now)
        if st.get("status") == "ok":
            mosaic.add(tile_id, st)

    def on_done(row):
        st = {"status": row["status"], "error": row["error"], "max_abs": row["max_abs"], "file": row["file"]}
        if done.get(row["tile"], {}).get("status") != "ok":
            done[row["tile"]] = st
        mosaic.add(row["tile"], st)
        bar.update(1)
        bar.set_postfix_str(f"{row['tile']} {row['status']}")

    t_enc = time.time()
    rows = run_tiles(cfg, grid, source_spec, todo, on_done)
    bar.close()
    return rows, {"encode_start": t_enc, "encode": time.time() - t_enc, "assemble_streamed": mosaic.seconds}


def run_tiles(cfg: EmbedAreaConfig, grid: Grid, source_spec: dict, todo: list[Tile], on_done) -> list[dict]:
    """Encode `todo` with Ray Data (actor pool); calls on_done(row) as results arrive."""
    import ray
    from ray.data import ActorPoolStrategy

    if not todo:
        return []
    ray.data.DataContext.get_current().enable_progress_bars = False  # the km² bar tells progress
    items = [{"row": t.row, "col": t.col, "x": t.x, "y": t.y, "size": t.size} for t in todo]
    # a call (one block) holds up to 4 encoder batches, so reads and writes overlap the encoder inside it, but
    # every actor still gets a few calls (and the progress bar moves)
    b = max(1, cfg.batch_size)
    per_call = b * max(1, min(4, len(items) // (2 * b * max(1, cfg.num_actors))))
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // per_call)))
    resources = {"num_cpus": cfg.num_cpus_per_actor}
    if cfg.num_gpus_per_actor:
        resources["num_gpus"] = cfg.num_gpus_per_actor
    # the config and grid travel as themselves; the fault plan (tests only) beside them
    worker_args = {"cfg": cfg, "grid": grid, "source_spec": source_spec, "faults": fault_plan()}
    ds = ds.map_batches(TileWorker, fn_constructor_kwargs=worker_args,
                        # two calls in flight per actor, run concurrently (TileWorker: they share the encoder)
                        compute=ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=2,
                                                  max_concurrent_calls_per_actor=2,
                                                  enable_true_multi_threading=True),
                        batch_size=per_call, batch_format="numpy", **resources)  # fmt: skip
    rows = []
    for row in ds.iter_rows():
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        rows.append(row)
        on_done(row)
    return rows


def make_report(cfg: EmbedAreaConfig, grid: Grid, tiles: list[Tile], todo: list[Tile], done: dict,
                rows: list[dict], outputs: dict, seconds: dict, t_start: float) -> dict:  # fmt: skip
    """report.json: what was encoded, skipped, failed or empty, where the outputs are, and where time went."""
    per_tile_km2 = grid.area_km2 / len(tiles)
    missing = {t.id: done.get(t.id, {"status": "failed", "error": "no result written"}) for t in tiles
               if done.get(t.id, {}).get("status") != "ok"}  # fmt: skip
    first = min((r["t_start"] for r in rows), default=None)
    t_enc, t_setup = seconds["encode"], seconds["encode_start"] - t_start
    return {
        "grid": asdict(grid), "area_km2": grid.area_km2, "tiles": len(tiles), "encoded": len(rows),
        "skipped_finished": len(tiles) - len(todo),
        "failed": {k: v.get("error", "") for k, v in missing.items() if v.get("status") == "failed"},
        "empty": sorted(k for k, v in missing.items() if v.get("status") == "empty"),
        # written tiles with months whose scenes had no clear pixel (StacSource): modality, month, item ids
        "gaps": {t.id: done[t.id]["error"] for t in tiles if done.get(t.id, {}).get("status") == "ok"
                 and done[t.id].get("error")},
        "outputs": outputs, "engine": cfg.engine,
        # assemble: after the last tile; assemble_streamed: blending done in the driver during the encode stage
        "seconds": {"total": time.time() - t_start, "setup": t_setup, "encode": t_enc,
                    "assemble": seconds["assemble"], "assemble_streamed": seconds["assemble_streamed"],
                    # from the start of the encode stage until a worker began its first call: Ray Data and actor
                    # start-up, actor construction (encoder build) included
                    "startup": (first - seconds["encode_start"]) if first else None,
                    "actor_init": max((r["actor_init_s"] for r in rows), default=None),
                    "worker_read": sum(r["read_s"] for r in rows), "worker_embed": sum(r["embed_s"] for r in rows),
                    "worker_write": sum(r["write_s"] for r in rows),
                    "worker_write_wait": sum(r["write_wait_s"] for r in rows),
                    # start-up and tail of the whole job: job start to the first finished tile, last finished
                    # tile to the report (the rest of the blend, the mosaic's files)
                    "first_tile": (min(r["t_done"] for r in rows) - t_start) if rows else None,
                    "after_last_tile": (time.time() - max(r["t_done"] for r in rows)) if rows else None},
        "km2_per_s_encode": (len(rows) * per_tile_km2 / t_enc) if rows and t_enc > 0 else None,
        # after start-up (actors built, first tile out): the rate a long job runs at
        "km2_per_s_steady": steady_rate(rows, per_tile_km2),
    }  # fmt: skip


def steady_rate(rows: list[dict], per_tile_km2: float) -> float | None:
    """km² per second from the end of the first call of a worker to the end of the last one, timed in the
    workers (start-up of actors and encoder excluded): the rate a long job runs at."""
    ts = sorted(r["t_done"] for r in rows)
    later = [t for t in ts if t > ts[0]]
    if not later:
        return None
    return len(later) * per_tile_km2 / (later[-1] - ts[0])


def print_summary(report: dict, keys: tuple[str, ...]) -> int:
    """An area job's CLI ending: the report's `keys` as JSON on stdout, its warnings and failed tiles on
    stderr -> the exit code (1 when a tile failed: rerunning the same command retries only those)."""
    import sys

    print(json.dumps({k: report[k] for k in keys}, indent=1))
    for w in report.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if report["failed"]:
        print(f"{len(report['failed'])} tile(s) failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0
