"""Corpus build: raw GeoTIFFs in a bucket -> validated, globally shuffled Parquet training shards.

    summary = build_corpus(BuildConfig(raw_uri="s3://raw", out_uri="s3://shards"), storage)

Plan, then a Ray Data pipeline over *parts* (one part = one output shard):
1. list the raw files and group them by sample id (names that do not parse are rejected, never dropped);
2. plan: a sample's part is a hash of (seed, sample id) modulo the number of parts, which is fixed by the
   first build (`<out>/plan.json`). This IS the write-time global shuffle (a shard is a random subset of
   the corpus, in hash order), and it lets any worker route a sample's data to its part without a
   sample -> part table;
3. timesteps: the per-modality timestep CSVs are split into byte ranges and routed by Ray tasks, each
   writing its rows grouped by part into `<out>/_timesteps/` and returning the byte range of every part;
   a part task reads only its own ranges. The driver never parses a CSV (memory per node stays bounded
   whatever the corpus size; docs/corpus.md);
4. `ray.data.from_items(parts).map(build_part)`: each task reads its samples one by one (one GET per
   file; the next sample's files are fetched concurrently while this one is processed), validates them
   (pipelines/corpus/raster.py), and appends one Parquet row group per sample to its shard through a streaming
   writer whose upload runs in a background thread, so a worker holds one sample at a time whatever the
   corpus size. On finishing, it writes `<out>/_done/part-NNNNNN.json` (sample ids, rejects with file and
   reason, bytes, per-band partial statistics). A rerun skips every part whose marker accounts for all
   its listed samples: the build is idempotent and resumes after a crash (a shard is only visible once
   complete: local files are renamed into place, S3 objects appear when their upload completes);
5. per-band normalisation statistics: the markers' partial statistics (computed while writing the shard)
   merged on the driver (Chan's parallel mean/variance merge plus min/max) -> `<out>/norm_stats.json`;
6. `<out>/manifest.json` (shards with row counts, totals, rejects by reason) and `<out>/rejects.jsonl`.
   Counts add up: samples planned == samples written + samples rejected (checked before writing).

Shard format 2 (Parquet, zstd level 1 by default, one row group per sample, no dictionary/statistics;
see docs/corpus.md): sample_id string, epsg/col/row int32, months list<int8> (T,), and one binary column
per bandset, `<modality>@<r>m` (`bandset_columns()`): the bandset in stored form (raster.stored_dtype: the
raw dtype, Sentinel-1 float16 dB), C-order (T_m, C_bs, n, n) little-endian at r = max(stored resolution,
10 m) (n = 2560 / r), missing timesteps holding the nodata value; null if the sample lacks the modality.
"""

from __future__ import annotations

import collections
import csv
import datetime as dt
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from olmoearth.modalities import MODALITIES
from pipelines.common.storage import Storage, is_s3, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.raster import REASONS, RejectError, load_bandsets, stored_dtype, stored_resolution

FORMAT_VERSION = 2
ALL_BANDS = [(m, b) for m, mod in MODALITIES.items() for b in mod.bands]  # 67, registry order
BAND_OFFSET = {}
_o = 0
for _m, _mod in MODALITIES.items():
    BAND_OFFSET[_m] = _o
    _o += _mod.num_bands
NB = len(ALL_BANDS)
TIMESTEP_FIELDS = ["crs", "col", "row", "image_idx", "start_time", "end_time"]


@dataclass
class BuildConfig:
    raw_uri: str = field(
        default="", metadata={"help": "where the raw corpus is (s3://bucket/prefix or a path)"}
    )
    out_uri: str = field(default="", metadata={"help": "where shards, manifest and statistics go"})
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3 endpoint URL (else AWS_ENDPOINT_URL)"}
    )
    samples_per_shard: int = field(
        default=16, metadata={"help": "mean 256x256 samples per Parquet shard (fixed by the first build)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the global shuffle of samples into shards"})
    compression_level: int = field(default=1, metadata={"help": "zstd level of the shards"})
    num_cpus_per_task: float = field(default=1.0, metadata={"help": "CPUs reserved per part task"})
    max_concurrency: int = field(default=0, metadata={"help": "most part tasks at once (0: Ray decides)"})
    timesteps_chunk_mb: float = field(
        default=64.0, metadata={"help": "MB of timestep CSV routed per Ray task"}
    )


