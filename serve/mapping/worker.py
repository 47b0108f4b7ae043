"""The per-tile work of an area job, inside the Ray Data actors: read a tile's pixels from the source, embed
them (in-process encoder, or the Serve endpoint over HTTP), write the results of each encoder batch
(`serve.mapping.tile_store`). For `olmoearth predict` (a PredictConfig) the same with a fine-tuned model: a
tile's result is its per-class probabilities or values (in process, or the endpoint's /predict).

One call gets a few encoder batches of tiles and pipelines them: a reader thread reads batch k+1 and a writer
thread writes batch k-1 while the encoder runs on batch k. Two calls run at once in an actor (the pool's
`max_concurrent_calls_per_actor=2`), taking turns on the encoder (a lock): the next call's first reads and the
last call's writes happen while the other call encodes, so the encoder does not wait at call boundaries. A call
returns once every write of its tiles is done, so a tile reported "ok" is on storage. The encoder loads in a
thread while the actor already takes its first tiles, so their reads overlap the model's load.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines.common.storage import Storage
from pipelines.imagery.grid import Grid, Tile
from serve.mapping.config import EmbedAreaConfig
from serve.mapping.plan import source_from_spec
from serve.mapping.tile_store import write_batch_results

COLUMNS = ("status", "error", "file", "max_abs", "valid_fraction")  # per-tile results of a call


class TileWorker:
    """Reads, embeds and writes tiles; one instance per actor of the pool. `faults`: the driver's test-only
    fault plan (`pipelines.common.faults`); its "embed_tiles" fail on read."""

    def __init__(self, cfg: EmbedAreaConfig, grid: Grid, source_spec: dict, faults: dict):
        t0 = time.time()
        self.cfg, self.grid = cfg, grid
        self.storage = Storage()
        self.source = source_from_spec(source_spec, self.storage)
        self.fail_tiles = set(faults.get("embed_tiles") or [])
        # one thread each: GDAL handles stay on the reader thread, writes stay in order
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="tile-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="tile-write")
        self.encoder_lock = threading.Lock()  # one forward at a time: calls overlap only in I/O
        self.gaps: dict[str, str] = {}  # tile id -> its months without a clear pixel (an ok tile's "error")
        self.session = None
        # the encoder loads in a thread of its own: the constructor returns at once, so the pool hands this
        # actor its first tiles while the model loads and their reads overlap the load (embed() waits for it)
        self.loading = ThreadPoolExecutor(1, thread_name_prefix="model-load").submit(self._load) \
            if cfg.engine == "ray_data" else None  # fmt: skip
        self.init_seconds = time.time() - t0

    def _load(self):
        """-> (Embedder, seconds to import torch and load it)."""
        t0 = time.time()
        from serve.embedder import Embedder

        device = "cuda" if self.cfg.num_gpus_per_actor > 0 else "cpu"
        embedder = Embedder(self.cfg.model_uri, device=device, num_threads=self.cfg.torch_threads or None,
                            precision=self.cfg.precision)
        return embedder, time.time() - t0

    @property
    def embedder(self):
        """The in-process encoder (engine=ray_data; None with engine=serve), once loaded; a failed load raises
        here, in the first embed, and fails that call's tiles with its reason."""
        if self.loading is None:
            return None
        embedder, seconds = self.loading.result()
        if not getattr(self, "_load_counted", False):
            self.init_seconds, self._load_counted = self.init_seconds + seconds, True
        return embedder

    def __call__(self, batch: dict) -> dict:
        t_call = time.time()
        tiles = [Tile(int(r), int(c), int(x), int(y), int(s)) for r, c, x, y, s
                 in zip(batch["row"], batch["col"], batch["x"], batch["y"], batch["size"], strict=True)]  # fmt: skip
        n, b = len(tiles), max(1, self.cfg.batch_size)
        res = {"status": ["ok"] * n, "error": [""] * n, "file": [""] * n, "max_abs": [0.0] * n,
               "valid_fraction": [0.0] * n}  # fmt: skip
        chunks = [list(range(i, min(i + b, n))) for i in range(0, n, b)]
        reads = [self.reader.submit(self.read, [tiles[i] for i in ch]) for ch in chunks]  # run in order
        writes, t_read, t_embed = [], 0.0, 0.0
        for ch, fut in zip(chunks, reads, strict=True):
            got, sec = fut.result()
            t_read += sec
            results, sec = self._embed_chunk(ch, got, res)
            t_embed += sec
            for i in ch:
                note = self.gaps.pop(tiles[i].id, "")
                res["error"][i] = res["error"][i] or (note if res["status"][i] == "ok" else "")
            writes.append((ch, self.writer.submit(self.write, [tiles[i] for i in ch], [res["status"][i] for i in ch],
                                                  [res["error"][i] for i in ch], results)))  # fmt: skip
        t0 = time.time()
        t_write = self._await_writes(writes, res)
        seconds = {"read_s": t_read, "embed_s": t_embed, "write_s": t_write, "write_wait_s": time.time() - t0}
        return self._columns(tiles, res, seconds, t_call)

    def read(self, tiles: list[Tile]) -> tuple[list, float]:
        """-> ([pixels {m: array} | ("empty" | "failed", message)] per tile, seconds)."""
        t0 = time.time()
        out = []
        for tile in tiles:
            try:
                if tile.id in self.fail_tiles:
                    raise RuntimeError(f"tile {tile.id} made to fail (fault embed_tiles)")
                x = self.source.read(tile, self.grid)
                if any(np.isfinite(a).any() for a in x.values()):
                    out.append(x)
                    # months without a clear pixel (StacSource): kept as the ok tile's note, reported as gaps
                    self.gaps[tile.id] = getattr(self.source, "explain_gaps", lambda t: "")(tile)
                else:  # a source may say why (StacSource: the scenes that met it, all cloudy or nodata)
                    why = getattr(self.source, "explain_empty", lambda t: None)(tile)
                    out.append(("empty", why or "no input data in this tile"))
            except Exception as e:  # noqa: BLE001 - recorded per tile and reported by the driver
                out.append(("failed", f"read: {type(e).__name__}: {e}"))
        return out, time.time() - t0

    def embed(self, xs: list[dict], months: np.ndarray) -> np.ndarray:
        """xs: per tile {m: (S, S, T, C)} -> (N, S/p, S/p, D) float32, NaN where no data."""
        x = {m: np.stack([t[m] for t in xs]) for m in xs[0]}
        mo = np.tile(months, (len(xs), 1))
        # `olmoearth predict` (a PredictConfig): the fine-tuned model's per-class probabilities / values instead,
        # (N, S, S, K) per pixel or (N, 1, 1, K) per window (serve/embedder.py prediction_maps)
        from serve.mapping.predict_config import PredictConfig

        predicting = isinstance(self.cfg, PredictConfig)
        embedder = self.embedder
        if embedder is not None:
            if predicting:
                return embedder.prediction_maps(x, mo)
            return embedder.embed(x, mo, self.cfg.patch_size)[0]
        if self.session is None:
            import requests

            self.session = requests.Session()  # one keep-alive connection per actor, not one per batch
        if predicting:
            return predict_via_serve(self.cfg.serve_url, x, mo, session=self.session)
        return embed_via_serve(self.cfg.serve_url, x, mo, self.cfg.patch_size, session=self.session)

    def _embed_chunk(self, ch: list[int], got: list, res: dict) -> tuple[dict, float]:
        """Embed the tiles of one encoder batch that were read -> ({index in chunk: (emb, max |e|, valid)},
        seconds on the encoder); failures and empty tiles go into `res`."""
        ok = []
        for i, x in zip(ch, got, strict=True):
            if isinstance(x, tuple):
                res["status"][i], res["error"][i] = x
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
                        res["max_abs"][i] = float(np.abs(e[finite]).max()) if finite.any() else 0.0
                        res["valid_fraction"][i] = float(finite.all(-1).mean())
                        results[i - ch[0]] = (e, res["max_abs"][i], res["valid_fraction"][i])
                except Exception as e:  # noqa: BLE001
                    for i, _ in ok:
                        res["status"][i], res["error"][i] = "failed", f"embed: {type(e).__name__}: {e}"
            return results, time.time() - t0

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

    def _await_writes(self, writes: list, res: dict) -> float:
        """Wait for this call's writes; -> seconds the writer spent. A failed write fails its whole chunk."""
        t_write = 0.0
        for ch, fut in writes:
            try:
                name, sec = fut.result()
                t_write += sec
                for i in ch:
                    res["file"][i] = name
            except Exception as e:  # noqa: BLE001 - nothing of this chunk counts as done
                for i in ch:
                    res["status"][i], res["error"][i] = "failed", f"write: {type(e).__name__}: {e}"
        return t_write

    def _columns(self, tiles: list[Tile], res: dict, seconds: dict, t_call: float) -> dict:
        """The call's output rows: per tile its results and its share of the call's seconds (reading and writing
        in their threads, encoding, and how long the encoder thread waited for the last writes)."""
        n = len(tiles)
        out = {"tile": np.array([t.id for t in tiles]), **{k: np.array(res[k]) for k in COLUMNS}}
        out.update({k: np.full(n, v / n) for k, v in seconds.items()})
        out.update(actor_init_s=np.full(n, self.init_seconds), t_start=np.full(n, t_call),
                   t_done=np.full(n, time.time()))  # fmt: skip
        return out


