"""The corpus build's timestep routing: the per-modality timestep CSVs, split into byte ranges, routed by Ray
tasks to the parts their samples belong to; each part task then reads only its own rows.

A routing task writes its rows grouped by part into `<out>/_timesteps/<modality>-<start>.csv` (lines
"sample_id,image_idx,start,end") and returns the byte range of every part there. The driver never parses a
CSV: memory per node stays bounded whatever the corpus size.
"""

from __future__ import annotations

import collections
import csv
import datetime as dt

from olmoearth.modalities import MODALITIES
from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.plan import part_of


def csv_chunks(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges covering a file of `size` bytes; a range owns the lines that start inside it."""
    step = max(1, int(chunk_bytes))
    return [(a, min(a + step, size)) for a in range(0, size, step)] or [(0, 0)]


def route_timesteps(csv_uri: str, modality: str, start: int, end: int, header: list[str], seed: int,
                    num_parts: int, out_uri: str) -> dict:  # fmt: skip
    """Ray task: the CSV lines starting in [start, end) -> `<out>/_timesteps/<modality>-<start>.csv` holding
    "sample_id,image_idx,start,end" lines grouped by part; returns {"uri", "ranges": {part: [a, b]}}.
    A malformed line raises ValueError naming the file and the line's byte offset."""
    storage = Storage()
    col = rl.timestep_columns(list(header), csv_uri)
    by_part: dict[int, list[str]] = collections.defaultdict(list)
    for offset, line in _lines_starting_in(storage.fs(csv_uri), csv_uri, start, end):
        if offset == 0 or not line.strip():
            continue  # the header, blank lines
        try:
            sid, (idx, t0, t1) = rl.parse_timestep_row(next(csv.reader([line])), col)
        except ValueError as e:
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


def route_all_timesteps(raw_uri: str, out_uri: str, plan: dict, chunk_mb: float, num_cpus: float
                        ) -> dict[int, dict[str, list]]:  # fmt: skip
    """Route every temporal modality's CSV by part (Ray tasks) -> {part: {modality: [[uri, a, b], ...]}}."""
    import ray

    fs = Storage().fs(raw_uri)
    task = ray.remote(num_cpus=num_cpus)(route_timesteps)
    refs = []
    for name, mod in MODALITIES.items():
        if not mod.temporal:
            continue
        uri = rl.csv_uri(raw_uri, name)
        try:
            size = int(fs.info(uri)["size"])
        except FileNotFoundError:
            continue
        head = fs.cat_file(uri, start=0, end=min(size, 65536)).split(b"\n", 1)[0].decode().strip()
        header = next(csv.reader([head])) if head else []
        rl.timestep_columns(header, uri)  # a bad header fails here, once, not in every task
        for a, b in csv_chunks(size, int(chunk_mb * 2**20)):
            refs.append(task.remote(uri, name, a, b, header, plan["seed"], plan["num_parts"], out_uri))
    by_part: dict[int, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in ray.get(refs):
        for p, (a, b) in r["ranges"].items():
            by_part[int(p)][r["modality"]].append([r["uri"], a, b])
    return by_part


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
