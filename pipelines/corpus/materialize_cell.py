"""One cell of a materialisation: read its modalities, write its raw files, then its done marker.

    result = materialize_cell(job)   # job: the cell, a source spec per STAC modality, its OSM features, the config
    results = materialize_cells(jobs)   # a Ray task: a few neighbouring cells, one after the other

Per STAC modality: the cell's pixels from the one image-source interface (`StacSource.read`: windowed COG
reads, cloud masks, harmonisation, monthly composites on the cell's 10 m grid; float32 (256, 256, T, C) model
units, NaN missing). Each bandset is written at its stored resolution by taking every f-th pixel of that 10 m
result (f = 2 at 20 m, 4 at 40 m): StacSource warps a 20 / 40 m band at its own resolution from the cell's
corner and repeats each pixel onto 10 m, so pixel (f i, f j) of the 10 m grid is exactly stored pixel (i, j)
(tests/test_materialize.py checks this). Values go back to raw units (`units.from_model_units`: S1 dB -> linear
power, nodata), time-major, T = every month of the window (a month without a clear scene is nodata there, and
the timestep CSV lists every month). Maps (`pipelines.corpus.maps`) follow; the OSM raster of a
cell with features was written by the job's OSM stage (`pipelines.corpus.osm_stage`), the others get zeros. Every file is written atomically; the marker `_materialize/done/<id>.json`
(the timestep rows, what is absent and why) is written last, so a cell without it is unfinished and is redone.

What is absent is said with a reason and the cell is still written: "no item" (no scene of the collection meets
the cell in its window), "all cloud or nodata" (scenes meet it but none has a clear pixel with data), "no map
data" (the mosaic has only nodata there). A cell with no imagery at all is not written (`olmoearth build-corpus`
would reject it: no_spacetime_modality) and is reported `empty`. A read that fails after its retries fails the
cell: its files are removed, the report names the modality, item, asset and error, and a rerun redoes it.
"""

from __future__ import annotations

import json
import re
import time

import numpy as np

from olmoearth.modalities import BASE_GSD, MODALITIES
from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.cells import CellRecord, month_periods
from pipelines.corpus.osm_stage import osm_file
from pipelines.imagery import units
from pipelines.imagery.geotiff import geotiff_bytes
from pipelines.imagery.grid import Tile

DONE_FOLDER = "_materialize/done"  # one marker per finished cell
UPLOADS = 4  # concurrent file uploads per cell task
_ITEM_ASSET = re.compile(r"item '([^']*)' asset '([^']*)'")


class CellFailure(RuntimeError):
    """A cell that could not be materialised (a read failed after its retries); `fields` is its report entry."""

    def __init__(self, sid: str, modality: str, error: str):
        m = _ITEM_ASSET.search(error)
        self.fields = {"cell": sid, "modality": modality, "item": m.group(1) if m else None,
                       "asset": m.group(2) if m else None, "error": error}  # fmt: skip
        super().__init__(f"{sid}: {modality}: {error}")


def marker_uri(out: str, sid: str) -> str:
    return join(out, DONE_FOLDER, f"{sid}.json")


def bandset_files(cell: CellRecord, modality: str) -> list[str]:
    """Relative paths of the files of `modality` for `cell`, one per bandset."""
    mod = MODALITIES[modality]
    return [f"{mod.raw_folder}/{rl.file_name(cell.epsg, cell.col, cell.row, bs.resolution)}" for bs in mod.bandsets]


def temporal_bands(x: np.ndarray, modality: str) -> list[tuple[float, np.ndarray]]:
    """(256, 256, T, C) model units on 10 m -> [(stored resolution, raw (T * c, n, n) time-major)] per bandset."""
    out = []
    for bs, sl in zip(MODALITIES[modality].bandsets, MODALITIES[modality].bandset_slices(), strict=True):
        f = int(round(bs.resolution / BASE_GSD))
        a = x[::f, ::f, :, sl]  # (n, n, T, c): the pixel at each stored pixel's top-left corner
        a = np.ascontiguousarray(a.transpose(2, 3, 0, 1)).reshape(-1, *a.shape[:2])  # (T * c, n, n)
        out.append((bs.resolution, units.from_model_units(modality, a)))
    return out


_UPLOAD_POOL = None  # this worker process's upload threads, shared by its cell tasks


def upload_pool():
    """The worker's UPLOADS upload threads (started once per process, not once per cell)."""
    global _UPLOAD_POOL
    if _UPLOAD_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _UPLOAD_POOL = ThreadPoolExecutor(max_workers=UPLOADS, thread_name_prefix="cell-upload")
    return _UPLOAD_POOL