def embed_via_serve(url: str, x: dict, months: np.ndarray, patch_size: int, timeout: float = 600,
                    session=None) -> np.ndarray:  # fmt: skip
    """POST one .npz to the Serve endpoint; returns (B, h, w, D)."""
    params = {"patch_size": patch_size, "output": "patches", "format": "npy"}
    return np.load(io.BytesIO(post_npz(url, "embed", params, x, months, timeout, session)))


def predict_via_serve(url: str, x: dict, months: np.ndarray, timeout: float = 600, session=None) -> np.ndarray:
    """POST one .npz to the endpoint's /predict (a fine-tuned model) -> (B, H, W, K) or (B, 1, 1, K): the
    probabilities or values of every output, NaN without input."""
    from serve.embedder import maps_from_outputs

    with np.load(io.BytesIO(post_npz(url, "predict", {"format": "npz"}, x, months, timeout, session))) as z:
        out = {k: z[k] for k in z.files}
    return maps_from_outputs(str(out.pop("kind")), out)


def post_npz(url: str, route: str, params: dict, x: dict, months: np.ndarray, timeout: float, session) -> bytes:
    """x and months as one .npz to url/route (with OLMOEARTH_SERVE_TOKEN as bearer token when set) -> the
    answer's bytes; an answer other than 200 raises with its text."""
    import os

    import requests

    buf = io.BytesIO()
    np.savez(buf, months=months, **x)
    headers = {"Content-Type": "application/x-npz"}
    if os.environ.get("OLMOEARTH_SERVE_TOKEN"):  # the endpoint's optional bearer token (serve/app.py)
        headers["Authorization"] = f"Bearer {os.environ['OLMOEARTH_SERVE_TOKEN']}"
    r = (session or requests).post(f"{url.rstrip('/')}/{route}", params=params, data=buf.getvalue(), headers=headers,
                                   timeout=timeout)  # fmt: skip
    if r.status_code != 200:
        raise RuntimeError(f"endpoint {url} answered {r.status_code}: {r.text[:300]}")
    return r.content
