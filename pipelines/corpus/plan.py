"""The corpus build's plan: which part (= output shard) each sample goes to, and which parts need building.

A sample's part is a hash of (seed, sample id) modulo the number of parts, which the first build fixes
(`<out>/plan.json`). This IS the write-time global shuffle (a shard is a random subset of the corpus, in hash
order), and it lets any worker route a sample's data to its part without a sample -> part table. A part
needs building unless its done marker accounts for every sample listed for it now and holds no reject to
look at again: an `unreadable` one (an outage, not the data) always, any one when asked to retry rejects.
"""

from __future__ import annotations

import collections
import hashlib

from pipelines.corpus.shards import FORMAT_VERSION


def sample_hash(sample_id: str, seed: int) -> int:
    """A stable 64-bit hash of (seed, sample id): the part (modulo) and the order inside it."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest(), "little")


def part_of(sample_id: str, seed: int, num_parts: int) -> int:
    return sample_hash(sample_id, seed) % num_parts


def make_plan(num_samples: int, cfg, old: dict | None, uri: str) -> dict:
    """The first build fixes the number of parts; a rerun keeps it (and must use the same seed).
    cfg: the BuildConfig (raw_uri, seed, samples_per_shard)."""
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


def listed_parts(sample_ids, plan: dict) -> dict[int, list[str]]:
    """part -> the sample ids listed now that belong to it."""
    listed: dict[int, list[str]] = collections.defaultdict(list)
    for sid in sample_ids:
        listed[part_of(sid, plan["seed"], plan["num_parts"])].append(sid)
    return listed


def accounted(marker: dict | None) -> set[str]:
    """The sample ids a part's done marker accounts for: written or rejected."""
    if not marker:
        return set()
    return set(marker["sample_ids"]) | {r["sample_id"] for r in marker["rejects"]}


RETRIED_REASONS = ("unreadable",)  # rejects every rerun retries: the file may read fine next time


def parts_to_build(listed: dict[int, list[str]], markers: dict[int, dict], retry_rejects: bool = False
                   ) -> list[int]:  # fmt: skip
    """The parts without a marker, whose marker misses a listed sample (new since), or whose marker holds a
    reject to retry (RETRIED_REASONS; with retry_rejects, any)."""

    def retry(marker: dict) -> bool:
        return any(retry_rejects or r["reason"] in RETRIED_REASONS for r in marker["rejects"])

    return [p for p in sorted(listed)
            if not set(listed[p]) <= accounted(markers.get(p)) or retry(markers[p])]  # fmt: skip