class CellWriter:
    """The files of one cell: encoded here, uploaded atomically by a few threads (a PUT's latency overlaps the
    next file's encoding and the other uploads), remembered, removed again if the cell fails. `flush()` waits
    for every upload (and raises the first error): the done marker is written only after it."""

    def __init__(self, cell: CellRecord, out: str, storage: Storage, faults: dict):
        self.cell, self.out, self.storage, self.faults = cell, out, storage, faults
        self.files: list[str] = []
        self.bytes = 0
        self.pool = upload_pool()
        self.pending: list = []

    def put(self, modality: str, resolution: float, arr: np.ndarray) -> None:
        c = self.cell
        rel = f"{MODALITIES[modality].raw_folder}/{rl.file_name(c.epsg, c.col, c.row, resolution)}"
        data = geotiff_bytes(arr, c.epsg, rl.cell_transform(c.col, c.row, resolution), units.RAW_FORMAT[modality][1])
        self.pending.append(self.pool.submit(self.storage.write_bytes, join(self.out, rel), data))
        self.files.append(rel)
        self.bytes += len(data)
        if c.sid in self.faults.get("materialize_cells", []):
            self.flush()
            raise RuntimeError(f"injected fault (OLMOEARTH_FAULTS materialize_cells) after writing {rel}")

    def flush(self) -> None:
        done, self.pending = self.pending, []
        for f in done:
            f.result()

    def close(self) -> None:
        """Wait for every upload, errors ignored (the cell is failing: its files are removed next)."""
        for f in self.pending:
            f.exception()
        self.pending = []

    def clear(self, rels) -> None:
        """Remove these files of the cell (relative paths; an earlier unfinished attempt's, or this one's)."""
        fs = self.storage.fs(self.out)
        for rel in rels:
            uri = join(self.out, rel)
            if fs.exists(uri):
                fs.rm(uri)


def materialize_cell(job: dict) -> dict:
    """Materialise one cell (see the module docstring) -> {"sid", "status": written | empty | failed, "absent",
    "rows", "files", "bytes", "seconds"} (+ "failure": the report's fields; its files removed first)."""
    return materialize_cells([job])[0]


def materialize_cells(jobs: list[dict]) -> list[dict]:
    """Materialise several cells in one task, in order -> their results (as `materialize_cell`). While a cell
    is read and encoded, the previous cell's files finish uploading and its marker goes up: a cell's waits on
    the store overlap the next cell's work instead of idling the worker's core."""
    runs: list[CellRun] = []
    for job in jobs:
        run = CellRun(job)
        run.start()
        if runs:
            runs[-1].finish()
        runs.append(run)
    if runs:
        runs[-1].finish()
    return [run.outcome() for run in runs]


_CAUGHT = (OSError, ValueError, RuntimeError)  # with StacReadError (a RuntimeError): reported, redone next run


class CellRun:
    """One cell of a task in three steps: `start` reads its imagery and maps and hands its files to the upload
    threads, `finish` waits for them and sends its marker up (last: the cell is finished), `outcome` waits
    for the marker -> the cell's result. A failure at any step removes the cell's files and reports it."""

    def __init__(self, job: dict):
        self.t0 = time.time()
        self.job, self.cell, self.cfg = job, job["cell"], job["cfg"]
        self.storage = Storage()
        self.writer = CellWriter(self.cell, self.cfg.out, self.storage, job.get("faults") or {})
        self.absent = dict(job["absent"])  # modality -> why it is absent (found on the driver: no item)
        self.modality, self.status, self.months = "?", "empty", {}
        self.marker = None  # the marker's upload
        self.result: dict | None = None  # set once the cell is finished or failed

    def start(self) -> None:
        cell, cfg, writer = self.cell, self.cfg, self.writer
        try:
            writer.clear(self.job["stale"])  # what an earlier unfinished attempt left (listed once by the driver)
            with worker_handles(self.storage).env_ctx():  # one GDAL environment for the cell, not one per file
                images = {}
                for modality, spec in self.job["sources"].items():
                    self.modality = modality  # what a failure names
                    x = read_imagery(spec, modality, cell, self.storage, self.absent)
                    if x is not None:
                        images[modality] = x
                self.status = "written" if images else "empty"
                for modality, x in images.items():
                    self.modality = modality
                    for res, arr in temporal_bands(x, modality):
                        writer.put(modality, res, arr)
                    self.months[modality] = x.shape[2]
                    del x
                images.clear()
                self.modality = "maps"
                if self.status == "written":  # a cell without imagery gets no maps either: the build would reject it
                    write_maps(self.job, writer, self.absent)
                elif cfg.osm:
                    writer.clear([osm_file(cell)])
        except _CAUGHT as e:
            self._fail(e)

    def finish(self) -> None:
        if self.result is not None:
            return
        try:
            self.writer.flush()  # every file is in place before the marker says so
            done = _result(self.cell, self.status, self.absent, self.months, self.writer, self.t0)
            self.marker = (self.writer.pool.submit(self.storage.write_text, marker_uri(self.cfg.out, self.cell.sid),
                                                   json.dumps(done)), done)  # fmt: skip
        except _CAUGHT as e:
            self._fail(e)

    def outcome(self) -> dict:
        if self.result is None:
            future, done = self.marker
            try:
                future.result()
                self.result = done
            except _CAUGHT as e:
                self._fail(e)
        return self.result

    def _fail(self, e: BaseException) -> None:
        self.writer.close()
        self.writer.clear(self.writer.files + ([osm_file(self.cell)] if self.cfg.osm else []))  # the OSM stage's too
        failure = CellFailure(self.cell.sid, self.modality, f"{type(e).__name__}: {e}").fields
        self.result = {**_result(self.cell, "failed", self.absent, {}, self.writer, self.t0), "failure": failure,
                       "files": [], "bytes": 0}  # fmt: skip


