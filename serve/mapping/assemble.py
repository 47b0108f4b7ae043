"""Blend finished tiles into the mosaic while the workers are still encoding.

The mosaic is written in bands of `block_tokens` token rows. A band is blended and written as soon as every
tile overlapping it has a final status (ok, failed or empty), so the driver assembles the top of the area
while the workers encode the rest; after the last tile only the last band, the COG copy and the preview are
left. Memory: the tiles of the bands not yet written (about two bands of tiles when results arrive in plan
order) and one block's accumulators.

    mosaic = StreamingMosaic(cfg, grid, tiles, storage, workdir)
    mosaic.add(tile_id, status)        # every tile's result, in any order ({"status", "file", "max_abs"})
    outputs = mosaic.finish()          # the other bands; COG / zarr / PNG uploaded to cfg.out -> {kind: uri}

int8 output needs the area's largest |value| for its scale, known only at the end: then every band is
written in finish().

The preview's tiling component (preview_detile): an encoder sees every tile at tile-relative positions, so a
weakly trained one adds the same position signal to each tile, and a plain PCA paints the tile lattice
instead of the land. The PNG leaves out the mean embedding at each tile-relative position, blended exactly
as the tiles are. That mean is taken over the full-size tiles loaded for the first band written (a row of
tiles across the area's width); the COG and zarr keep the encoder's embeddings.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from pipelines.common.storage import Storage, is_s3, join
from pipelines.imagery.grid import Grid, Tile
from serve.mapping.blend import tile_weights
from serve.mapping.tile_store import TILE_DIR, load_tiles


class StreamingMosaic:
    def __init__(self, cfg, grid: Grid, tiles: list[Tile], storage: Storage, workdir: str, zone: str = "",
                 zarr_path: str | None = None):  # fmt: skip
        """zone, zarr_path: one UTM zone of a map over several (its file suffix and chip id prefix, the zarr
        store the zones share; MosaicWriter); "" and None for a map of one grid."""
        self.cfg, self.grid, self.storage, self.workdir = cfg, grid, storage, workdir
        self.zone, self.zarr_path = zone, zarr_path
        self.int8_max_abs: float | None = None  # the largest |value| of all zones of the map (set before finish)
        p = self.p = cfg.patch_size
        self.size_t, self.ov_t = cfg.tile_size // p, cfg.overlap // p  # tile side and overlap in tokens
        self.ht, self.wt = grid.height // p, grid.width // p  # mosaic size in tokens
        self.bt = cfg.block_tokens
        self.n_rows, self.n_cols = max(t.row for t in tiles) + 1, max(t.col for t in tiles) + 1
        self.tiles = {t.id: t for t in tiles}
        self.n_bands = -(-self.ht // self.bt)
        self.band_tiles: list[list[str]] = [[] for _ in range(self.n_bands)]  # tile ids overlapping each band
        for t in tiles:
            for b in self._bands(t):
                self.band_tiles[b].append(t.id)
        self.unresolved = [set(ids) for ids in self.band_tiles]  # tiles each band still waits for
        self.status: dict[str, dict] = {}
        self.written: set[int] = set()
        self.cache: dict[str, np.ndarray] = {}  # embeddings of tiles some unwritten band needs
        self.writer = None
        self.detile = bool(cfg.preview and cfg.preview_detile)
        # the preview's tiling component: per tile-relative position, the sum and count of finite embeddings
        # (a tile enters the cache at most once: it leaves when all its bands are written, and _load skips such
        # tiles, so none is counted twice)
        self.position_sum = self.position_count = self.position_mean = None
        self.seconds = 0.0  # spent loading, blending and writing
        self.source_items: list[dict] = []  # the STAC records of the area (chips.parquet, geoemb:source_data)
        self.chips = None
        if getattr(cfg, "chips_parquet", False):
            from serve.mapping.chips import ChipTable

            self.chips = ChipTable(grid, self.p, cfg.chip_tokens, prefix=f"{zone}_" if zone else "")

    def _bands(self, t: Tile) -> range:
        y0 = t.y // self.p
        y1 = min(y0 + self.size_t, self.ht)
        return range(y0 // self.bt, (y1 - 1) // self.bt + 1)

    def _ok(self, tile_id: str) -> bool:
        return self.status.get(tile_id, {}).get("status") == "ok"

    # ---- feeding --------------------------------------------------------------------------------------------

    def add(self, tile_id: str, status: dict) -> None:
        """Record a tile's final status; write every band that no longer waits for a tile."""
        if tile_id not in self.tiles or self._ok(tile_id):  # ok from an earlier run stays ok
            return
        self.status[tile_id] = status
        for b in self._bands(self.tiles[tile_id]):
            self.unresolved[b].discard(tile_id)
        if self.cfg.int8:
            return
        for b in range(self.n_bands):
            if b not in self.written and not self.unresolved[b] and self._writer_ready():
                self._write_band(b)

    def has_data(self) -> bool:
        """Whether some tile is ok (else finish() has nothing to write)."""
        return any(self._ok(i) for i in self.tiles)

    def finish(self, upload_files: bool = True) -> dict[str, str]:
        """Write the bands left (tiles without a result are missing), close the files, upload them -> {kind:
        uri}; upload_files False: {kind: local path} (the zones of one map are uploaded together)."""
        if not any(self._ok(i) for i in self.tiles):
            raise RuntimeError(f"no tile of {len(self.tiles)} was embedded; see report.json and "
                               f"{join(self.cfg.out, TILE_DIR)}/*.json")  # fmt: skip
        for b in range(self.n_bands):
            if b not in self.written:
                self._write_band(b)
        t0 = time.time()
        local = self.writer.close()
        if self.chips is not None:
            path = self.chips.write(os.path.join(self.workdir, "chips.parquet"), list(self.tiles.values()),
                                    self.source_items, (self.cfg.time_start, self.cfg.time_end))  # fmt: skip
            if path:
                local["chips"] = path
        outputs = upload(self.storage, self.cfg.out, local) if upload_files else local
        self.seconds += time.time() - t0
        return outputs

    # ---- writing --------------------------------------------------------------------------------------------

    def _writer_ready(self) -> bool:
        """The writer needs the embedding dimension: it is opened once some tile is ok."""
        if self.writer is None and any(self._ok(i) for i in self.status):
            first = next(i for i in self.status if self._ok(i))
            self._load([first])
            self._open_writer(int(self.cache[first].shape[-1]))
        return self.writer is not None

    def _open_writer(self, dim: int) -> None:
        from serve.mapping.mosaic import MosaicWriter

        cfg = self.cfg
        scale = None
        if cfg.int8:  # only in finish(): every status (and max |value|) is known
            max_abs = self.int8_max_abs if self.int8_max_abs is not None else self.max_abs()
            scale = max_abs / 127.0 if max_abs > 0 else 1.0
        from serve.mapping.stac_item import source_refs

        tags = {"model": cfg.model_uri, "patch_size": self.p, "tile_size": cfg.tile_size, "overlap": cfg.overlap}
        self.writer = MosaicWriter(self.workdir, self.grid, self.p, dim, cfg.formats, scale, cfg.preview,
                                   tags=tags, block=self.bt, source_data=source_refs(cfg),
                                   suffix=f"_{self.zone}" if self.zone else "", zarr_path=self.zarr_path)  # fmt: skip

    def max_abs(self) -> float:
        """The largest |value| of the ok tiles (their statuses'): the int8 scale is this / 127."""
        return max((float(s.get("max_abs", 0.0)) for s in self.status.values() if s.get("status") == "ok"), default=0.0)

    def _load(self, tile_ids: list[str]) -> None:
        """Bring the embeddings of these ok tiles into the cache (with the other tiles in the same files)."""
        missing = [i for i in tile_ids if i not in self.cache]
        files = [self.status[i]["file"] for i in missing]
        for tile_id, emb in load_tiles(self.storage, self.cfg.out, files).items():
            t = self.tiles.get(tile_id)
            if t is None or tile_id in self.cache or all(b in self.written for b in self._bands(t)):
                continue
            self.cache[tile_id] = emb
            full = emb.shape[:2] == (self.size_t, self.size_t)
            if self.detile and self.position_mean is None and full:
                if self.position_sum is None:
                    self.position_sum, self.position_count = np.zeros(emb.shape), np.zeros(emb.shape)
                self.position_sum += np.nan_to_num(emb)
                self.position_count += np.isfinite(emb)

    def _write_band(self, b: int) -> None:
        t0 = time.time()
        if self.writer is None:
            self._writer_ready()
        ids = [i for i in self.band_tiles[b] if self._ok(i)]
        self._load(ids)
        if self.detile and self.position_mean is None and self.position_sum is not None:  # frozen from now on
            self.position_mean = (self.position_sum / np.maximum(self.position_count, 1)).astype(np.float32)
        by = b * self.bt
        for bx in range(0, self.wt, self.bt):
            block, tiling = self._blend_block(ids, by, bx)
            self.writer.write_block(by, bx, block, preview_minus=tiling)
            if self.chips is not None:
                self.chips.add_block(by, bx, block)
        self.written.add(b)
        for tile_id in [i for i in self.cache if all(bb in self.written for bb in self._bands(self.tiles[i]))]:
            del self.cache[tile_id]
        self.seconds += time.time() - t0

    def _blend_block(self, ids: list[str], by: int, bx: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The output block at token (by, bx): the weighted mean of the ok tiles `ids` that reach it, NaN where
        none does; and the tiling component blended the same way (None without de-tiling)."""
        bh, bw, st = min(self.bt, self.ht - by), min(self.bt, self.wt - bx), self.size_t
        acc = np.zeros((bh, bw, self.writer.dim), np.float32)
        wsum = np.zeros((bh, bw, 1), np.float32)
        pacc = np.zeros_like(acc) if self.position_mean is not None else None
        for tile_id in ids:
            t = self.tiles[tile_id]
            ty, tx = t.y // self.p, t.x // self.p
            y0, y1 = max(by, ty), min(by + bh, ty + st, self.ht)
            x0, x1 = max(bx, tx), min(bx + bw, tx + st, self.wt)
            if y0 >= y1 or x0 >= x1:
                continue
            inside = (slice(y0 - ty, y1 - ty), slice(x0 - tx, x1 - tx))
            e = self.cache[tile_id][inside]
            w = tile_weights(t, self.n_cols, self.n_rows, self.ov_t, st)[inside][..., None]
            w = np.where(np.isfinite(e).all(-1, keepdims=True), w, 0.0).astype(np.float32)
            out = (slice(y0 - by, y1 - by), slice(x0 - bx, x1 - bx))
            acc[out] += w * np.nan_to_num(e)
            wsum[out] += w
            if pacc is not None:
                pacc[out] += w * self.position_mean[inside]
        block = np.where(wsum > 0, acc / np.maximum(wsum, 1e-12), np.nan).astype(np.float32)
        return block, None if pacc is None else pacc / np.maximum(wsum, 1e-12)


def upload(storage: Storage, out: str, local: dict[str, str]) -> dict[str, str]:
    """Copy the local outputs {kind: file or folder} into `out` (s3:// or local) -> {kind: uri}; a folder
    replaces what an earlier run left there."""
    outputs = {}
    for kind, path in local.items():
        uri = join(out, os.path.basename(path))
        if is_s3(out):
            fs = storage.fs(uri)
            if os.path.isdir(path):
                if fs.exists(uri):
                    fs.rm(uri, recursive=True)
                fs.put(path.rstrip("/") + "/", uri, recursive=True)
            else:
                fs.put(path, uri)
        else:
            os.makedirs(out, exist_ok=True)
            if os.path.isdir(path):
                shutil.rmtree(uri, ignore_errors=True)
                shutil.copytree(path, uri)
            else:
                shutil.copyfile(path, uri)
        outputs[kind] = uri
    return outputs
