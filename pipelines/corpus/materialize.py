"""Materialisation: cells + STAC imagery + map mosaics + an OSM extract -> the raw corpus layout that
`olmoearth build-corpus` reads (`olmoearth materialize`, ray_jobs/materialize.py).

    report = materialize(MaterializeConfig(cell_ids=["EPSG:32618_172_-1631"], time_start="2022-01-01",
                                           time_end="2022-12-31", collections={"sentinel2_l2a": "sentinel-2-l2a"},
                                           out="s3://raw"))

The driver:
1. reads the cells (`pipelines.corpus.cells`: the selection's GeoParquet, a bbox or a cell list) and lists the
   done markers once: a cell with a marker is finished and skipped (a rerun resumes); one listing of the
   output finds what earlier unfinished attempts left, for their tasks to remove;
2. rasterises the OSM extract (if given) into each cell's OSM raster in one Ray Data stage
   (`pipelines.corpus.osm_stage`: features -> the cells they meet -> grouped by cell -> one file per cell);
3. per (UTM zone, window) group of the remaining cells and per STAC modality, searches the catalog once
   (`StacSource` over the group's extent) and hands each cell only the item records whose footprint meets it
   (none: the modality is absent for that cell, "no item"); the task descriptions are made as tasks are
   submitted, so the driver holds one group's records and `max_in_flight` tasks' descriptions, not every cell's;
4. runs the cells in Ray tasks of a few consecutive (neighbouring) cells each (`pipelines.corpus.materialize_cell`:
   a cell's uploads overlap the next cell's reads), a progress bar in cells; a task holds about one cell's
   arrays at a time (about 100 MB for 12 months of S2 + Landsat + S1), whatever the job's size;
5. assembles each temporal modality's timestep CSV from the markers of every finished cell (earlier runs'
   read back, this run's from the tasks' results; the tasks never write a shared file; rows of samples that
   are not this job's, in a corpus materialised into, are kept),
   then `<out>/materialize_report.json`: cells written, skipped (done before), empty (no imagery), failed
   (cell, modality, item, asset, error), and per cell the modalities absent and why.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import numpy as np

from olmoearth.modalities import MODALITIES, TILE_METRES
from pipelines.common.faults import fault_plan
from pipelines.common.iterables import grouped
from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.cells import CellRecord, cells_from_bbox, cells_from_ids, cells_from_parquet
from pipelines.corpus.materialize_cell import DONE_FOLDER, materialize_cells, timestep_rows
from pipelines.corpus.materialize_config import MaterializeConfig, check_config
from pipelines.corpus.osm_stage import write_osm_rasters
from pipelines.imagery.grid import Grid

log = logging.getLogger(__name__)
REPORT_FILE = "materialize_report.json"


def load_cells(cfg: MaterializeConfig, storage: Storage) -> list[CellRecord]:
    if cfg.cells:
        return cells_from_parquet(cfg.cells, storage)
    if cfg.bbox:
        return cells_from_bbox(list(cfg.bbox), cfg.time_start, cfg.time_end, cfg.bbox_crs)
    return cells_from_ids(list(cfg.cell_ids), cfg.time_start, cfg.time_end)


def out_names(out: str, storage: Storage) -> set[str]:
    """Names of the folders and files at the top of `out` (one listing): which of the listings below, and
    which timestep CSVs, there is anything to find in (a fresh output has none)."""
    try:
        names = storage.fs(out).ls(out, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return {n.rstrip("/").rsplit("/", 1)[-1] for n in names}


def done_cells(out: str, storage: Storage, top: set[str] | None = None) -> set[str]:
    """Sample ids with a done marker under `out` (one listing; none when `top`, the names at the top of
    `out`, has no marker folder)."""
    if top is not None and DONE_FOLDER.split("/")[0] not in top:
        return set()
    fs, uri = storage.fs(out), join(out, DONE_FOLDER)
    try:
        names = fs.ls(uri, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return {n.rstrip("/").rsplit("/", 1)[-1][: -len(".json")] for n in names if n.endswith(".json")}


def materialize(cfg: MaterializeConfig, storage: Storage | None = None) -> dict:
    """Run the job (needs ray.init for the cell tasks) -> the report (also written to <out>/materialize_report.json)."""
    check_config(cfg)
    storage = storage or Storage()
    t0 = time.time()
    cells = load_cells(cfg, storage)
    if not cells:
        raise ValueError("no cell to materialise: the cells given are empty")
    storage.makedirs(cfg.out)
    top = out_names(cfg.out, storage)
    done = done_cells(cfg.out, storage, top)
    todo = [c for c in cells if c.sid not in done]
    stale = files_by_cell(cfg.out, storage, {c.sid for c in todo}, keep_osm=bool(cfg.osm), top=top)
    # the OSM raster: one Ray Data stage over the extract, before the cell tasks (which write the rest)
    with_features = write_osm_rasters(cfg, todo, storage) if cfg.osm else set()
    results, failed = run_cells(plan_jobs(cfg, todo, storage, stale, with_features), len(todo), cfg, storage)
    # every finished cell's marker: those of earlier runs read back, this run's from its results
    markers = read_markers(cfg.out, storage, done)
    for r in results:
        markers[r["sid"]] = {"sid": r["sid"], "absent": r["absent"], "rows": timestep_rows(r["start"], r["months"])}
    write_timestep_csvs(cfg.out, storage, markers, {c.sid for c in cells}, top)
    report = make_report(cfg, cells, done, results, failed, markers, time.time() - t0)
    storage.write_text(join(cfg.out, REPORT_FILE), json.dumps(report, indent=1))
    return report


# ---- planning on the driver -------------------------------------------------------------------------------


def plan_jobs(cfg: MaterializeConfig, cells: list[CellRecord], storage: Storage, stale: dict | None = None,
              with_osm: set | None = None) -> Iterator[dict]:  # fmt: skip
    """One task description per cell, made as the tasks are submitted (the driver holds one group's item
    records, not every cell's): its source specs (the items meeting it), what is absent already, the files an
    earlier attempt left, whether the OSM stage wrote its raster. Searches once per (zone, window) group and
    STAC modality."""
    faults, stale, with_osm = fault_plan(), stale or {}, with_osm or set()
    groups: dict[tuple, list[CellRecord]] = {}
    for c in cells:
        groups.setdefault((c.epsg, c.start, c.end), []).append(c)
    for (epsg, start, end), group in groups.items():
        found = {m: search_group(cfg, m, coll, group, storage) for m, coll in cfg.collections.items()}
        fps = {m: footprints(spec["items"], f"EPSG:{epsg}") for m, (spec, _) in found.items() if spec}
        for c in group:
            sources, absent = {}, {}
            left, bottom, right, top = rl.cell_bounds(c.col, c.row)
            for m, (spec, why) in found.items():
                mine = []
                if spec:
                    fp = fps[m]
                    meets = ~((fp[:, 0] >= right) | (fp[:, 2] <= left) | (fp[:, 1] >= top) | (fp[:, 3] <= bottom))
                    mine = [r for r, ok in zip(spec["items"], meets, strict=True) if ok]
                if mine:
                    sources[m] = {**spec, "items": mine}
                else:
                    absent[m] = why or f"no item: no scene of {cfg.collections[m]} meets the cell in {start}..{end}"
            yield {"cell": c, "cfg": cfg, "sources": sources, "absent": absent, "stale": stale.get(c.sid, []),
                   "osm_written": c.sid in with_osm, "faults": faults}  # fmt: skip


def footprints(items: list[dict], crs: str) -> np.ndarray:
    """(n, 4) left, bottom, right, top in `crs` of each item record (`item_bounds`: exact from the item's
    projection fields when it has them)."""
    from pipelines.imagery.stac_items import item_bounds

    return np.array([item_bounds(rec, crs) for rec in items], float).reshape(len(items), 4)


def files_by_cell(out: str, storage: Storage, sids: set[str], keep_osm: bool,
                  top: set[str] | None = None) -> dict[str, list[str]]:  # fmt: skip
    """sid -> the relative paths of files already under `out` for these (unfinished) cells: one listing per
    modality folder, so a task removes what an earlier attempt left without probing each name. keep_osm: the
    OSM raster is left out (this run's OSM stage rewrites it before the cell tasks run). `top`: the names at
    the top of `out`; without a raw folder among them there is nothing to list."""
    folders = {m.raw_folder for m in MODALITIES.values()} | {rl.LABELS_FOLDER}
    if top is not None and not folders & top:
        return {}
    out_files: dict[str, list[str]] = {}
    for sid, by_modality in rl.list_samples_lenient(out, storage)[0].items():
        if sid in sids:  # folder/name of each file
            out_files[sid] = ["/".join(u.rsplit("/", 2)[-2:]) for m, uris in by_modality.items() for u in uris
                              if not (keep_osm and m == "openstreetmap_raster")]  # fmt: skip
    return out_files


def search_group(cfg: MaterializeConfig, modality: str, collection: str, group: list[CellRecord],
                 storage: Storage) -> tuple[dict | None, str | None]:  # fmt: skip
    """(the StacSource spec of one modality over the group's extent, None) or (None, why it has no item)."""
    from pipelines.imagery.stac import StacSource

    cols, rows = [c.col for c in group], [c.row for c in group]
    left, top = min(cols) * TILE_METRES, -min(rows) * TILE_METRES
    grid = Grid(group[0].crs, left, top, (max(cols) - min(cols) + 1) * rl.TILE_SIZE,
                (max(rows) - min(rows) + 1) * rl.TILE_SIZE)  # fmt: skip
    url = cfg.stac_urls.get(modality, cfg.stac)
    try:
        src = StacSource(url, {modality: collection}, storage, group[0].start, group[0].end, grid=grid,
                         assets=cfg.assets, composite=cfg.composite, cloud_classes=cfg.cloud_classes)  # fmt: skip
    except ValueError as e:
        if "no item of collection" in str(e):  # nothing there: absent, not an error of the job
            return None, f"no item: {e}"
        raise
    return src.spec(), None


# ---- running the cells ------------------------------------------------------------------------------------


CELLS_PER_TASK = 8  # most cells of one task (neighbours: one worker's open scenes serve them all)


def cells_per_task(total: int, cpus: float) -> int:
    """Cells per Ray task: up to CELLS_PER_TASK, while every CPU still gets a few tasks to balance the load."""
    return max(1, min(CELLS_PER_TASK, int(total // (2 * max(cpus, 1)))))


def run_cells(jobs: Iterator[dict], total: int, cfg: MaterializeConfig,
              storage: Storage) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """The cells in Ray tasks of a few consecutive cells each (`cells_per_task`; consecutive cells are
    neighbours, which share scenes), at most `max_in_flight` tasks submitted at a time -> (results, failures)."""
    import ray
    from tqdm import tqdm

    if not total:
        return [], []
    task = ray.remote(num_cpus=cfg.num_cpus_per_task, max_retries=0)(materialize_cells)
    cpus = ray.cluster_resources().get("CPU", 1)
    limit = cfg.max_in_flight or max(1, int(4 * cpus))
    pending, results, failed = {}, [], []
    queue = grouped(jobs, cells_per_task(total, cpus / cfg.num_cpus_per_task))
    with tqdm(total=total, desc="materialize", unit="cell", disable=None) as bar:
        while True:
            while len(pending) < limit:
                batch = next(queue, None)
                if batch is None:
                    break
                pending[task.remote(batch)] = batch
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            batch = pending.pop(ready[0])
            try:
                done = ray.get(ready[0])
            except ray.exceptions.RayError as e:  # the worker died (memory, node lost): its unfinished cells
                last = (str(e).strip().splitlines() or [""])[-1]  # are redone next run; those with a marker are done
                done = list(read_markers(cfg.out, storage, [job["cell"].sid for job in batch]).values())
                for sid in sorted({job["cell"].sid for job in batch} - {r["sid"] for r in done}):
                    failed.append({"cell": sid, "modality": None, "item": None, "asset": None,
                                   "error": f"{type(e).__name__}: {last}"})  # fmt: skip
            for r in done:
                if r["status"] == "failed":
                    failed.append(r["failure"])
                else:  # what the report and the timestep CSVs need (the rows as their count per modality)
                    results.append({"sid": r["sid"], "status": r["status"], "absent": r["absent"],
                                    "files": len(r["files"]), "bytes": r["bytes"], "start": r["window"][0],
                                    "months": {m: len(rows) for m, rows in r["rows"].items()}})  # fmt: skip
            bar.update(len(batch))
    return results, failed


# ---- after the cells --------------------------------------------------------------------------------------


def read_markers(out: str, storage: Storage, sids=None) -> dict[str, dict]:
    """sid -> its done marker, for those of the cells `sids` that have one (default: every finished cell under
    `out`, one listing), fetched concurrently (`fs.cat` of the whole list: s3fs gathers the GETs)."""
    fs, uri = storage.fs(out), join(out, DONE_FOLDER)
    if sids is not None:
        names = [join(uri, f"{sid}.json") for sid in sorted(sids)]
    else:
        try:
            names = sorted(n for n in fs.ls(uri, detail=False) if n.endswith(".json"))
        except (FileNotFoundError, NotADirectoryError):
            return {}
    if not names:
        return {}
    markers = {}
    for name, data in fs.cat(names, on_error="omit" if sids is not None else "raise").items():
        try:
            m = json.loads(data)
        except ValueError as e:  # a marker is written atomically: a broken one was written by something else
            raise ValueError(f"{name}: unreadable done marker ({e}); delete it to redo that cell") from None
        markers[m["sid"]] = m
    return markers


def write_timestep_csvs(out: str, storage: Storage, markers: dict[str, dict], job_cells: set[str],
                        top: set[str] | None = None) -> None:  # fmt: skip
    """Each temporal modality's timestep CSV: the rows of every finished cell (from its marker), plus the rows
    an existing CSV holds for samples that are not this job's (materialising into an existing raw corpus
    joins it); no row of an unfinished cell of this job is kept. `top`: the names at the top of `out` when
    the job started (only this function writes the CSVs), else each CSV is looked for."""
    import datetime as dt

    for name, mod in MODALITIES.items():
        if not mod.temporal:
            continue
        rows = [(sid, t, dt.date.fromisoformat(a), dt.date.fromisoformat(b))
                for sid, m in sorted(markers.items()) for t, a, b in m["rows"].get(name, [])]  # fmt: skip
        uri = rl.csv_uri(out, name)
        exists = uri.rsplit("/", 1)[-1] in top if top is not None else storage.exists(uri)
        if exists:
            ours = job_cells | set(markers)
            old = rl.parse_timesteps_csv(storage.read_text(uri), uri)
            rows = [(sid, *p) for sid, ps in sorted(old.items()) if sid not in ours for p in ps] + rows
        if rows or exists:  # rewritten even when empty: no row of an unfinished cell stays
            storage.write_text(uri, rl.write_timesteps_csv(rows))


def make_report(cfg, cells, done, results, failed, markers, seconds: float) -> dict:
    written = [r for r in results if r["status"] == "written"]
    empty = [r for r in results if r["status"] == "empty"]
    skipped = [c for c in cells if c.sid in done]
    if len(written) + len(empty) + len(failed) + len(skipped) != len(cells):  # every cell accounted for once
        raise AssertionError(f"report: {len(cells)} cells but {len(written)} written + {len(empty)} empty + "
                             f"{len(failed)} failed + {len(skipped)} skipped")  # fmt: skip
    return {
        "out": cfg.out,
        "cells": len(cells),
        "written": len(written),
        "skipped": sorted(c.sid for c in skipped),
        "empty": {r["sid"]: r["absent"] for r in empty},
        "failed": failed,
        "absent": {sid: m["absent"] for sid, m in sorted(markers.items()) if m["absent"]},
        "files_written": sum(r["files"] for r in results),
        "bytes_written": sum(r["bytes"] for r in results),
        "seconds": round(seconds, 2),
        "cells_per_s": round(len(results) / seconds, 4) if seconds > 0 else 0.0,
    }


def format_report(report: dict) -> str:
    """The lines `olmoearth materialize` prints."""
    lines = [f"cells {report['cells']}: written {report['written']}, skipped (done before) {len(report['skipped'])}, "
             f"empty {len(report['empty'])}, failed {len(report['failed'])}  ({report['cells_per_s']} cells/s)"]  # fmt: skip
    for f in report["failed"]:
        lines.append(f"  failed {f['cell']} {f['modality']} item={f['item']} asset={f['asset']}: {f['error']}")
    for sid, why in list(report["empty"].items())[:20]:
        lines.append(f"  empty {sid}: {why}")
    n_absent = sum(len(v) for v in report["absent"].values())
    lines.append(f"  {n_absent} absent modality(ies) over {len(report['absent'])} cell(s): see {REPORT_FILE}")
    return "\n".join(lines)