_HANDLES: dict = {}  # S3 endpoint -> this worker process's open COGs (kept between its cell tasks)
HANDLES_PER_WORKER = 256  # open files kept per worker: a few scenes' bands and masks


def worker_handles(storage: Storage):
    """The worker process's `Handles` for `storage`'s endpoint: a scene (100 km across) serves hundreds of
    cells, so its files are opened (header read) once per worker, not once per cell."""
    from pipelines.imagery.sources import Handles

    key = storage.endpoint
    if key not in _HANDLES:
        _HANDLES[key] = Handles(storage, size=HANDLES_PER_WORKER)
    return _HANDLES[key]


def read_imagery(spec: dict, modality: str, cell: CellRecord, storage: Storage, absent: dict):
    """The cell's (256, 256, T, C) of one STAC modality, or None (and its reason in `absent`) if it has no data.
    Only modalities with data are kept by the caller."""
    from pipelines.imagery.stac import StacSource

    src = StacSource.from_spec(spec, storage)
    src.handles = worker_handles(storage)  # neighbouring cells of one worker share the scenes' open files
    tile = Tile(0, 0, 0, 0, rl.TILE_SIZE)
    x = src.read(tile, cell.grid())[modality]
    if not np.isfinite(x).any():
        absent[modality] = f"all cloud or nodata: {len(spec['items'])} scene(s) meet the cell, none with a clear pixel"
        return None
    return x


def write_maps(job: dict, writer: CellWriter, absent: dict) -> None:
    """The cell's static maps from their mosaics, and its OSM raster from its features."""
    from pipelines.corpus.maps import read_map

    cell, cfg = job["cell"], job["cfg"]
    handles = worker_handles(writer.storage)
    with handles.env_ctx():
        for modality, uri in cfg.maps.items():
            vals = read_map(handles, uri, modality, cell.epsg, cell.col, cell.row)
            if not np.isfinite(vals).any():
                absent[modality] = f"no map data: {uri} has only nodata over the cell"
                continue
            writer.put(modality, MODALITIES[modality].bandsets[0].resolution, units.from_model_units(modality, vals))
    if cfg.osm and not job["osm_written"]:  # no feature meets the cell: its raster is all zeros
        from pipelines.corpus.osm_raster import RESOLUTION, rasterise

        writer.put("openstreetmap_raster", RESOLUTION, rasterise([], cell.epsg, cell.col, cell.row))


def timestep_rows(start: str, months: dict[str, int]) -> dict[str, list]:
    """{modality: [[t, first day, first day of the next month]]} of a cell whose window starts on `start`,
    for its T months per temporal modality: the rows of its timestep CSVs (its marker holds them)."""
    return {m: [[t, a.isoformat(), b.isoformat()] for t, (a, b) in enumerate(month_periods(start, n))]
            for m, n in months.items()}  # fmt: skip


def _result(cell: CellRecord, status: str, absent: dict, months: dict, writer: CellWriter, t0: float) -> dict:
    return {"sid": cell.sid, "status": status, "window": [cell.start, cell.end], "absent": absent,
            "rows": timestep_rows(cell.start, months), "files": writer.files,
            "bytes": writer.bytes, "seconds": round(time.time() - t0, 3)}  # fmt: skip