# ----------------------------------------------------------------------------------------------------------
# Per-band statistics (count, mean, M2, min, max over valid pixels), mergeable


def stats_vector(per_modality: dict[str, np.ndarray]) -> np.ndarray:
    """{modality: (5, C)} (from load_bandsets' meta["stats"]) -> (5, NB) over all registered bands."""
    out = _empty_stats()
    for name, st in per_modality.items():
        o = BAND_OFFSET[name]
        out[:, o : o + st.shape[1]] = st
    return out


def merge_stats(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al.'s parallel merge of two (5, NB) accumulators."""
    na, nb = a[0], b[0]
    n = na + nb
    safe = np.where(n > 0, n, 1)
    delta = b[1] - a[1]
    mean = a[1] + delta * nb / safe
    m2 = a[2] + b[2] + delta**2 * na * nb / safe
    return np.stack([n, mean, m2, np.minimum(a[3], b[3]), np.maximum(a[4], b[4])])


def _empty_stats() -> np.ndarray:
    out = np.zeros((5, NB))
    out[3], out[4] = np.inf, -np.inf
    return out


def stats_to_norm_json(acc: np.ndarray) -> dict:
    """(5, NB) -> {modality: {band: {"mean", "std"} | {"min", "max"}}} in the layout of norm_stats.json
    (maps given there as min/max keep min/max). A band never observed falls back to the published value and
    is listed under "_fallback"."""
    default = json.loads(
        open(os.path.join(os.path.dirname(__file__), "..", "olmoearth", "data", "norm_stats.json")).read()
    )
    out, fallback = {}, []
    for i, (m, b) in enumerate(ALL_BANDS):
        n, mean, m2, lo, hi = acc[:, i]
        ref = default[m][b]
        if n <= 0:
            out.setdefault(m, {})[b] = dict(ref)
            fallback.append(f"{m}.{b}")
        elif "min" in ref:
            out.setdefault(m, {})[b] = {"min": float(lo), "max": float(hi) if hi > lo else float(lo) + 1.0}
        else:
            std = float(np.sqrt(m2 / n))
            out.setdefault(m, {})[b] = {"mean": float(mean), "std": std if std > 0 else 1.0}
        out[m][b]["count"] = int(n)
    out["_fallback"] = fallback
    return out


# ----------------------------------------------------------------------------------------------------------
# The plan: sample -> part by hash


def part_of(sample_id: str, seed: int, num_parts: int) -> int:
    return sample_hash(sample_id, seed) % num_parts


def sample_hash(sample_id: str, seed: int) -> int:
    """A stable 64-bit hash of (seed, sample id): the part (modulo) and the order inside it."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest(), "little")


def make_plan(num_samples: int, cfg: BuildConfig, old: dict | None, uri: str) -> dict:
    """The first build fixes the number of parts; a rerun keeps it (and must use the same seed)."""
    if old:
        if old.get("format") != FORMAT_VERSION:
            raise ValueError(f"{uri}: shard format {old.get('format')}, this build writes {FORMAT_VERSION}; "
                             "use a new out_uri")  # fmt: skip
        if old["raw_uri"] != cfg.raw_uri:
            raise ValueError(f"{uri}: built from {old['raw_uri']}, not {cfg.raw_uri}; use a new out_uri")
        if old["seed"] != cfg.seed:
            raise ValueError(f"{uri}: built with seed {old['seed']}, not {cfg.seed}; use a new out_uri")
        return old
    num_parts = max(1, -(-num_samples // max(1, cfg.samples_per_shard)))
    return {"format": FORMAT_VERSION, "raw_uri": cfg.raw_uri, "seed": cfg.seed, "num_parts": num_parts}


# ----------------------------------------------------------------------------------------------------------
# Timesteps: CSV byte ranges -> rows grouped by part (Ray tasks), read back by each part task


def csv_chunks(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges covering a file of `size` bytes; a range owns the lines that start inside it."""
    step = max(1, int(chunk_bytes))
    return [(a, min(a + step, size)) for a in range(0, size, step)] or [(0, 0)]


def route_timesteps(csv_uri: str, modality: str, start: int, end: int, header: list[str], seed: int,
                    num_parts: int, out_uri: str, endpoint: str | None) -> dict:  # fmt: skip
    """Ray task: the CSV lines starting in [start, end) -> `<out>/_timesteps/<modality>-<start>.csv` holding
    "sample_id,image_idx,start,end" lines grouped by part; returns {"uri", "ranges": {part: [a, b]}}.
    A malformed line raises ValueError naming the file and the line's byte offset."""
    storage = Storage(endpoint)
    fs = storage.fs(csv_uri)
    lines = _lines_starting_in(fs, csv_uri, start, end)
    col = {name: header.index(name) for name in TIMESTEP_FIELDS}
    by_part: dict[int, list[str]] = collections.defaultdict(list)
    for offset, line in lines:
        if offset == 0 or not line.strip():
            continue  # the header, blank lines
        try:
            r = next(csv.reader([line]))
            epsg = int(str(r[col["crs"]]).replace("EPSG:", ""))
            sid = rl.sample_id(epsg, int(r[col["col"]]), int(r[col["row"]]))
            idx = int(r[col["image_idx"]])
            t0 = dt.date.fromisoformat(r[col["start_time"]][:10])
            t1 = dt.date.fromisoformat(r[col["end_time"]][:10])
        except (ValueError, TypeError, IndexError) as e:
            raise ValueError(f"{csv_uri}: line at byte {offset}: {e}: {line[:200]!r}") from None
        by_part[part_of(sid, seed, num_parts)].append(f"{sid},{idx},{t0.isoformat()},{t1.isoformat()}\n")
    out, ranges, pos = [], {}, 0
    for p in sorted(by_part):
        text = "".join(by_part[p]).encode()
        out.append(text)
        ranges[p] = [pos, pos + len(text)]
        pos += len(text)
    uri = join(out_uri, "_timesteps", f"{modality}-{start:012d}.csv")
    storage.write_bytes(uri, b"".join(out))
    return {"modality": modality, "uri": uri, "ranges": ranges}


def _lines_starting_in(fs, uri: str, start: int, end: int) -> list[tuple[int, str]]:
    """[(byte offset, line)] of the lines of `uri` that start in [start, end), read with ranged GETs."""
    if end <= start:
        return []
    lo = max(start - 1, 0)  # one byte before: is `start` itself a line start?
    data = fs.cat_file(uri, start=lo, end=end)
    size = fs.info(uri)["size"]
    hi = end
    while not data.endswith(b"\n") and hi < size:  # finish the last line
        more = fs.cat_file(uri, start=hi, end=min(hi + 65536, size))
        cut = more.find(b"\n")
        data += more if cut < 0 else more[: cut + 1]
        hi += len(more) if cut < 0 else cut + 1
        if cut >= 0:
            break
    if start > 0:
        first = data.find(b"\n") + 1  # the partial line before the first start belongs to the previous range
        if first == 0:
            return []
        base, data = lo + first, data[first:]
    else:
        base = 0
    out, pos = [], 0
    while pos < len(data) and base + pos < end:
        nl = data.find(b"\n", pos)
        nxt = len(data) if nl < 0 else nl + 1
        out.append((base + pos, data[pos:nxt].decode()))
        pos = nxt
    return out


def read_part_timesteps(fs, ranges: dict[str, list]) -> dict[str, dict[str, list]]:
    """{modality: [[uri, a, b], ...]} (this part's routed ranges) -> {modality: {sid: [(idx, start, end)]}}."""
    flat = [(m, u, a, b) for m, rs in ranges.items() for u, a, b in rs]
    if not flat:
        return {}
    texts = fs.cat_ranges([u for _, u, _, _ in flat], [a for *_, a, _ in flat], [b for *_, b in flat])
    out: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for (m, _, _, _), text in zip(flat, texts, strict=True):
        if isinstance(text, BaseException):
            raise text
        for line in text.decode().splitlines():
            sid, idx, t0, t1 = line.split(",")
            out[m][sid].append((int(idx), dt.date.fromisoformat(t0), dt.date.fromisoformat(t1)))
    return {m: {sid: sorted(v) for sid, v in d.items()} for m, d in out.items()}


# ----------------------------------------------------------------------------------------------------------
# One part -> one shard


def bandset_columns() -> list[tuple[str, str, int]]:
    """[(column name, modality, bandset index)] of the shard's tensor columns, registry order."""
    return [(f"{m}@{stored_resolution(bs.resolution):g}m", m, i)
            for m, mod in MODALITIES.items() for i, bs in enumerate(mod.bandsets)]  # fmt: skip


def modality_columns(modality: str) -> list[str]:
    return [c for c, m, _ in bandset_columns() if m == modality]


def shard_schema() -> pa.Schema:
    fields = [("sample_id", pa.string()), ("epsg", pa.int32()), ("col", pa.int32()), ("row", pa.int32()),
              ("months", pa.list_(pa.int8()))]  # fmt: skip
    fields += [(c, pa.binary()) for c, _, _ in bandset_columns()]
    return pa.schema(fields, metadata={"olmoearth_shard_format": str(FORMAT_VERSION)})


def sample_table(sid: str, bands: dict, months: np.ndarray) -> pa.Table:
    """One sample (load_bandsets' stored bandsets) -> a one-row table of shard_schema()."""
    epsg, col, row = rl.parse_sample_id(sid)
    data = {"sample_id": [sid], "epsg": [epsg], "col": [col], "row": [row],
            "months": [months.astype(np.int8).tolist()]}  # fmt: skip
    for c, m, i in bandset_columns():
        data[c] = _binary_cell(bands[m][i] if m in bands else None)
    return pa.table(data, schema=shard_schema())


def _binary_cell(a: np.ndarray | None) -> pa.Array:
    """One binary cell holding `a`'s bytes without copying them (a null cell for None)."""
    if a is None:
        return pa.nulls(1, pa.binary())
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    offsets = pa.py_buffer(np.array([0, a.nbytes], np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(a.reshape(-1).view(np.uint8))])


def decode_bandset(buf, modality: str, bandset: int, T: int) -> np.ndarray:
    """One shard cell (bytes or a pyarrow Buffer) -> its stored array (T_m, C_bs, n, n), zero-copy."""
    mod = MODALITIES[modality]
    bs = mod.bandsets[bandset]
    n = rl.cell_size(stored_resolution(bs.resolution))
    t = T if mod.temporal else 1
    return np.frombuffer(buf, dtype=stored_dtype(modality).newbyteorder("<")).reshape(t, bs.num_bands, n, n)


def read_cell(parquet_file: pq.ParquetFile, row_group: int, modalities) -> tuple[np.ndarray, dict]:
    """One sample of a shard -> (months int64 (T,), {modality: [stored array per bandset] | None}),
    the arrays viewing Arrow's buffers (no copy)."""
    cols = [c for m in modalities for c in modality_columns(m)]
    t = parquet_file.read_row_group(row_group, columns=["months", *cols])
    months = np.asarray(t.column("months")[0].as_py(), np.int64)
    out = {}
    for m in modalities:
        cells = [t.column(c)[0] for c in modality_columns(m)]
        out[m] = None if not cells[0].is_valid else [
            decode_bandset(v.as_buffer(), m, i, len(months)) for i, v in enumerate(cells)]  # fmt: skip
    return months, out


class _BackgroundWriter:
    """A write-only stream that gathers writes into `chunk_bytes` chunks and hands each to `fh.write` in one
    background thread, so the shard's upload overlaps the next samples' work; the caller blocks only while
    `depth` chunks already wait (the upload is behind), so memory stays bounded."""

    def __init__(self, fh, chunk_bytes: int, depth: int = 2):
        self.fh, self.chunk_bytes, self.depth = fh, chunk_bytes, depth
        self.buf, self.pos, self.closed = bytearray(), 0, False
        self.pool, self.pending = ThreadPoolExecutor(1), collections.deque()

    def write(self, data) -> int:
        self.buf += data
        self.pos += len(data)
        if len(self.buf) >= self.chunk_bytes:
            self._hand_off()
        return len(data)

    def _hand_off(self) -> None:
        self.pending.append(self.pool.submit(self.fh.write, bytes(self.buf)))
        self.buf = bytearray()
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        if self.buf:
            self._hand_off()
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown()
        self.fh.close()
        self.closed = True


def _atomic_writer(uri: str, storage: Storage):
    """-> (output stream, commit()) for a shard. S3: an s3fs multipart upload (the object appears only when
    it completes; pyarrow's own S3 multipart upload is refused by SeaweedFS); local: a temporary name."""
    if is_s3(uri):
        block = 16 * 2**20  # each handed-off chunk is one multipart part
        return _BackgroundWriter(storage.fs(uri).open(uri, "wb", block_size=block), block), lambda: None
    path = os.path.abspath(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path + ".tmp", "wb"), lambda: os.replace(path + ".tmp", path)


def build_part(item: dict) -> dict:
    """Ray Data map function: build one part (see module doc). Returns its done-marker summary."""
    cfg = BuildConfig(**json.loads(item["cfg"]))
    storage = Storage(cfg.s3_endpoint)
    spec = json.loads(item["spec"])
    part = spec["part"]
    shard_rel = f"shards/part-{part:06d}.parquet"
    t0, cpu0 = time.time(), time.process_time()
    rejects, rows, bytes_in = [], [], 0
    acc = _empty_stats()
    fs_read = storage.fs(cfg.raw_uri)
    periods_all = read_part_timesteps(storage.fs(cfg.out_uri), spec["timesteps"])
    writer = stream = commit = None
    # the next sample's files are fetched (concurrently) in a thread while this one is decoded and written:
    # a worker holds at most one sample's decoded arrays plus the next sample's raw bytes
    pool = ThreadPoolExecutor(1)
    fetch = lambda s: pool.submit(_fetch_all, fs_read, [u for us in s["files"].values() for u in us])  # noqa: E731
    samples = spec["samples"]
    nxt = fetch(samples[0]) if samples else None
    for j, s in enumerate(samples):
        sid = s["sample_id"]
        periods = {m: periods_all.get(m, {}).get(sid, []) for m in s["files"] if MODALITIES[m].temporal}
        got, nxt = nxt.result(), (fetch(samples[j + 1]) if j + 1 < len(samples) else None)
        try:
            bands, months, meta = load_bandsets(sid, s["files"], periods, storage, read=_reader(got, fs_read),
                                                with_stats=True)  # fmt: skip
        except RejectError as e:
            rejects.append({"sample_id": sid, "file": e.file, "reason": e.reason, "detail": e.detail})
            continue
        except Exception as e:  # anything unexpected is still accounted for, never lost
            rejects.append(
                {"sample_id": sid, "file": sid, "reason": "corrupt", "detail": f"{type(e).__name__}: {e}"}
            )
            continue
        del got
        if writer is None:
            stream, commit = _atomic_writer(join(cfg.out_uri, shard_rel), storage)
            # no dictionary and no min/max statistics: each binary cell is one large tensor
            writer = pq.ParquetWriter(pa.PythonFile(stream, mode="w"), shard_schema(), compression="zstd", use_dictionary=False,
                                      write_statistics=False, compression_level=cfg.compression_level)  # fmt: skip
        writer.write_table(sample_table(sid, bands, months), row_group_size=1)
        acc = merge_stats(acc, stats_vector(meta["stats"]))
        rows.append(sid)
        bytes_in += meta["bytes"]
        del bands
    pool.shutdown()
    bytes_out = 0
    if writer is not None:
        writer.close()
        stream.close()
        commit()
        bytes_out = int(storage.fs(cfg.out_uri).info(join(cfg.out_uri, shard_rel))["size"])
    record = {
        "part": part,
        "shard": shard_rel if rows else None,
        "rows": len(rows),
        "sample_ids": rows,
        "rejects": rejects,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "started": t0,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "stats": acc.ravel().tolist(),
    }
    storage.write_text(join(cfg.out_uri, "_done", f"part-{part:06d}.json"), json.dumps(record))
    return {"part": part, "rows": len(rows), "rejected": len(rejects), "bytes_in": bytes_in}


def _fetch_all(fs, uris: list[str]) -> dict:
    """{uri: bytes | the exception reading it raised}, all fetched concurrently (one GET per file)."""
    if not uris:
        return {}
    try:
        got = fs.cat_file(uris[0]) if len(uris) == 1 else fs.cat(uris, on_error="return")
    except Exception as e:  # kept for the reader to raise when load_bandsets reads that file
        return {u: e for u in uris}
    if len(uris) == 1:
        return {uris[0]: got}
    # fsspec keys the result by its own normalisation of the path (s3fs: without "s3://")
    return {u: got.get(u, got.get(fs._strip_protocol(u), KeyError(u))) for u in uris}


def _reader(got: dict, fs):
    """read(uri) -> bytes for load_bandsets from prefetched results (re-raising a read's error), else a GET."""

    def read(uri):
        v = got.get(uri)
        if v is None:
            return fs.cat_file(uri)
        if isinstance(v, BaseException):
            if isinstance(v, KeyError):
                return fs.cat_file(uri)
            raise v
        return v

    return read


# ----------------------------------------------------------------------------------------------------------
# The whole build


def _read_markers(storage: Storage, done_uri: str, parts: list[int] | None = None) -> dict[int, dict]:
    """part -> its done marker (every marker under done_uri, or those of `parts`), fetched concurrently."""
    fs = storage.fs(done_uri)
    if parts is None:
        try:
            uris = [u for u in fs.ls(done_uri, detail=False) if u.endswith(".json")]
        except FileNotFoundError:
            return {}
    else:
        uris = [join(done_uri, f"part-{p:06d}.json") for p in parts]
    if not uris:
        return {}
    got = fs.cat(uris, on_error="raise") if len(uris) > 1 else {uris[0]: fs.cat_file(uris[0])}
    out = {}
    for text in got.values():
        rec = json.loads(text)
        out[rec["part"]] = rec
    return out


def _route_all_timesteps(cfg: BuildConfig, storage: Storage, plan: dict) -> dict[int, dict[str, list]]:
    """Route every temporal modality's CSV by part (Ray tasks) -> {part: {modality: [[uri, a, b], ...]}}."""
    import ray

    fs = storage.fs(cfg.raw_uri)
    task = ray.remote(num_cpus=cfg.num_cpus_per_task)(route_timesteps)
    refs = []
    for name, mod in MODALITIES.items():
        if not mod.temporal:
            continue
        uri = rl.csv_uri(cfg.raw_uri, name)
        try:
            size = int(fs.info(uri)["size"])
        except FileNotFoundError:
            continue
        head = fs.cat_file(uri, start=0, end=min(size, 65536)).split(b"\n", 1)[0].decode().strip()
        header = next(csv.reader([head])) if head else []
        if not set(TIMESTEP_FIELDS) <= set(header):
            raise ValueError(f"{uri}: header must have columns {TIMESTEP_FIELDS}, got {header}")
        for a, b in csv_chunks(size, int(cfg.timesteps_chunk_mb * 2**20)):
            refs.append(task.remote(uri, name, a, b, header, plan["seed"], plan["num_parts"], cfg.out_uri,
                                    storage.endpoint))  # fmt: skip
    by_part: dict[int, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in ray.get(refs):
        for p, (a, b) in r["ranges"].items():
            by_part[int(p)][r["modality"]].append([r["uri"], a, b])
    return by_part


def build_corpus(cfg: BuildConfig, storage: Storage | None = None) -> dict:
    """Run the build (needs a Ray cluster: ray.init() or an address). Returns the manifest summary."""
    import ray

    if not cfg.raw_uri or not cfg.out_uri:
        raise ValueError("build-corpus needs raw_uri and out_uri")
    storage = storage or Storage(cfg.s3_endpoint)
    if storage.s3_endpoint and not cfg.s3_endpoint:
        cfg.s3_endpoint = storage.s3_endpoint
    t0 = time.time()
    storage.makedirs(cfg.out_uri)

    # 1. list and group (the listing is the one per-sample table the driver holds)
    samples, bad_names = rl.list_samples_lenient(cfg.raw_uri, storage)
    samples.pop("", None)

    # 2. plan (the number of parts, fixed by the first build) and each part's listed samples
    plan_uri = join(cfg.out_uri, "plan.json")
    old = json.loads(storage.read_text(plan_uri)) if storage.exists(plan_uri) else None
    plan = make_plan(len(samples), cfg, old, plan_uri)
    if plan != old:
        storage.write_text(plan_uri, json.dumps(plan))
    listed: dict[int, list[str]] = collections.defaultdict(list)
    for sid in samples:
        listed[part_of(sid, plan["seed"], plan["num_parts"])].append(sid)

    # 3. parts to build: those without a marker, or whose marker misses a listed sample (new since)
    done_uri = join(cfg.out_uri, "_done")
    markers = _read_markers(storage, done_uri)
    todo_parts = []
    for p in sorted(listed):
        rec = markers.get(p)
        accounted = set(rec["sample_ids"]) | {r["sample_id"] for r in rec["rejects"]} if rec else set()
        if not set(listed[p]) <= accounted:
            todo_parts.append(p)
    n_todo = sum(len(listed[p]) for p in todo_parts)
    if todo_parts:
        routed = _route_all_timesteps(cfg, storage, plan)
        cfg_json = json.dumps(cfg.__dict__)
        todo = []
        for p in todo_parts:
            sids = sorted(listed[p], key=lambda s: sample_hash(s, plan["seed"]))  # a random order inside
            specs = [{"sample_id": sid, "files": {m: u for m, u in samples[sid].items() if m in MODALITIES}}
                     for sid in sids]  # fmt: skip
            spec = {"part": p, "samples": specs, "timesteps": routed.get(p, {})}
            todo.append({"cfg": cfg_json, "spec": json.dumps(spec)})
        del routed
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        kwargs = {"num_cpus": cfg.num_cpus_per_task}
        if cfg.max_concurrency > 0:
            kwargs["concurrency"] = cfg.max_concurrency
        results = ds.map(build_part, **kwargs)
        bar = tqdm(total=n_todo, desc="build-corpus", unit="sample", disable=None)
        for r in results.iter_rows():
            bar.update(r["rows"] + r["rejected"])
        bar.close()
        del todo
        markers.update(_read_markers(storage, done_uri, todo_parts))  # this run's markers

    # 4. statistics over every done marker (this run's and earlier runs'): each marker carries its part's
    # (5, NB) partial statistics, computed in the same pass that wrote the shard; merging these small rows
    # on the driver (Chan's merge) replaces a second Ray Data job, whose start-up alone cost seconds
    summaries = [markers[p] for p in sorted(markers) if p < plan["num_parts"]]
    acc = _empty_stats()
    for rec in summaries:
        acc = merge_stats(acc, np.asarray(rec["stats"], np.float64).reshape(5, NB))
    norm = stats_to_norm_json(acc)
    storage.write_text(join(cfg.out_uri, "norm_stats.json"), json.dumps(norm, indent=1))

    # 5. manifest + rejects
    rejects = [dict(r, part=s["part"]) for s in summaries for r in s["rejects"]]
    rejects += [
        {"sample_id": None, "file": uri, "reason": "bad_name", "detail": why} for uri, why in bad_names
    ]
    written = sum(s["rows"] for s in summaries)
    rejected_samples = sum(len(s["rejects"]) for s in summaries)
    # planned: the listed samples of every part built now, and what the markers of skipped parts account
    # for (such a part keeps its samples even if some were removed from the raw corpus since)
    planned = 0
    for p, rec in markers.items():
        accounted = [*rec["sample_ids"], *(r["sample_id"] for r in rec["rejects"])]
        if p in listed and not set(listed[p]) <= set(accounted):
            raise RuntimeError(f"counts do not add up: part {p} accounts for {len(accounted)} samples, "
                               f"{len(set(listed[p]) - set(accounted))} listed ones are neither written nor rejected")  # fmt: skip
        planned += len(accounted)
    if set(listed) - set(markers):
        raise RuntimeError(
            f"counts do not add up: parts {sorted(set(listed) - set(markers))[:5]} have no marker"
        )
    by_reason = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    elapsed = time.time() - t0
    manifest = {
        "format": "olmoearth-shards",
        "format_version": FORMAT_VERSION,
        "raw_uri": cfg.raw_uri,
        "seed": plan["seed"],
        "num_parts": plan["num_parts"],
        "samples_found": len(samples),
        "samples_planned": planned,
        "samples_written": written,
        "samples_rejected": rejected_samples,
        "files_bad_name": len(bad_names),
        "rejected_by_reason": by_reason,
        "bytes_in": sum(s["bytes_in"] for s in summaries),
        "bytes_out": sum(s["bytes_out"] for s in summaries),
        "shards": [
            {"path": s["shard"], "rows": s["rows"], "bytes": s["bytes_out"]} for s in summaries if s["shard"]
        ],
        "reasons": REASONS,
    }
    storage.write_text(join(cfg.out_uri, "manifest.json"), json.dumps(manifest, indent=1))
    storage.write_text(join(cfg.out_uri, "rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects))
    this_run = {"samples_this_run": n_todo, "parts_this_run": len(todo_parts),
                "parts_skipped": len(listed) - len(todo_parts),
                "seconds": elapsed, "samples_per_s": n_todo / elapsed if elapsed > 0 else 0.0}  # fmt: skip
    return {
        **{k: v for k, v in manifest.items() if k not in ("shards", "reasons")},
        "num_shards": len(manifest["shards"]),
        **this_run,
    }


def format_summary(s: dict) -> str:
    lines = [
        f"samples found {s['samples_found']}, written {s['samples_written']}, rejected {s['samples_rejected']}"
        + (f" (+{s['files_bad_name']} files with bad names)" if s["files_bad_name"] else ""),
        "rejected by reason: "
        + (", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "none"),
        f"bytes read {s['bytes_in'] / 1e6:.1f} MB, shards {s['num_shards']} ({s['bytes_out'] / 1e6:.1f} MB)",
        f"this run: {s['samples_this_run']} samples in {s['parts_this_run']} parts ({s['parts_skipped']} parts "
        f"already done), {s['seconds']:.1f} s, {s['samples_per_s']:.2f} samples/s",
    ]
    return "\n".join(lines)
