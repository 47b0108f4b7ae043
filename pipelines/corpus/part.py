"""One part of the corpus build -> one shard: the Ray Data map function and its shard output.

Each task reads its samples one by one (one GET per file; the next sample's files are fetched concurrently
while this one is processed), validates them (pipelines/corpus/validate.py) and appends one Parquet row
group per sample to its shard through a streaming writer whose upload runs in a background thread, so a
worker holds one sample at a time whatever the corpus size. On finishing it writes
`<out>/_done/part-NNNNNN.json` (sample ids, rejects with file and reason, bytes, per-band partial
statistics). A shard is only visible once complete (Storage.open_atomic). Only data problems (RejectError)
become rejects, and read errors: a failed read of a raw file is retried with backoff (READ_ATTEMPTS), and
one that keeps failing is filed as `unreadable`, which the next run retries. Any other exception is a bug
and fails the task, and so the job.
"""

from __future__ import annotations

import collections
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

from olmoearth.modalities import MODALITIES
from pipelines.common.storage import Storage, is_s3, join
from pipelines.corpus.shards import shard_path, shard_writer, write_sample
from pipelines.corpus.stats import empty_stats, merge_stats, stats_vector
from pipelines.corpus.timesteps import read_part_timesteps
from pipelines.corpus.validate import RejectError, load_bandsets

UPLOAD_CHUNK = 16 * 2**20  # bytes handed to the S3 upload at a time
READ_ATTEMPTS = 4  # reads of a raw file before it is filed as `unreadable`
RETRY_WAIT_S = 0.5  # wait before the first retry; doubled before each next one


def done_uri(out_uri: str, part: int) -> str:
    return join(out_uri, "_done", f"part-{part:06d}.json")


def build_part(item: dict, cfg) -> dict:
    """Ray Data map function: build one part. item: {"spec": JSON {"part", "samples": [{"sample_id",
    "files"}], "timesteps": routed ranges}}; cfg: the BuildConfig. Returns its done-marker summary."""
    spec = json.loads(item["spec"])
    part, storage = spec["part"], Storage()
    t0, cpu0 = time.time(), time.process_time()
    periods = read_part_timesteps(storage.fs(cfg.out_uri), spec["timesteps"])
    uri = join(cfg.out_uri, shard_path(part))
    with _Shard(uri, storage, cfg.compression_level) as shard:
        rows, rejects, acc, bytes_in = _write_samples(shard, spec["samples"], periods, storage, cfg.raw_uri)
    bytes_out = int(storage.fs(uri).info(uri)["size"]) if rows else 0
    record = {
        "part": part,
        "shard": shard_path(part) if rows else None,
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
    storage.write_text(done_uri(cfg.out_uri, part), json.dumps(record))
    return {"part": part, "rows": len(rows), "rejected": len(rejects), "bytes_in": bytes_in}


def _write_samples(shard, samples: list[dict], periods_all: dict, storage: Storage, raw_uri: str):
    """Read, validate and append every sample -> (written ids, rejects, stats (5, NB), raw bytes read)."""
    rejects, rows, bytes_in, acc = [], [], 0, empty_stats()
    fs = storage.fs(raw_uri)
    # the next sample's files are fetched (concurrently) in a thread while this one is decoded and written:
    # a worker holds at most one sample's decoded arrays plus the next sample's raw bytes
    with ThreadPoolExecutor(1) as pool:
        fetch = lambda s: pool.submit(_fetch_all, fs, [u for us in s["files"].values() for u in us])  # noqa: E731
        nxt = fetch(samples[0]) if samples else None
        for j, s in enumerate(samples):
            sid = s["sample_id"]
            periods = {m: periods_all.get(m, {}).get(sid, []) for m in s["files"] if MODALITIES[m].temporal}
            got, nxt = nxt.result(), (fetch(samples[j + 1]) if j + 1 < len(samples) else None)
            try:
                bands, months, meta = load_bandsets(sid, s["files"], periods, storage, read=_reader(got, fs),
                                                    with_stats=True)  # fmt: skip
            except RejectError as e:
                rejects.append({"sample_id": sid, "file": e.file, "reason": e.reason, "detail": e.detail})
                continue
            del got
            shard.write(sid, bands, months)
            acc = merge_stats(acc, stats_vector(meta["stats"]))
            rows.append(sid)
            bytes_in += meta["bytes"]
            del bands
    return rows, rejects, acc, bytes_in


class _Shard:
    """One part's shard, opened at its first sample and visible only once closed without an error (no file
    at all when no sample was written)."""

    def __init__(self, uri: str, storage: Storage, compression_level: int):
        self.uri, self.storage, self.level = uri, storage, compression_level
        self.stack, self.writer = contextlib.ExitStack(), None

    def write(self, sid: str, bands: dict, months) -> None:
        if self.writer is None:
            fh = self.stack.enter_context(self.storage.open_atomic(self.uri))
            if is_s3(self.uri):  # the upload overlaps the next samples' work
                fh = self.stack.enter_context(_BackgroundWriter(fh, UPLOAD_CHUNK))
            self.writer = shard_writer(fh, self.level)
        write_sample(self.writer, sid, bands, months)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            if exc[0] is None:
                self.writer.close()
            else:  # its footer goes into the file that is being discarded
                with contextlib.suppress(Exception):
                    self.writer.close()
        return self.stack.__exit__(*exc)


class _BackgroundWriter:
    """A write-only stream that gathers writes into `chunk_bytes` chunks and hands each to `fh.write` in one
    background thread; the caller blocks only while `depth` chunks already wait (the upload is behind), so
    memory stays bounded. Closing it hands off the rest and waits; `fh` stays open (its owner commits it)."""

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
        self.closed = True
        try:
            if self.buf:
                self._hand_off()
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:  # the upload is abandoned: wait for the thread, keep the first error
            self.closed = True
            self.pool.shutdown(cancel_futures=True)


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


def _transient_errors() -> tuple[type, ...]:
    """Read errors worth retrying: I/O errors other than a missing file, and the S3 clients' own."""
    kinds: list[type] = [OSError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError

        kinds.append(BotoCoreError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError

        kinds.append(ClientError)
    return tuple(kinds)


TRANSIENT = _transient_errors()


def _is_transient(e: BaseException) -> bool:
    return isinstance(e, TRANSIENT) and not isinstance(e, (FileNotFoundError, IsADirectoryError))


def _get(fs, uri: str):
    """One GET of `uri`: its bytes, or the exception it raised."""
    try:
        return fs.cat_file(uri)
    except Exception as e:
        return e


def _reader(got: dict, fs):
    """read(uri) -> bytes for load_bandsets from prefetched results, else a GET; a read that fails with an
    I/O error is retried with backoff, then filed as RejectError("unreadable"); other errors are raised."""

    def read(uri):
        v = got.get(uri)
        if v is None or isinstance(v, KeyError):
            v = _get(fs, uri)
        for attempt in range(1, READ_ATTEMPTS):
            if not (isinstance(v, BaseException) and _is_transient(v)):
                break
            time.sleep(RETRY_WAIT_S * 2 ** (attempt - 1))
            v = _get(fs, uri)
        if isinstance(v, BaseException):
            if _is_transient(v):
                raise RejectError("unreadable", uri, f"{READ_ATTEMPTS} reads failed, the last with "
                                                     f"{type(v).__name__}: {v}") from None  # fmt: skip
            raise v
        return v

    return read
