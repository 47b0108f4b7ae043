"""Corpus build: raw GeoTIFFs in a bucket -> validated, globally shuffled Parquet training shards.

    summary = build_corpus(BuildConfig(raw_uri="s3://raw", out_uri="s3://shards"), storage)

Plan, then a Ray Data pipeline over *parts* (one part = one output shard):
1. list the raw files and group them by sample id (names that do not parse are rejected, never dropped);
2. plan: shuffle the sample ids once with the seed (this IS the global shuffle: shards are consecutive
   chunks of the shuffled list, so no sample data ever moves through a shuffle) and cut them into parts
   of `samples_per_shard`; the plan is written to `<out>/plan.json` and reused by every rerun (samples
   that appear later go to new parts);
3. `ray.data.from_items(parts).map(build_part)`: each task reads its samples one by one (one GET per
   file; the next sample's files are fetched concurrently, in a thread, while this one is processed),
   validates them (pipelines/raster.py), grids every bandset onto 10 m, and appends one Parquet
   row group per sample to its shard through a streaming writer, so a worker holds one sample at a
   time whatever the corpus size. On finishing, it writes `<out>/_done/part-NNNNNN.json` (rows, bytes,
   rejects with file and reason, per-band partial statistics). Parts with a done marker are skipped by a
   rerun: the build is idempotent and resumes after a crash (a shard is only visible once complete:
   local files are renamed into place, S3 objects appear when their upload completes);
4. per-band normalisation statistics: the done markers' partial statistics (computed while writing the
   shard) merged on the driver (Chan's parallel mean/variance merge plus min/max) -> `<out>/norm_stats.json`;
5. `<out>/manifest.json` (shards with row counts, totals, rejects by reason) and `<out>/rejects.jsonl`.
   Counts add up: samples found == samples written + samples rejected (checked before writing).

Shard format (Parquet, zstd (level 1 by default), one row group per sample, no dictionary/statistics) -- see docs/corpus.md:
    sample_id string, epsg int32, col int32, row int32, months list<int8> (T,),
    <modality> binary | null : float16 little-endian, C-order (256, 256, T_m, C) in model units,
        NaN where missing; T_m = T for temporal modalities, 1 for maps; null if the sample lacks it.
"""

from __future__ import annotations

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
from pipelines import raw_layout as rl
from pipelines.raster import REASONS, RejectError, load_sample
from pipelines.storage import Storage, is_s3, join

FORMAT_VERSION = 1
F16_MAX = 65504.0
ALL_BANDS = [(m, b) for m, mod in MODALITIES.items() for b in mod.bands]  # 67, registry order
BAND_OFFSET = {}
_o = 0
for _m, _mod in MODALITIES.items():
    BAND_OFFSET[_m] = _o
    _o += _mod.num_bands
NB = len(ALL_BANDS)


@dataclass
class BuildConfig:
    raw_uri: str = field(
        default="", metadata={"help": "where the raw corpus is (s3://bucket/prefix or a path)"}
    )
    out_uri: str = field(default="", metadata={"help": "where shards, manifest and statistics go"})
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3 endpoint URL (else AWS_ENDPOINT_URL)"}
    )
    samples_per_shard: int = field(default=16, metadata={"help": "256x256 samples per Parquet shard"})
    seed: int = field(default=0, metadata={"help": "seed of the global shuffle of samples into shards"})
    compression_level: int = field(default=1, metadata={"help": "zstd level of the shards"})
    num_cpus_per_task: float = field(default=1.0, metadata={"help": "CPUs reserved per part task"})
    max_concurrency: int = field(default=0, metadata={"help": "most part tasks at once (0: Ray decides)"})


# ----------------------------------------------------------------------------------------------------------
# Per-band statistics (count, mean, M2, min, max over valid pixels), mergeable


def stats_vector(per_modality: dict[str, np.ndarray]) -> np.ndarray:
    """{modality: (5, C)} (from load_sample's meta["stats"]) -> (5, NB) over all registered bands."""
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
# One part -> one shard


def shard_schema() -> pa.Schema:
    fields = [("sample_id", pa.string()), ("epsg", pa.int32()), ("col", pa.int32()), ("row", pa.int32()),
              ("months", pa.list_(pa.int8()))]  # fmt: skip
    fields += [(m, pa.binary()) for m in MODALITIES]
    return pa.schema(fields, metadata={"olmoearth_shard_format": str(FORMAT_VERSION)})


