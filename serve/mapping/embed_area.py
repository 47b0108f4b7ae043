"""Embeddings for a whole area as one georeferenced map.

    plan:     area (bbox in lon/lat or a CRS) -> 10 m UTM grid -> overlapping square tiles
    encode:   Ray Data `map_batches` over the unfinished tiles with an actor pool; each actor reads its tiles
              from the source, embeds them (in-process encoder, or the Serve endpoint over HTTP) and writes
              one result per encoder batch: out/tiles/<first tile>_<random>.npz, a (h, w, D) float32 array per
              finished tile, then the .json of the same name with every tile's status
              -> resumable per tile: a rerun skips tiles some .json says are "ok"; a failing tile is recorded
              and reported
    assemble: in the driver while the workers encode (serve/mapping/assemble.py): tiles blended (linear ramps over the
              overlaps) in bands of `block_tokens` token rows, each as soon as all its tiles are done, into
              out/embeddings.tif  Cloud-Optimized GeoTIFF, one band per dimension (float32, or int8 with
                                  `scale` in the metadata: value = q * scale, -128 nodata)
              out/embeddings.zarr zarr v3 (band, y, x) with x / y coordinates and CF `spatial_ref` (xarray /
                                  rioxarray read the CRS and transform)
              out/preview.png     PCA false colour (first 3 components)
              out/report.json     tiles done / skipped / failed (with errors), km², timings
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from pipelines.common.storage import Storage, is_s3, join
from pipelines.imagery.grid import Grid, Tile, make_tiles, signature
from serve.mapping.assemble import TILE_DIR


@dataclass
class EmbedAreaConfig:
    """Large-area embedding job."""

    # area
    bbox: list[float] = field(default_factory=list)  # minx, miny, maxx, maxy in bbox_crs
    bbox_crs: str = "EPSG:4326"  # lon/lat by default
    crs: str | None = None  # output CRS; None: the UTM zone of the bbox centre
    # input: a raw corpus (source) or GeoTIFFs per modality
    source: str = ""  # root URI of a raw corpus in the OlmoEarth layout
    geotiffs: dict = field(default_factory=dict)  # {modality: [GeoTIFF URI, ...]} (T*C bands, time-major)
    modalities: list[str] = field(default_factory=lambda: ["sentinel2_l2a"])  # read from the corpus
    time_start: str = ""  # ISO date; with time_end picks the timesteps (<= 12 x 30 days) of the corpus
    time_end: str = ""  # one empty: 12 x 30 days from the other; both: the 12 x 30 days with most images
    months: list[int] = field(default_factory=list)  # months of the GeoTIFFs' timesteps (default 0..T-1)
    # model
    model_uri: str = "random:nano"
    patch_size: int = 4
    tile_size: int = 64  # px per tile side (the model's input size)
    overlap: int = 16  # px shared by neighbouring tiles
    # engine
    engine: str = "ray_data"  # ray_data (actor pool with the encoder) or serve (actors call serve_url)
    serve_url: str = ""  # e.g. http://127.0.0.1:8000 (engine=serve)
    num_actors: int = 1
    batch_size: int = 4  # tiles per encoder forward
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    torch_threads: int = 0
    # output
    out: str = ""  # output folder URI (s3:// or local)
    formats: list[str] = field(default_factory=lambda: ["cog", "zarr"])
    int8: bool = False
    preview: bool = True
    preview_detile: bool = True  # the PNG leaves out the tiling's position component (serve/mapping/assemble.py)
    block_tokens: int = 64  # output block (tokens per side): GeoTIFF / zarr blocks; the mosaic is written in bands of it
    s3_endpoint: str | None = None
    fail_tiles: list[str] = field(default_factory=list)  # tile ids made to fail (tests of the failure path)


def check_config(cfg: EmbedAreaConfig) -> None:
    if len(cfg.bbox) != 4:
        raise ValueError(f"bbox: expected [minx, miny, maxx, maxy], got {cfg.bbox}")
    if not (cfg.bbox[0] < cfg.bbox[2] and cfg.bbox[1] < cfg.bbox[3]):
        raise ValueError(f"bbox: need minx < maxx and miny < maxy, got {cfg.bbox}")
    if bool(cfg.source) == bool(cfg.geotiffs):
        raise ValueError("give exactly one of source (raw corpus URI) or geotiffs ({modality: [URIs]})")
    if not cfg.out:
        raise ValueError("out: output folder URI required")
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


def make_source(cfg: EmbedAreaConfig, storage: Storage, grid: Grid | None = None, spec: dict | None = None):
    """The job's pixel source. On the driver (`grid`): finds and checks the input files of the area; on a worker
    (`spec`, from the driver's `source.spec()`): rebuilt from what the driver found, without listing or opening."""
    from pipelines.imagery.sources import CorpusSource, GeoTiffSource

    if cfg.geotiffs:
        return GeoTiffSource(cfg.geotiffs, cfg.months or None, storage, _checked=spec and spec["checked"])
    if spec:  # the driver's time range: it may have filled in a default
        return CorpusSource(cfg.source, cfg.modalities, storage, *spec["time"], _plan=spec["plan"])
    return CorpusSource(cfg.source, cfg.modalities, storage, cfg.time_start, cfg.time_end, grid=grid)


def plan(cfg: EmbedAreaConfig) -> tuple[Grid, list[Tile]]:
    from serve.mapping.geo import area_grid

    crs, (x0, y0), w, h = area_grid(tuple(cfg.bbox), cfg.bbox_crs, cfg.crs, 10.0, snap=10.0 * cfg.patch_size)
    grid = Grid(crs, x0, y0, w, h)
    return grid, make_tiles(grid, cfg.tile_size, cfg.overlap, cfg.patch_size)


def job_signature(cfg: EmbedAreaConfig, grid: Grid) -> dict:
    """What makes tile results reusable by a rerun: same grid, tiles, model and inputs."""
    return {"grid": asdict(grid), "tile_size": cfg.tile_size, "overlap": cfg.overlap, "patch_size": cfg.patch_size,
            "model_uri": cfg.model_uri, "source": cfg.source, "geotiffs": cfg.geotiffs, "modalities": cfg.modalities,
            "time": [cfg.time_start, cfg.time_end], "months": cfg.months}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# the per-tile work (runs inside Ray Data actors)


class TileWorker:
    """Reads, embeds and writes tiles; one instance per actor of the pool.

    One call gets a few encoder batches of tiles and pipelines them: a reader thread reads batch k+1 and a
    writer thread writes batch k-1 while the encoder runs on batch k. Two calls run at once in an actor
    (run_tiles), taking turns on the encoder (a lock): the next call's first reads and the last call's
    writes happen while the other call encodes, so the encoder does not wait at call boundaries. A call
    returns once every write of its tiles is done, so a tile reported "ok" is on storage."""

    def __init__(self, cfg: dict, grid: dict, source_spec: dict):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from pipelines.common.config import from_dict

        t0 = time.time()
        self.cfg = from_dict(EmbedAreaConfig, cfg)
        self.grid = Grid(**grid)
        self.storage = Storage(self.cfg.s3_endpoint)
        self.source = make_source(self.cfg, self.storage, spec=source_spec)
        # one thread each: GDAL handles stay on the reader thread, writes stay in order
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="tile-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="tile-write")
        self.encoder_lock = threading.Lock()  # one forward at a time: calls overlap only in I/O
        self.embedder = self.session = None
        if self.cfg.engine == "ray_data":
            from serve.embedder import Embedder

            device = "cuda" if self.cfg.num_gpus_per_actor > 0 else "cpu"
            self.embedder = Embedder(self.cfg.model_uri, self.storage, device=device,
                                     num_threads=self.cfg.torch_threads or None)  # fmt: skip
        self.init_seconds = time.time() - t0

    def embed(self, xs: list[dict], months: np.ndarray) -> np.ndarray:
        """xs: per tile {m: (S, S, T, C)} -> (N, S/p, S/p, D) float32, NaN where no data."""
        x = {m: np.stack([t[m] for t in xs]) for m in xs[0]}
        mo = np.tile(months, (len(xs), 1))
        if self.embedder is not None:
            return self.embedder.embed(x, mo, self.cfg.patch_size)[0]
        if self.session is None:
            import requests

            self.session = requests.Session()  # one keep-alive connection per actor, not one per batch
        return embed_via_serve(self.cfg.serve_url, x, mo, self.cfg.patch_size, session=self.session)

    def read(self, tiles: list[Tile]) -> tuple[list, float]:
        """-> ([pixels {m: array} | ("empty" | "failed", message)] per tile, seconds)."""
        t0 = time.time()
        out = []
        for tile in tiles:
            try:
                if tile.id in self.cfg.fail_tiles:
                    raise RuntimeError(f"tile {tile.id} made to fail (fail_tiles)")
                x = self.source.read(tile, self.grid)
                if any(np.isfinite(a).any() for a in x.values()):
                    out.append(x)
                else:
                    out.append(("empty", "no input data in this tile"))
            except Exception as e:  # noqa: BLE001 - recorded per tile and reported by the driver
                out.append(("failed", f"read: {type(e).__name__}: {e}"))
        return out, time.time() - t0

    def write(self, tiles: list[Tile], status: list[str], errors: list[str], results: dict) -> tuple[str, float]:
        """One encoder batch -> tiles/<first tile>_<random>.npz (an array per finished tile) and, after it,
        the .json of the same name (every tile's status): two objects per batch instead of two per tile."""
        t0 = time.time()
        name = f"{tiles[0].id}_{uuid.uuid4().hex[:8]}"
        arrays, meta = {}, {}
        for i, tile in enumerate(tiles):
            d = {"status": status[i], "error": errors[i]}
            if i in results:
                e, max_abs, valid = results[i]
                d.update(max_abs=max_abs, valid_fraction=valid)
                arrays[tile.id] = e
            meta[tile.id] = d
        write_batch_results(self.storage, self.cfg.out, name, arrays, meta)
        return name + ".npz", time.time() - t0

    def __call__(self, batch: dict) -> dict:
        t_call = time.time()
        tiles = [Tile(int(r), int(c), int(x), int(y), int(s)) for r, c, x, y, s
                 in zip(batch["row"], batch["col"], batch["x"], batch["y"], batch["size"], strict=True)]  # fmt: skip
        n, b = len(tiles), max(1, self.cfg.batch_size)
        status, errors, max_abs, valid = ["ok"] * n, [""] * n, [0.0] * n, [0.0] * n
        chunks = [list(range(i, min(i + b, n))) for i in range(0, n, b)]
        reads = [self.reader.submit(self.read, [tiles[i] for i in ch]) for ch in chunks]  # run in order
        writes, t_read, t_embed = [], 0.0, 0.0
        for ch, fut in zip(chunks, reads, strict=True):
            got, sec = fut.result()
            t_read += sec
            ok = []
            for i, x in zip(ch, got, strict=True):
                if isinstance(x, tuple):
                    status[i], errors[i] = x
                else:
                    ok.append((i, x))
            results = {}
            with self.encoder_lock:  # the other call of this actor reads or writes meanwhile
                t0 = time.time()
                if ok:
                    try:
                        emb = self.embed([x for _, x in ok], self.source.months)
                        for (i, _), e in zip(ok, emb, strict=True):
                            e = e.astype(np.float32, copy=False)
                            finite = np.isfinite(e)
                            max_abs[i] = float(np.abs(e[finite]).max()) if finite.any() else 0.0
                            valid[i] = float(finite.all(-1).mean())
                            results[i - ch[0]] = (e, max_abs[i], valid[i])
                    except Exception as e:  # noqa: BLE001
                        for i, _ in ok:
                            status[i], errors[i] = "failed", f"embed: {type(e).__name__}: {e}"
                t_embed += time.time() - t0
            writes.append((ch, self.writer.submit(self.write, [tiles[i] for i in ch], [status[i] for i in ch],
                                                  [errors[i] for i in ch], results)))  # fmt: skip
        t0 = time.time()
        t_write, files = 0.0, [""] * n
        for ch, fut in writes:
            try:
                name, sec = fut.result()
                t_write += sec
                for i in ch:
                    files[i] = name
            except Exception as e:  # noqa: BLE001 - nothing of this chunk counts as done
                for i in ch:
                    status[i], errors[i] = "failed", f"write: {type(e).__name__}: {e}"
        t_wait = time.time() - t0
        share = 1.0 / n
        return {"tile": np.array([t.id for t in tiles]), "status": np.array(status), "error": np.array(errors),
                "file": np.array(files), "max_abs": np.array(max_abs), "valid_fraction": np.array(valid),
                # per-tile shares of this call's seconds: reading and writing (in their threads), encoding, and
                # how long the encoder thread waited for the last writes
                "read_s": np.full(n, t_read * share), "embed_s": np.full(n, t_embed * share),
                "write_s": np.full(n, t_write * share), "write_wait_s": np.full(n, t_wait * share),
                "actor_init_s": np.full(n, self.init_seconds), "t_start": np.full(n, t_call),
                "t_done": np.full(n, time.time())}  # fmt: skip


def write_batch_results(storage: Storage, out: str, name: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """tiles/<name>.npz (float32 (h, w, D) per finished tile id), then tiles/<name>.json {"tiles": {id: status}}:
    a status file is only ever written after the embeddings it points at."""
    import io

    folder = join(out, TILE_DIR)
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomic(storage, join(folder, name + ".npz"), buf.getvalue())
    write_atomic(storage, join(folder, name + ".json"), json.dumps({"tiles": meta}).encode())


def embed_via_serve(url: str, x: dict, months: np.ndarray, patch_size: int, timeout: float = 600,
                    session=None) -> np.ndarray:  # fmt: skip
    """POST one .npz to the Serve endpoint; returns (B, h, w, D)."""
    import io

    import requests

    buf = io.BytesIO()
    np.savez(buf, months=months, **x)
    r = (session or requests).post(f"{url.rstrip('/')}/embed", params={"patch_size": patch_size, "output": "patches",
                      "format": "npy"}, data=buf.getvalue(), headers={"Content-Type": "application/x-npz"},
                      timeout=timeout)  # fmt: skip
    if r.status_code != 200:
        raise RuntimeError(f"endpoint {url} answered {r.status_code}: {r.text[:300]}")
    return np.load(io.BytesIO(r.content))


def write_atomic(storage: Storage, uri: str, data: bytes) -> None:
    """S3 puts are atomic; locally write a temporary file and rename it, so a crash leaves no half file."""
    if is_s3(uri):
        storage.write_bytes(uri, data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    tmp = f"{uri}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, uri)


# --------------------------------------------------------------------------------------------------------
# driver


def finished_tiles(storage: Storage, out: str) -> dict[str, dict]:
    """tile id -> status dict of every tile with a result under out/tiles (ok / failed / empty; "file": the .npz
    holding an ok tile's embedding). A tile recorded by several runs counts as ok if any run finished it. The
    status files are fetched concurrently."""
    d = join(out, TILE_DIR)
    fs = storage.fs(d)
    if not fs.exists(d):
        return {}
    paths = sorted(p for p in fs.ls(d, detail=False) if p.endswith(".json"))
    found: dict[str, dict] = {}
    for p, data in (fs.cat(paths).items() if paths else []):
        for tile_id, st in json.loads(data)["tiles"].items():
            if found.get(tile_id, {}).get("status") != "ok":
                found[tile_id] = {**st, "file": os.path.basename(p)[:-5] + ".npz"}
    return found


def check_manifest(storage: Storage, cfg: EmbedAreaConfig, sig: dict) -> None:
    uri = join(cfg.out, "manifest.json")
    if storage.exists(uri):
        old = json.loads(storage.read_text(uri))
        diff = sorted(k for k in set(old["signature"]) | set(sig) if old["signature"].get(k) != sig.get(k))
        if diff:
            raise ValueError(f"out {cfg.out} holds tiles of a different job (differs in {diff}); use a new out "
                             "folder or delete the old one")  # fmt: skip
    else:
        storage.makedirs(cfg.out)
        storage.write_text(uri, json.dumps({"signature": sig, "signature_hash": signature(sig)}, indent=1))


def run_tiles(cfg: EmbedAreaConfig, grid: Grid, source_spec: dict, todo: list[Tile], on_done) -> list[dict]:
    """Encode `todo` with Ray Data (actor pool); calls on_done(row) as results arrive."""
    import ray
    from ray.data import ActorPoolStrategy

    if not todo:
        return []
    ray.data.DataContext.get_current().enable_progress_bars = False  # the km² bar below tells progress
    items = [{"row": t.row, "col": t.col, "x": t.x, "y": t.y, "size": t.size} for t in todo]
    # a call (one block) holds up to 4 encoder batches, so reads and writes overlap the encoder inside it, but
    # every actor still gets a few calls (and the progress bar moves)
    b = max(1, cfg.batch_size)
    per_call = b * max(1, min(4, len(items) // (2 * b * max(1, cfg.num_actors))))
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // per_call)))
    resources = {"num_cpus": cfg.num_cpus_per_actor}
    if cfg.num_gpus_per_actor:
        resources["num_gpus"] = cfg.num_gpus_per_actor
    ds = ds.map_batches(TileWorker, fn_constructor_kwargs={"cfg": asdict(cfg), "grid": asdict(grid),
                                                           "source_spec": source_spec},
                        # two calls in flight per actor, run concurrently (TileWorker: they share the encoder)
                        compute=ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=2,
                                                  max_concurrent_calls_per_actor=2,
                                                  enable_true_multi_threading=True),
                        batch_size=per_call,
                        batch_format="numpy", **resources)  # fmt: skip
    rows = []
    for row in ds.iter_rows():
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        rows.append(row)
        on_done(row)
    return rows


def embed_area(cfg: EmbedAreaConfig) -> dict:
    """Run the whole job; returns the report (also written to out/report.json)."""
    import shutil
    import tempfile

    from tqdm import tqdm

    from serve.mapping.assemble import StreamingMosaic

    check_config(cfg)
    storage = Storage(cfg.s3_endpoint)
    t_start = time.time()
    grid, tiles = plan(cfg)
    source = make_source(cfg, storage, grid=grid)  # finds and checks the input on the driver, before any work
    sig = job_signature(cfg, grid)
    check_manifest(storage, cfg, sig)
    done = finished_tiles(storage, cfg.out)
    todo = [t for t in tiles if done.get(t.id, {}).get("status") != "ok"]
    skipped = len(tiles) - len(todo)
    per_tile_km2 = grid.area_km2 / len(tiles)
    bar = tqdm(total=round(grid.area_km2, 2), unit="km²", desc="embedding", initial=round(skipped * per_tile_km2, 2))

    # the mosaic is blended band by band in this driver while the workers encode (serve/mapping/assemble.py)
    workdir = tempfile.mkdtemp(prefix="olmoearth-mosaic-")
    mosaic = StreamingMosaic(cfg, grid, tiles, storage, workdir)
    try:
        for tile_id, st in done.items():  # finished by an earlier run (the others are encoded again now)
            if st.get("status") == "ok":
                mosaic.add(tile_id, st)

        def on_done(row):
            st = {"status": row["status"], "error": row["error"], "max_abs": row["max_abs"], "file": row["file"]}
            if done.get(row["tile"], {}).get("status") != "ok":
                done[row["tile"]] = st
            mosaic.add(row["tile"], st)
            bar.update(per_tile_km2)
            bar.set_postfix_str(f"{row['tile']} {row['status']}")

        t_enc = time.time()
        t_setup = t_enc - t_start
        rows = run_tiles(cfg, grid, source.spec(), todo, on_done)
        bar.close()
        t_enc = time.time() - t_enc
        t_streamed = mosaic.seconds
        failed = {t.id: done.get(t.id, {"status": "failed", "error": "no result written"}) for t in tiles
                  if done.get(t.id, {}).get("status") != "ok"}  # fmt: skip
        t_asm = time.time()
        outputs = mosaic.finish()
        t_asm = time.time() - t_asm
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    first = min((r["t_start"] for r in rows), default=None)
    report = {
        "grid": asdict(grid), "area_km2": grid.area_km2, "tiles": len(tiles), "encoded": len(rows),
        "skipped_finished": skipped,
        "failed": {k: v.get("error", "") for k, v in failed.items() if v.get("status") == "failed"},
        "empty": sorted(k for k, v in failed.items() if v.get("status") == "empty"),
        "outputs": outputs, "engine": cfg.engine,
        # assemble: after the last tile; assemble_streamed: blending done in the driver during the encode stage
        "seconds": {"total": time.time() - t_start, "setup": t_setup, "encode": t_enc, "assemble": t_asm,
                    "assemble_streamed": t_streamed,
                    # from the start of the encode stage until a worker began its first call: Ray Data and actor
                    # start-up, actor construction (encoder build) included
                    "startup": (first - (t_start + t_setup)) if first else None,
                    "actor_init": max((r["actor_init_s"] for r in rows), default=None),
                    "worker_read": sum(r["read_s"] for r in rows), "worker_embed": sum(r["embed_s"] for r in rows),
                    "worker_write": sum(r["write_s"] for r in rows),
                    "worker_write_wait": sum(r["write_wait_s"] for r in rows)},
        "km2_per_s_encode": (len(rows) * per_tile_km2 / t_enc) if rows and t_enc > 0 else None,
        # after start-up (actors built, first tile out): the rate a long job runs at
        "km2_per_s_steady": steady_rate(rows, per_tile_km2, cfg.batch_size),
    }  # fmt: skip
    storage.write_text(join(cfg.out, "report.json"), json.dumps(report, indent=1))
    return report


def steady_rate(rows: list[dict], per_tile_km2: float, batch: int) -> float | None:
    """km² per second from the end of the first call of a worker to the end of the last one, timed in the
    workers (start-up of actors and encoder excluded): the rate a long job runs at."""
    ts = sorted(r["t_done"] for r in rows)
    later = [t for t in ts if t > ts[0]]
    if not later:
        return None
    return len(later) * per_tile_km2 / (later[-1] - ts[0])
