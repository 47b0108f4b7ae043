"""The per-tile results of an area job on storage, written by the workers and read by the driver:

    out/tiles/<first tile>_<random>.npz   one per encoder batch: a (h, w, D) float32 array per finished tile
    out/tiles/<same name>.json            {"tiles": {tile id: {"status", "error", "max_abs", ...}}}

The .json is written after the .npz it points at, each atomically, so a status a reader finds is backed by
its embeddings; this is what makes a job resumable per tile (a rerun skips tiles some .json says are "ok").
"""

from __future__ import annotations

import io
import json
import os

import numpy as np

from pipelines.common.storage import Storage, join

TILE_DIR = "tiles"


def write_batch_results(storage: Storage, out: str, name: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """tiles/<name>.npz (float32 (h, w, D) per finished tile id), then tiles/<name>.json {"tiles": {id: status}}."""
    folder = join(out, TILE_DIR)
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        storage.write_bytes(join(folder, name + ".npz"), buf.getvalue())
    storage.write_bytes(join(folder, name + ".json"), json.dumps({"tiles": meta}).encode())


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


def load_tiles(storage: Storage, out: str, files: list[str]) -> dict[str, np.ndarray]:
    """{tile id: (h, w, D) embedding} of every tile in the given out/tiles/*.npz files (fetched concurrently)."""
    if not files:
        return {}
    got = storage.fs(out).cat([join(out, TILE_DIR, f) for f in sorted(set(files))])
    tiles = {}
    for data in got.values():
        with np.load(io.BytesIO(data)) as z:
            tiles.update({k: z[k] for k in z.files})
    return tiles