def sample_table(sid: str, x: dict, months: np.ndarray) -> pa.Table:
    epsg, col, row = rl.parse_sample_id(sid)
    data = {
        "sample_id": [sid],
        "epsg": [epsg],
        "col": [col],
        "row": [row],
        "months": [months.astype(np.int8).tolist()],
    }
    for m in MODALITIES:
        a = x.get(m)
        if a is not None and a.dtype != np.float16:
            a = np.clip(a, -F16_MAX, F16_MAX).astype("<f2")
        data[m] = _binary_cell(a)
    return pa.table(data, schema=shard_schema())


def _binary_cell(a: np.ndarray | None) -> pa.Array:
    """One binary cell holding `a`'s bytes without copying them (a null cell for None)."""
    if a is None:
        return pa.nulls(1, pa.binary())
    a = np.ascontiguousarray(a)
    offsets = pa.py_buffer(np.array([0, a.nbytes], np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(a.reshape(-1).view(np.uint8))])


def decode_modality(row_value: bytes, modality: str, T: int) -> np.ndarray:
    """One shard cell -> float16 (256, 256, T_m, C) view (zero-copy)."""
    mod = MODALITIES[modality]
    t = T if mod.temporal else 1
    return np.frombuffer(row_value, dtype="<f2").reshape(256, 256, t, mod.num_bands)


def _atomic_writer(uri: str, storage: Storage):
    """-> (output stream, commit()) for a shard. S3: an s3fs multipart upload (the object appears only when
    it completes; pyarrow's own S3 multipart upload is refused by SeaweedFS); local: a temporary name."""
    if is_s3(uri):
        return storage.fs(uri).open(uri, "wb", block_size=32 * 2**20), lambda: None
    path = os.path.abspath(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path + ".tmp", "wb"), lambda: os.replace(path + ".tmp", path)


def build_part(item: dict) -> dict:
    """Ray Data map function: build one part (see module doc). Returns its done-marker record."""
    cfg = BuildConfig(**json.loads(item["cfg"]))
    storage = Storage(cfg.s3_endpoint)
    spec = json.loads(item["spec"])
    part = spec["part"]
    shard_rel = f"shards/part-{part:06d}.parquet"
    t0 = time.time()
    rejects, rows, bytes_in = [], [], 0
    acc = _empty_stats()
    fs_read = storage.fs(cfg.raw_uri)
    writer = stream = commit = None
    # the next sample's files are fetched (concurrently) in a thread while this one is decoded and written:
    # a worker holds at most one sample's decoded arrays plus the next sample's raw bytes
    pool = ThreadPoolExecutor(1)
    fetch = lambda s: pool.submit(_fetch_all, fs_read, [u for us in s["files"].values() for u in us])  # noqa: E731
    samples = spec["samples"]
    nxt = fetch(samples[0]) if samples else None
    for j, s in enumerate(samples):
        sid = s["sample_id"]
        periods = {m: [(i, _date(a), _date(b)) for i, a, b in v] for m, v in s["periods"].items()}
        got, nxt = nxt.result(), (fetch(samples[j + 1]) if j + 1 < len(samples) else None)
        try:
            x, months, meta = load_sample(sid, s["files"], periods, storage, read=_reader(got, fs_read),
                                          dtype=np.float16, with_stats=True)  # fmt: skip
        except RejectError as e:
            rejects.append({"sample_id": sid, "file": e.file, "reason": e.reason, "detail": e.detail})
            continue
        except Exception as e:  # anything unexpected is still accounted for, never lost
            rejects.append(
                {"sample_id": sid, "file": sid, "reason": "corrupt", "detail": f"{type(e).__name__}: {e}"}
            )
            continue
        if writer is None:
            stream, commit = _atomic_writer(join(cfg.out_uri, shard_rel), storage)
            # no dictionary and no min/max statistics: each binary cell is one large tensor
            writer = pq.ParquetWriter(pa.PythonFile(stream, mode="w"), shard_schema(), compression="zstd", use_dictionary=False,
                                      write_statistics=False, compression_level=cfg.compression_level)  # fmt: skip
        writer.write_table(sample_table(sid, x, months), row_group_size=1)
        acc = merge_stats(acc, stats_vector(meta["stats"]))
        rows.append(sid)
        bytes_in += meta["bytes"]
        del x
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
        "seconds": time.time() - t0,
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
    except Exception as e:  # kept for the reader to raise when load_sample reads that file
        return {u: e for u in uris}
    if len(uris) == 1:
        return {uris[0]: got}
    # fsspec keys the result by its own normalisation of the path (s3fs: without "s3://")
    return {u: got.get(u, got.get(fs._strip_protocol(u), KeyError(u))) for u in uris}


def _reader(got: dict, fs):
    """read(uri) -> bytes for load_sample from prefetched results (re-raising a read's error), else a GET."""

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


