"""Embeddings for a whole area as one georeferenced map.

    plan:     area (bbox in lon/lat or a CRS) -> 10 m UTM grid -> overlapping square tiles
    encode:   Ray Data `map_batches` over the unfinished tiles with an actor pool; each actor reads its tiles
              from the source, embeds them (in-process encoder, or the Serve endpoint over HTTP) and writes
              one result per tile:  out/tiles/<tile>.npy (h, w, D) float32 + out/tiles/<tile>.json (status)
              -> resumable: a rerun skips tiles whose .json says "ok"; a failing tile is recorded and reported
    assemble: tiles blended (linear ramps over the overlaps) block by block into
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
from dataclasses import asdict, dataclass, field

import numpy as np

from pipelines.storage import Storage, is_s3, join
from serve.tiling import Grid, Tile, make_tiles, signature, tile_weights


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
    time_start: str = ""  # ISO date; with time_end picks the timesteps (<= 12 months) of the corpus
    time_end: str = ""
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
    block_tokens: int = 256  # output block (tokens per side) assembled at a time
    s3_endpoint: str | None = None
    fail_tiles: list[str] = field(default_factory=list)  # tile ids made to fail (tests of the failure path)


TILE_DIR = "tiles"


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


def make_source(cfg: EmbedAreaConfig, storage: Storage):
    from serve.sources import CorpusSource, GeoTiffSource

    if cfg.geotiffs:
        return GeoTiffSource(cfg.geotiffs, cfg.months or None, storage)
    return CorpusSource(cfg.source, cfg.modalities, storage, cfg.time_start, cfg.time_end)


def plan(cfg: EmbedAreaConfig) -> tuple[Grid, list[Tile]]:
    from serve.geo import area_grid

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
    """Reads, embeds and writes tiles; one instance per actor of the pool."""

    def __init__(self, cfg: dict, grid: dict):
        from olmoearth.config import from_dict

        self.cfg = from_dict(EmbedAreaConfig, cfg)
        self.grid = Grid(**grid)
        self.storage = Storage(self.cfg.s3_endpoint)
        self.source = make_source(self.cfg, self.storage)
        self.embedder = None
        if self.cfg.engine == "ray_data":
            from serve.model import Embedder

            device = "cuda" if self.cfg.num_gpus_per_actor > 0 else "cpu"
            self.embedder = Embedder(self.cfg.model_uri, self.storage, device=device,
                                     num_threads=self.cfg.torch_threads or None)  # fmt: skip

    def embed(self, xs: list[dict], months: np.ndarray) -> np.ndarray:
        """xs: per tile {m: (S, S, T, C)} -> (N, S/p, S/p, D) float32, NaN where no data."""
        x = {m: np.stack([t[m] for t in xs]) for m in xs[0]}
        mo = np.tile(months, (len(xs), 1))
        if self.embedder is not None:
            return self.embedder.embed(x, mo, self.cfg.patch_size)[0]
        return embed_via_serve(self.cfg.serve_url, x, mo, self.cfg.patch_size)

    def __call__(self, batch: dict) -> dict:
        rows = [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
        status, errors, seconds = [], [], []
        ok_tiles, ok_x = [], []
        t0 = time.time()
        for r in rows:
            tile = Tile(int(r["row"]), int(r["col"]), int(r["x"]), int(r["y"]), int(r["size"]))
            try:
                if tile.id in self.cfg.fail_tiles:
                    raise RuntimeError(f"tile {tile.id} made to fail (fail_tiles)")
                x = self.source.read(tile, self.grid)
                if not any(np.isfinite(a).any() for a in x.values()):
                    status.append("empty")
                    errors.append("no input data in this tile")
                    continue
                ok_tiles.append((len(status), tile))
                ok_x.append(x)
                status.append("ok")
                errors.append("")
            except Exception as e:  # noqa: BLE001 - recorded per tile and reported by the driver
                status.append("failed")
                errors.append(f"read: {type(e).__name__}: {e}")
        if ok_x:
            try:
                emb = self.embed(ok_x, self.source.months)
                for (_i, tile), e in zip(ok_tiles, emb, strict=True):
                    self.write(tile, e)
            except Exception as e:  # noqa: BLE001
                for i, _ in ok_tiles:
                    status[i], errors[i] = "failed", f"embed: {type(e).__name__}: {e}"
        for i, r in enumerate(rows):
            tile_id = Tile(int(r["row"]), int(r["col"]), 0, 0, 0).id
            if status[i] != "ok":
                self.write_status(tile_id, {"status": status[i], "error": errors[i]})
            seconds.append((time.time() - t0) / len(rows))
        return {"tile": np.array([Tile(int(r["row"]), int(r["col"]), 0, 0, 0).id for r in rows]),
                "status": np.array(status), "error": np.array(errors), "seconds": np.array(seconds),
                "t_done": np.full(len(rows), time.time())}  # fmt: skip

    def write(self, tile: Tile, emb: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, emb.astype(np.float32))
        base = join(self.cfg.out, TILE_DIR, tile.id)
        write_atomic(self.storage, base + ".npy", buf.getvalue())
        finite = np.isfinite(emb)
        self.write_status(tile.id, {"status": "ok", "max_abs": float(np.abs(emb[finite]).max()) if finite.any() else 0.0,
                                    "valid_fraction": float(finite.all(-1).mean())})  # fmt: skip

    def write_status(self, tile_id: str, d: dict) -> None:
        write_atomic(self.storage, join(self.cfg.out, TILE_DIR, tile_id + ".json"), json.dumps(d).encode())


def embed_via_serve(url: str, x: dict, months: np.ndarray, patch_size: int, timeout: float = 600) -> np.ndarray:
    """POST one .npz to the Serve endpoint; returns (B, h, w, D)."""
    import io

    import requests

    buf = io.BytesIO()
    np.savez(buf, months=months, **x)
    r = requests.post(f"{url.rstrip('/')}/embed", params={"patch_size": patch_size, "output": "patches",
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
    """tile id -> status dict of every tile with a result (ok / failed / empty) under out/tiles."""
    d = join(out, TILE_DIR)
    fs = storage.fs(d)
    if not fs.exists(d):
        return {}
    found = {}
    for p in fs.ls(d, detail=False):
        name = os.path.basename(p)
        if name.endswith(".json"):
            found[name[:-5]] = json.loads(storage.read_text(("s3://" + p) if is_s3(out) and not p.startswith("s3://") else p))
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


def run_tiles(cfg: EmbedAreaConfig, grid: Grid, todo: list[Tile], on_done) -> list[dict]:
    """Encode `todo` with Ray Data (actor pool); calls on_done(row) as results arrive."""
    import ray
    from ray.data import ActorPoolStrategy

    if not todo:
        return []
    ray.data.DataContext.get_current().enable_progress_bars = False  # the km² bar below tells progress
    items = [{"row": t.row, "col": t.col, "x": t.x, "y": t.y, "size": t.size} for t in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // max(1, cfg.batch_size)))
    resources = {"num_cpus": cfg.num_cpus_per_actor}
    if cfg.num_gpus_per_actor:
        resources["num_gpus"] = cfg.num_gpus_per_actor
    ds = ds.map_batches(TileWorker, fn_constructor_kwargs={"cfg": asdict(cfg), "grid": asdict(grid)},
                        compute=ActorPoolStrategy(size=cfg.num_actors), batch_size=cfg.batch_size,
                        batch_format="numpy", **resources)  # fmt: skip
    rows = []
    for row in ds.iter_rows():
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        rows.append(row)
        on_done(row)
    return rows


def embed_area(cfg: EmbedAreaConfig) -> dict:
    """Run the whole job; returns the report (also written to out/report.json)."""
    from tqdm import tqdm

    check_config(cfg)
    storage = Storage(cfg.s3_endpoint)
    t_start = time.time()
    grid, tiles = plan(cfg)
    source = make_source(cfg, storage)  # validates the input on the driver before any work is sent out
    if hasattr(source, "crs_of_cells") and grid.crs not in source.crs_of_cells():
        raise ValueError(f"source {cfg.source}: corpus cells are in {sorted(source.crs_of_cells())}, the area grid "
                         f"in {grid.crs}; set crs to the corpus's CRS")  # fmt: skip
    sig = job_signature(cfg, grid)
    check_manifest(storage, cfg, sig)
    done = finished_tiles(storage, cfg.out)
    todo = [t for t in tiles if done.get(t.id, {}).get("status") != "ok"]
    skipped = len(tiles) - len(todo)
    per_tile_km2 = grid.area_km2 / len(tiles)
    bar = tqdm(total=round(grid.area_km2, 2), unit="km²", desc="embedding", initial=round(skipped * per_tile_km2, 2))

    def on_done(row):
        bar.update(per_tile_km2)
        bar.set_postfix_str(f"{row['tile']} {row['status']}")

    t_enc = time.time()
    rows = run_tiles(cfg, grid, todo, on_done)
    bar.close()
    t_enc = time.time() - t_enc
    done = finished_tiles(storage, cfg.out)
    failed = {t.id: done.get(t.id, {"status": "failed", "error": "no result written"}) for t in tiles
              if done.get(t.id, {}).get("status") != "ok"}  # fmt: skip
    t_asm = time.time()
    outputs = assemble(cfg, grid, tiles, done, storage)
    t_asm = time.time() - t_asm
    report = {
        "grid": asdict(grid), "area_km2": grid.area_km2, "tiles": len(tiles), "encoded": len(rows),
        "skipped_finished": skipped,
        "failed": {k: v.get("error", "") for k, v in failed.items() if v.get("status") == "failed"},
        "empty": sorted(k for k, v in failed.items() if v.get("status") == "empty"),
        "outputs": outputs, "engine": cfg.engine,
        "seconds": {"total": time.time() - t_start, "encode": t_enc, "assemble": t_asm},
        "km2_per_s_encode": (len(rows) * per_tile_km2 / t_enc) if rows and t_enc > 0 else None,
        # after start-up (actors built, first tile out): the rate a long job runs at
        "km2_per_s_steady": steady_rate(rows, per_tile_km2, cfg.batch_size),
    }  # fmt: skip
    storage.write_text(join(cfg.out, "report.json"), json.dumps(report, indent=1))
    return report


def steady_rate(rows: list[dict], per_tile_km2: float, batch: int) -> float | None:
    """km² per second from the end of the first tile batch to the end of the last one, timed in the workers
    (start-up of actors and encoder excluded): the rate a long job runs at."""
    ts = sorted(r["t_done"] for r in rows)
    later = [t for t in ts if t > ts[0]]
    if not later:
        return None
    return len(later) * per_tile_km2 / (later[-1] - ts[0])


# --------------------------------------------------------------------------------------------------------
# assembly


def load_tile(storage: Storage, out: str, tile_id: str) -> np.ndarray:
    import io

    return np.load(io.BytesIO(storage.read_bytes(join(out, TILE_DIR, tile_id + ".npy"))))


def assemble(cfg: EmbedAreaConfig, grid: Grid, tiles: list[Tile], done: dict, storage: Storage) -> dict:
    """Blend the finished tiles into the mosaic outputs; returns {kind: uri}."""
    import shutil
    import tempfile

    from serve.mosaic import MosaicWriter

    p = cfg.patch_size
    ok = [t for t in tiles if done.get(t.id, {}).get("status") == "ok"]
    if not ok:
        raise RuntimeError(f"no tile of {len(tiles)} was embedded; see {join(cfg.out, TILE_DIR)}/*.json")
    n_rows, n_cols = max(t.row for t in tiles) + 1, max(t.col for t in tiles) + 1
    size_t, ov_t = cfg.tile_size // p, cfg.overlap // p
    ht, wt = grid.height // p, grid.width // p
    dim = int(load_tile(storage, cfg.out, ok[0].id).shape[-1])
    max_abs = max(float(done[t.id].get("max_abs", 0.0)) for t in ok)
    scale = (max_abs / 127.0) if cfg.int8 and max_abs > 0 else (1.0 if cfg.int8 else None)
    tmp = tempfile.mkdtemp(prefix="olmoearth-mosaic-")
    try:
        writer = MosaicWriter(tmp, grid, p, dim, cfg.formats, scale, cfg.preview,
                              tags={"model": cfg.model_uri, "patch_size": p, "tile_size": cfg.tile_size,
                                    "overlap": cfg.overlap})  # fmt: skip
        if cfg.preview:
            writer.fit_pca([load_tile(storage, cfg.out, t.id) for t in ok[:: max(1, len(ok) // 16)]])
        cache: dict[str, np.ndarray] = {}
        bt = cfg.block_tokens
        by_id = {t.id: t for t in ok}
        for by in range(0, ht, bt):
            for tid in [k for k in cache if by_id[k].y // p + size_t <= by]:  # above this block row: done
                del cache[tid]
            for bx in range(0, wt, bt):
                bh, bw = min(bt, ht - by), min(bt, wt - bx)
                acc = np.zeros((bh, bw, dim), np.float64)
                wsum = np.zeros((bh, bw, 1), np.float64)
                for t in ok:
                    ty, tx = t.y // p, t.x // p
                    y0, y1 = max(by, ty), min(by + bh, ty + size_t, ht)
                    x0, x1 = max(bx, tx), min(bx + bw, tx + size_t, wt)
                    if y0 >= y1 or x0 >= x1:
                        continue
                    if t.id not in cache:
                        cache[t.id] = load_tile(storage, cfg.out, t.id)
                    e = cache[t.id][y0 - ty : y1 - ty, x0 - tx : x1 - tx]
                    w = tile_weights(t, n_cols, n_rows, ov_t, size_t)[y0 - ty : y1 - ty, x0 - tx : x1 - tx, None]
                    w = np.where(np.isfinite(e).all(-1, keepdims=True), w, 0.0)
                    acc[y0 - by : y1 - by, x0 - bx : x1 - bx] += w * np.nan_to_num(e)
                    wsum[y0 - by : y1 - by, x0 - bx : x1 - bx] += w
                block = np.where(wsum > 0, acc / np.maximum(wsum, 1e-12), np.nan).astype(np.float32)
                writer.write_block(by, bx, block)
        local = writer.close()
        outputs = {}
        for kind, path in local.items():
            uri = join(cfg.out, os.path.basename(path))
            if is_s3(cfg.out):
                fs = storage.fs(uri)
                if os.path.isdir(path):
                    if fs.exists(uri):
                        fs.rm(uri, recursive=True)
                    fs.put(path.rstrip("/") + "/", uri, recursive=True)
                else:
                    fs.put(path, uri)
            else:
                os.makedirs(cfg.out, exist_ok=True)
                if os.path.isdir(path):
                    shutil.rmtree(uri, ignore_errors=True)
                    shutil.copytree(path, uri)
                else:
                    shutil.copyfile(path, uri)
            outputs[kind] = uri
        return outputs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

