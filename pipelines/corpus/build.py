"""Corpus build: raw GeoTIFFs in a bucket -> validated, globally shuffled Parquet training shards.

    summary = build_corpus(BuildConfig(raw_uri="s3://raw", out_uri="s3://shards"))

Plan, then a Ray Data pipeline over *parts* (one part = one output shard):
1. list the raw files and group them by sample id (names that do not parse, and second spellings of one
   file, are reported, never dropped); an empty listing fails the job and persists nothing;
2. plan (pipelines/corpus/plan.py): a sample's part is a hash of (seed, sample id), the number of parts
   fixed by the first build; this is the write-time global shuffle;
3. timesteps (pipelines/corpus/timesteps.py): Ray tasks route the timestep CSVs' rows to their parts;
4. `ray.data.from_items(parts).map(build_part)` (pipelines/corpus/part.py): each task validates its
   samples and streams them into its shard, then writes its done marker. A rerun skips every part whose
   marker accounts for all its listed samples (an unreadable marker counts as none, with a warning) and
   holds no `unreadable` reject (or, with retry_rejects, no reject at all): the build is idempotent, resumes
   after a crash and retries what an outage kept it from reading;
5. per-band normalisation statistics: the markers' partial statistics merged on the driver
   (pipelines/corpus/stats.py) -> `<out>/norm_stats.json`;
6. `<out>/manifest.json` (shards with row counts, totals, rejects by reason) and `<out>/rejects.jsonl`.
   Counts add up (checked before writing): samples planned == samples written + samples rejected, and
   files found == files used + files with bad names + duplicate files. Every metadata file is written
   atomically (Storage.write_bytes: temp file + rename locally, one PUT on S3).
The shard format: pipelines/corpus/shards.py.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from olmoearth.modalities import MODALITIES
from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.part import build_part
from pipelines.corpus.plan import accounted, listed_parts, make_plan, parts_to_build, sample_hash
from pipelines.corpus.shards import FORMAT_VERSION, MANIFEST_FILE, NORM_STATS_FILE
from pipelines.corpus.stats import NB, empty_stats, merge_stats, stats_to_norm_json
from pipelines.corpus.timesteps import route_all_timesteps
from pipelines.corpus.validate import REASONS

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    raw_uri: str = ""  # where the raw corpus is (s3://bucket/prefix or a path)
    out_uri: str = ""  # where shards, manifest and statistics go
    samples_per_shard: int = 16  # mean 256x256 samples per Parquet shard (fixed by the first build)
    seed: int = 0  # seed of the global shuffle of samples into shards
    compression_level: int = 1  # zstd level of the shards
    num_cpus_per_task: float = 1.0  # CPUs reserved per part task
    max_concurrency: int = 0  # most part tasks at once (0: Ray decides)
    timesteps_chunk_mb: float = 64.0  # MB of timestep CSV routed per Ray task
    retry_rejects: bool = False  # re-examine every sample earlier runs rejected (`unreadable` ones always are)


class EmptyCorpusError(ValueError):
    """The raw URI holds no sample at all (empty, or mistyped): nothing is built and no plan is saved."""


def build_corpus(cfg: BuildConfig, storage: Storage | None = None) -> dict:
    """Run the build (needs a Ray cluster: ray.init() or an address). Returns the manifest summary."""
    if not cfg.raw_uri or not cfg.out_uri:
        raise ValueError("build-corpus needs raw_uri and out_uri")
    storage = storage or Storage()
    t0 = time.time()
    # the listing is the one per-sample table the driver holds
    listing = rl.list_raw(cfg.raw_uri, storage)
    samples = listing.samples
    if not samples:
        raise EmptyCorpusError(
            f"no raw corpus sample under {cfg.raw_uri} ({listing.files_found} .tif files in its modality "
            f"folders, {len(listing.bad_names)} with bad names): is raw_uri right? Nothing was built"
        )
    storage.makedirs(cfg.out_uri)
    plan = _load_plan(cfg, storage, len(samples))
    listed = listed_parts(samples, plan)
    markers = _read_markers(storage, join(cfg.out_uri, "_done"))
    todo = parts_to_build(listed, markers, cfg.retry_rejects)
    if todo:
        _run_parts(cfg, samples, listed, todo, plan)
        markers.update(_read_markers(storage, join(cfg.out_uri, "_done"), todo))  # this run's markers
    summaries = [markers[p] for p in sorted(markers) if p < plan["num_parts"]]
    _write_norm_stats(cfg.out_uri, storage, summaries)
    manifest = _write_manifest(cfg, storage, plan, listing, listed, markers, summaries)
    n_todo, elapsed = sum(len(listed[p]) for p in todo), time.time() - t0
    this_run = {"samples_this_run": n_todo, "parts_this_run": len(todo), "parts_skipped": len(listed) - len(todo),
                "seconds": elapsed, "samples_per_s": n_todo / elapsed if elapsed > 0 else 0.0}  # fmt: skip
    return {
        **{k: v for k, v in manifest.items() if k not in ("shards", "reasons")},
        "num_shards": len(manifest["shards"]),
        **this_run,
    }


def _load_plan(cfg: BuildConfig, storage: Storage, num_samples: int) -> dict:
    """The plan of an earlier build of out_uri (checked against cfg), else a new one, saved."""
    uri = join(cfg.out_uri, "plan.json")
    old = None
    if storage.exists(uri):
        try:
            old = json.loads(storage.read_text(uri))
        except (ValueError, UnicodeDecodeError) as e:  # the finished shards' part numbers depend on it
            raise ValueError(f"{uri}: unreadable plan ({e}); it fixes the parts of the shards built so "
                             "far: restore it or use a new out_uri") from None  # fmt: skip
    plan = make_plan(num_samples, cfg, old, uri)
    if plan != old:
        storage.write_text(uri, json.dumps(plan))
    return plan


def _run_parts(cfg: BuildConfig, samples: dict, listed: dict, todo: list[int], plan: dict) -> None:
    """Route the timesteps, then build the parts `todo` with Ray Data (each writes its done marker)."""
    import ray

    routed = route_all_timesteps(
        cfg.raw_uri, cfg.out_uri, plan, cfg.timesteps_chunk_mb, cfg.num_cpus_per_task
    )
    items = part_items(samples, listed, todo, plan, routed)
    del routed
    kwargs = {"num_cpus": cfg.num_cpus_per_task}
    if cfg.max_concurrency > 0:
        kwargs["concurrency"] = cfg.max_concurrency
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    results = ds.map(functools.partial(build_part, cfg=cfg), **kwargs)
    bar = tqdm(total=sum(len(listed[p]) for p in todo), desc="build-corpus", unit="sample", disable=None)
    for r in results.iter_rows():
        bar.update(r["rows"] + r["rejected"])
    bar.close()


def part_items(samples: dict, listed: dict, todo: list[int], plan: dict, routed: dict) -> list[dict]:
    """The Ray Data items of the parts `todo`: {"spec": JSON {"part", "samples", "timesteps"}} each."""
    items = []
    for p in todo:
        sids = sorted(listed[p], key=lambda s: sample_hash(s, plan["seed"]))  # a random order inside
        specs = [{"sample_id": sid, "files": {m: u for m, u in samples[sid].items() if m in MODALITIES}}
                 for sid in sids]  # fmt: skip
        items.append({"spec": json.dumps({"part": p, "samples": specs, "timesteps": routed.get(p, {})})})
    return items


def _read_markers(storage: Storage, done_uri: str, parts: list[int] | None = None) -> dict[int, dict]:
    """part -> its done marker (every marker under done_uri, or those of `parts`), fetched concurrently.
    A marker that cannot be read or parsed (truncated, say) counts as absent, with a warning: its part is
    built again."""
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
    try:
        got = fs.cat(uris, on_error="return") if len(uris) > 1 else {uris[0]: fs.cat_file(uris[0])}
    except Exception as e:  # one marker, fetched alone: judged below like one of many
        got = {uris[0]: e}
    out = {}
    for uri, text in got.items():
        if isinstance(text, FileNotFoundError):
            continue  # not written (yet): its part is not done
        try:
            if isinstance(text, BaseException):
                raise text
            rec = json.loads(text)
            part, _ = int(rec["part"]), (accounted(rec), rec["rows"], rec["stats"])  # what later steps read
        except (ValueError, KeyError, TypeError, OSError) as e:
            log.warning("ignoring unreadable done marker %s (%s: %s); its part is built again",
                        uri, type(e).__name__, e)  # fmt: skip
            continue
        out[part] = rec
    return out


def _write_norm_stats(out_uri: str, storage: Storage, summaries: list[dict]) -> None:
    """Statistics over every done marker (this run's and earlier runs'): each marker carries its part's
    (5, NB) partial statistics, computed in the same pass that wrote the shard, so merging these small rows
    on the driver needs no second pass over the data."""
    acc = empty_stats()
    for rec in summaries:
        acc = merge_stats(acc, np.asarray(rec["stats"], np.float64).reshape(5, NB))
    storage.write_text(join(out_uri, NORM_STATS_FILE), json.dumps(stats_to_norm_json(acc), indent=1))


def _count_planned(listed: dict, markers: dict) -> int:
    """The listed samples of every part built now, and what the markers of skipped parts account for (such a
    part keeps its samples even if some were removed from the raw corpus since); raises if counts do not add up."""
    planned = 0
    for p, rec in markers.items():
        done = accounted(rec)
        if p in listed and not set(listed[p]) <= done:
            raise RuntimeError(f"counts do not add up: part {p} accounts for {len(done)} samples, "
                               f"{len(set(listed[p]) - done)} listed ones are neither written nor rejected")  # fmt: skip
        planned += len(rec["sample_ids"]) + len(rec["rejects"])
    if set(listed) - set(markers):
        raise RuntimeError(
            f"counts do not add up: parts {sorted(set(listed) - set(markers))[:5]} have no marker"
        )
    return planned


def _write_manifest(cfg: BuildConfig, storage: Storage, plan: dict, listing, listed: dict, markers: dict,
                    summaries: list[dict]) -> dict:  # fmt: skip
    """manifest.json and rejects.jsonl -> the manifest. Files that never reached a part (bad names, second
    spellings) are reported there too."""
    rejects = [dict(r, part=s["part"]) for s in summaries for r in s["rejects"]]
    rejects += [{"sample_id": None, "file": uri, "reason": "bad_name", "detail": why}
                for uri, why in listing.bad_names]  # fmt: skip
    rejects += [{"sample_id": sid, "file": uri, "reason": "duplicate_file",
                 "detail": f"the same sample and bandset as {kept}, which is used"}
                for sid, uri, kept in listing.duplicates]  # fmt: skip
    planned = _count_planned(listed, markers)
    files_used = listing.files_used
    if files_used + len(listing.bad_names) + len(listing.duplicates) != listing.files_found:
        raise RuntimeError(f"counts do not add up: {listing.files_found} files found, {files_used} used, "
                           f"{len(listing.bad_names)} bad names, {len(listing.duplicates)} duplicates")  # fmt: skip
    by_reason = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    manifest = {
        "format": "olmoearth-shards",
        "format_version": FORMAT_VERSION,
        "raw_uri": cfg.raw_uri,
        "seed": plan["seed"],
        "num_parts": plan["num_parts"],
        "samples_found": len(listing.samples),
        "samples_planned": planned,
        "samples_written": sum(s["rows"] for s in summaries),
        "samples_rejected": sum(len(s["rejects"]) for s in summaries),
        "files_found": listing.files_found,
        "files_used": files_used,
        "files_bad_name": len(listing.bad_names),
        "files_duplicate": len(listing.duplicates),
        "rejected_by_reason": by_reason,
        "bytes_in": sum(s["bytes_in"] for s in summaries),
        "bytes_out": sum(s["bytes_out"] for s in summaries),
        "shards": [
            {"path": s["shard"], "rows": s["rows"], "bytes": s["bytes_out"]} for s in summaries if s["shard"]
        ],
        "reasons": REASONS,
    }
    storage.write_text(join(cfg.out_uri, MANIFEST_FILE), json.dumps(manifest, indent=1))
    storage.write_text(join(cfg.out_uri, "rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects))
    return manifest


def format_summary(s: dict) -> str:
    lines = [
        f"samples found {s['samples_found']}, written {s['samples_written']}, rejected {s['samples_rejected']}"
        + (f" (+{s['files_bad_name']} files with bad names)" if s["files_bad_name"] else "")
        + (f" (+{s['files_duplicate']} duplicate files)" if s["files_duplicate"] else ""),
        "rejected by reason: "
        + (", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "none"),
        f"bytes read {s['bytes_in'] / 1e6:.1f} MB, shards {s['num_shards']} ({s['bytes_out'] / 1e6:.1f} MB)",
        f"this run: {s['samples_this_run']} samples in {s['parts_this_run']} parts ({s['parts_skipped']} parts "
        f"already done), {s['seconds']:.1f} s, {s['samples_per_s']:.2f} samples/s",
    ]
    return "\n".join(lines)