def _date(s: str):
    import datetime as dt

    return dt.date.fromisoformat(s)


# ----------------------------------------------------------------------------------------------------------
# The whole build


def make_plan(sample_ids: list[str], cfg: BuildConfig, old: dict | None) -> dict:
    """Assign samples to parts: the old plan's parts stay; new samples are shuffled into new parts."""
    parts = list(old["parts"]) if old else []
    known = {sid for p in parts for sid in p}
    new = [s for s in sample_ids if s not in known]
    rng = np.random.default_rng([cfg.seed, len(parts)])
    new = [new[i] for i in rng.permutation(len(new))]
    k = cfg.samples_per_shard
    parts += [new[i : i + k] for i in range(0, len(new), k)]
    return {"format": FORMAT_VERSION, "raw_uri": cfg.raw_uri, "seed": cfg.seed, "parts": parts}


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

    # 1. list and group
    samples, bad_names = rl.list_samples_lenient(cfg.raw_uri, storage)
    samples.pop("", None)
    periods_all = rl.read_timesteps(cfg.raw_uri, storage)

    # 2. plan (reused on rerun)
    plan_uri = join(cfg.out_uri, "plan.json")
    old = json.loads(storage.read_text(plan_uri)) if storage.exists(plan_uri) else None
    if old and old["raw_uri"] != cfg.raw_uri:
        raise ValueError(f"{plan_uri}: built from {old['raw_uri']}, not {cfg.raw_uri}; use a new out_uri")
    plan = make_plan(sorted(samples), cfg, old)
    if plan != old:
        storage.write_text(plan_uri, json.dumps(plan))

    # 3. parts not yet done
    done_uri = join(cfg.out_uri, "_done")
    fs = storage.fs(done_uri)
    try:
        done = {int(os.path.basename(p)[5:11]) for p in fs.ls(done_uri, detail=False) if p.endswith(".json")}
    except FileNotFoundError:
        done = set()
    cfg_json = json.dumps(cfg.__dict__)
    todo = []
    for k, sids in enumerate(plan["parts"]):
        if k in done:
            continue
        specs = []
        for sid in sids:
            files = {m: u for m, u in samples.get(sid, {}).items() if m in MODALITIES}
            per = {m: [(i, a.isoformat(), b.isoformat()) for i, a, b in periods_all.get(m, {}).get(sid, [])]
                   for m in files if MODALITIES[m].temporal}  # fmt: skip
            if sid not in samples:  # planned earlier, gone now: accounted for as a reject
                files = {
                    "sentinel2_l2a": [
                        rl.join(cfg.raw_uri, MODALITIES["sentinel2_l2a"].raw_folder, sid + "_10.tif")
                    ]
                }
                per = {"sentinel2_l2a": [(0, "2020-01-01", "2020-01-31")]}
            specs.append({"sample_id": sid, "files": files, "periods": per})
        todo.append({"cfg": cfg_json, "spec": json.dumps({"part": k, "samples": specs})})

    n_todo = sum(len(plan["parts"][json.loads(t["spec"])["part"]]) for t in todo)
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        kwargs = {"num_cpus": cfg.num_cpus_per_task}
        if cfg.max_concurrency > 0:
            kwargs["concurrency"] = cfg.max_concurrency
        results = ds.map(build_part, **kwargs)
        bar = tqdm(total=n_todo, desc="build-corpus", unit="sample", disable=None)
        for r in results.iter_rows():
            bar.update(r["rows"] + r["rejected"])
        bar.close()

    # 4. statistics over every done marker (this run's and earlier runs'): each marker carries its part's
    # (5, NB) partial statistics, computed in the same pass that wrote the shard; merging these small rows
    # on the driver (Chan's merge) replaces a second Ray Data job, whose start-up alone cost seconds
    marker_uris = [join(done_uri, f"part-{k:06d}.json") for k in range(len(plan["parts"]))]
    summaries = [json.loads(storage.read_text(u)) for u in marker_uris]
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
    planned = sum(len(p) for p in plan["parts"])
    rejected_samples = sum(len(s["rejects"]) for s in summaries)
    if written + rejected_samples != planned:
        raise RuntimeError(
            f"counts do not add up: {written} written + {rejected_samples} rejected != {planned}"
        )
    by_reason = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    elapsed = time.time() - t0
    manifest = {
        "format": "olmoearth-shards",
        "format_version": FORMAT_VERSION,
        "raw_uri": cfg.raw_uri,
        "seed": cfg.seed,
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
    this_run = {"samples_this_run": n_todo, "parts_this_run": len(todo), "parts_skipped": len(plan["parts"]) - len(todo),
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
