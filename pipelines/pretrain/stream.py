"""The training stream: Parquet shards (pipelines/corpus/build.py) -> shuffled, cropped, masked, collated batches.

    ds = training_dataset(StreamConfig(shards_uri="s3://shards", batch_size=32), storage, epoch=3)
    for batch in iter_training_batches(ds, cfg):      # or ray.train.get_dataset_shard("train")
        ...                                            # the batch dict of olmoearth/layout.py, torch tensors

Design (one Ray Data row = ONE WHOLE COLLATED BATCH, because the patch size and crop are chosen per batch):
1. The epoch's sample order is fixed on the driver from (seed, epoch) alone, using only the manifest's
   row counts: each 256 x 256 cell is four 128 x 128 training samples (its quadrants);
   shuffle="local": a new random shard order, cells in shard order (shards were globally shuffled when
   written), then a shuffle inside consecutive windows of `local_shuffle_buffer` samples;
   shuffle="full": one global permutation of all cells every epoch, then the same window shuffle. Memory
   is the same (a window at a time); the price of "full" is random row-group reads instead of sequential
   shard reads.
2. The windows become `ray.data.from_items(...)` and a `flat_map` on CPU data workers (`window_batches`,
   given the StreamConfig and NormStats objects) reads the window's cells (one Parquet row group = one
   cell, read one at a time), and for every batch of the window draws the original's sampling: a patch
   size p in [min_patch_size, max_patch_size], a number of tokens per side hw in [1, max_tokens_per_side], a random crop of hw * p pixels inside each
   128 x 128 sample and a random contiguous time window of as many timesteps as the token budget allows:
       T_b = min(12, (budget - hw^2 * n_static_bandsets) // (hw^2 * n_spacetime_bandsets)),
   counted over ALL modalities of the batch (maps included), so every sample holds <= budget tokens.
   Then two independent `modality_cross_random` masks per sample (views a and b), normalisation with
   the chosen statistics (`norm_stats`: the original's published ones, or the build's), NaN -> 0, and
   collation. Flips/rotations are done by the model per view
   (olmoearth/layout.py), not here.
3. Each output row: {"batch": pickle of the numpy batch dict, "index": batch number in the epoch,
   "epoch", "num_samples", "samples": JSON [[shard, row, quadrant], ...] of its samples};
   `preserve_order` keeps rows in index order, so (seed, epoch) replays exactly and `skip_batches`
   resumes mid-epoch. Batches are full except possibly the last of the epoch
   (dropped with drop_last=True). `streaming_split` (behind ray.train.get_dataset_shard, equal=True) may
   drop up to world_size - 1 whole batches at the end of an epoch; `epoch_plan()` gives the expected
   count so a trainer can report what it did not see.
"""

from __future__ import annotations

import functools
import json
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from olmoearth.masking import modality_cross_random, token_presence
from olmoearth.modalities import MAX_TIMESTEPS, MODALITIES, NormStats
from pipelines.common.storage import Storage, join
from pipelines.corpus.shards import load_manifest, load_norm_stats, read_cell
from pipelines.corpus.stored import cut_stored, grid_crop

SUB = 128  # training sample side, pixels (a quarter of a 256 x 256 cell)
NORM_STATS_CHOICES = ("published", "corpus")


@dataclass
class StreamConfig:
    shards_uri: str = ""  # output of build-corpus (has manifest.json)
    # normalisation statistics: published (the original's fixed v1 statistics, NormStats.default) | corpus
    # (the build's own norm_stats.json, for a corpus of one's own sensor mix)
    norm_stats: str = "published"
    batch_size: int = 32  # 128 x 128 samples per batch (per worker per forward/backward in training)
    token_budget: int = 2250  # most tokens per sample (all modalities)
    min_patch_size: int = 1  # smallest patch size drawn per batch, pixels
    max_patch_size: int = 8  # largest patch size drawn per batch, pixels
    max_tokens_per_side: int = 12  # largest crop drawn per batch, in tokens per side
    shuffle: str = "local"  # local (new shard order + window shuffle) or full (a global cell permutation)
    local_shuffle_buffer: int = 64  # samples per shuffle window
    seed: int = 0  # seed of the epoch order, crops and masks (with the epoch number)
    val_shards: int = 0  # the manifest's last N shards are the validation set, never read by training
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))  # modalities read into batches
    encode_ratio: float = 0.5  # share of a sample's present tokens the encoder sees
    decode_ratio: float = 0.5  # share of a sample's present tokens the decoder predicts
    min_encoded_bandsets: int = 2  # fewest bandsets with encoded tokens per sample
    drop_last: bool = False  # drop each window's last, short batch
    prefetch_batches: int = 2  # batches a reader prefetches
    num_cpus_per_task: float = 1.0  # Ray CPUs of each batch-making task

    def __post_init__(self):
        if self.norm_stats not in NORM_STATS_CHOICES:
            raise ValueError(f"StreamConfig.norm_stats must be one of {NORM_STATS_CHOICES}, got {self.norm_stats!r}")
        if self.shuffle not in ("local", "full"):
            raise ValueError(f"StreamConfig.shuffle must be 'local' or 'full', got {self.shuffle!r}")
        for m in self.modalities:
            if m not in MODALITIES:
                raise ValueError(f"StreamConfig.modalities: unknown modality {m!r}")
        if not 1 <= self.min_patch_size <= self.max_patch_size:
            raise ValueError("StreamConfig: need 1 <= min_patch_size <= max_patch_size")
        if self.batch_size < 1:
            raise ValueError("StreamConfig.batch_size must be >= 1")


def stream_norm_stats(cfg: StreamConfig, storage: Storage) -> NormStats:
    """The statistics the stream normalises with, which the model trained on it carries: the original's
    published ones (default) or the corpus build's own."""
    if cfg.norm_stats == "corpus":
        return load_norm_stats(cfg.shards_uri, storage)
    return NormStats.default()


# ----------------------------------------------------------------------------------------------------------
# The epoch plan (driver side, from the manifest only)


def split_shards(manifest: dict, val_shards: int) -> tuple[list[dict], list[dict]]:
    """(training shards, held-out validation shards) of a manifest: the last `val_shards` are held out
    (pipelines/pretrain/validation.py); the build shuffled the samples globally, so they are a random share."""
    shards = list(manifest["shards"])
    if val_shards < 0 or (val_shards and val_shards >= len(shards)):
        raise ValueError(f"data.val_shards={val_shards} must leave training at least one of the corpus's "
                         f"{len(shards)} shards")  # fmt: skip
    return shards[: len(shards) - val_shards], shards[len(shards) - val_shards :]


def epoch_plan(
    cfg: StreamConfig, storage: Storage, epoch: int = 0, manifest: dict | None = None
) -> list[dict]:
    """The windows of one epoch: [{"window", "first_batch", "num_batches", "subs": [[shard, row, quadrant]]}]."""
    manifest = manifest or load_manifest(cfg.shards_uri, storage)
    shards = [(s["path"], s["rows"]) for s in split_shards(manifest, cfg.val_shards)[0]]
    rng = np.random.default_rng([cfg.seed, epoch, 17])
    if cfg.shuffle == "local":
        cells = [(path, r) for i in rng.permutation(len(shards)) for path, n in [shards[i]] for r in range(n)]
    else:
        all_cells = [(path, r) for path, n in shards for r in range(n)]
        cells = [all_cells[i] for i in rng.permutation(len(all_cells))]
    subs = [[path, r, q] for path, r in cells for q in range(4)]
    per_window = max(cfg.batch_size, cfg.local_shuffle_buffer // cfg.batch_size * cfg.batch_size)
    windows, first = [], 0
    for j, start in enumerate(range(0, len(subs), per_window)):
        chunk = subs[start : start + per_window]
        nb = len(chunk) // cfg.batch_size if cfg.drop_last else math.ceil(len(chunk) / cfg.batch_size)
        if nb == 0:
            continue
        windows.append({"window": j, "first_batch": first, "num_batches": nb, "subs": chunk})
        first += nb
    return windows


def num_batches(cfg: StreamConfig, storage: Storage, epoch: int = 0) -> int:
    return sum(w["num_batches"] for w in epoch_plan(cfg, storage, epoch))


def draw_batch_shape(rng: np.random.Generator, cfg: StreamConfig) -> tuple[int, int, int]:
    """(patch size p, tokens per side hw, timesteps T_b) within the token budget (the original's sampling)."""
    p = int(rng.integers(cfg.min_patch_size, cfg.max_patch_size + 1))
    hw = int(rng.integers(1, min(cfg.max_tokens_per_side, SUB // p) + 1))
    n_st = sum(MODALITIES[m].num_bandsets for m in cfg.modalities if MODALITIES[m].temporal)
    n_static = sum(MODALITIES[m].num_bandsets for m in cfg.modalities if not MODALITIES[m].temporal)
    while hw > 1 and hw * hw * (n_static + max(n_st, 0) * 1) > cfg.token_budget:
        hw -= 1
    t = (
        MAX_TIMESTEPS
        if n_st == 0
        else min(MAX_TIMESTEPS, (cfg.token_budget - hw * hw * n_static) // (hw * hw * n_st))
    )
    if t < 1:
        raise ValueError(f"token_budget {cfg.token_budget} cannot hold one timestep of {cfg.modalities}")
    return p, hw, int(t)


# ----------------------------------------------------------------------------------------------------------
# Worker side: one window -> its batches


def plan_window(num_subs: int, num_batches: int, cfg: StreamConfig, rng: np.random.Generator
                ) -> tuple[list, list, dict]:  # fmt: skip
    """The window's random draws, all up front so (seed, epoch, window) replays exactly: its batches (sample
    positions in the window), each batch's (p, hw, T_b) and per sample (crop side, y and x offset inside its
    128 x 128 quadrant, time-window position u in [0, 1))."""
    B = cfg.batch_size
    order = rng.permutation(num_subs)
    chunks = [order[i : i + B] for i in range(0, num_batches * B, B)]
    shapes = [draw_batch_shape(rng, cfg) for _ in chunks]
    crop = {}
    for (p, hw, _), idx in zip(shapes, chunks, strict=True):
        side = hw * p
        for i in idx:
            crop[int(i)] = (side, int(rng.integers(0, SUB - side + 1)), int(rng.integers(0, SUB - side + 1)),
                            float(rng.random()))  # fmt: skip
    return chunks, shapes, crop


def read_samples(cfg: StreamConfig, storage: Storage, subs: list, needed: set[int], crop: dict) -> dict:
    """{sample: (stored pixels under its crop per modality, months, T, u)}: each needed cell read once, only
    the stored pixels under each crop kept, so a window's memory stays bounded."""
    import pyarrow.parquet as pq

    by_cell: dict[tuple, list[int]] = {}
    for i in sorted(needed):
        path, r, _ = subs[i]
        by_cell.setdefault((path, r), []).append(i)
    cut: dict[int, tuple] = {}
    files = {}
    for (path, r), idxs in sorted(by_cell.items()):
        if path not in files:
            fs, p_ = storage.pyarrow_fs(join(cfg.shards_uri, path))
            files[path] = pq.ParquetFile(fs.open_input_file(p_))
        months, cell = read_cell(files[path], r, cfg.modalities)
        for i in idxs:
            side, oy, ox, u = crop[i]
            q = subs[i][2]
            y0, x0 = (q // 2) * SUB + oy, (q % 2) * SUB + ox
            spatial = {m: side if cell[m] is None else cut_stored(m, cell[m], y0, x0, side) for m in cfg.modalities}
            cut[i] = (spatial, months, len(months), u)
        del cell
    return cut


def sample_inputs(sample: tuple, side: int, t_b: int) -> tuple[dict, np.ndarray]:
    """One sample's inputs of a batch with T_b timesteps: {modality: (side, side, t, C)} on 10 m in model
    units (NaN where missing) and its T_b months, from a random time window (at u) of its timesteps."""
    cells, months, T, u = sample
    t0 = int(u * (T - t_b + 1)) if T > t_b else 0
    x = {}
    for m, c in cells.items():
        mod = MODALITIES[m]
        tm = t_b if mod.temporal else 1
        if not isinstance(c, tuple):  # the sample lacks this modality
            x[m] = np.full((side, side, tm, mod.num_bands), np.nan, np.float32)
            continue
        arrays, dy, dx = c
        arrays = [a[t0 : t0 + tm] for a in arrays] if mod.temporal else arrays
        a = grid_crop(m, arrays, dy, dx, side)  # onto 10 m, model units, (side, side, t, C)
        if a.shape[2] < tm:  # the sample has fewer timesteps than the batch: pad as missing
            pad = np.full((side, side, tm - a.shape[2], mod.num_bands), np.nan, np.float32)
            a = np.concatenate([a, pad], axis=2)
        x[m] = a
    mon = months[t0 : t0 + t_b]
    if len(mon) < t_b:
        last = mon[-1] if len(mon) else 0
        mon = np.concatenate([mon, (last + 1 + np.arange(t_b - len(mon))) % 12])
    return x, mon


def make_sample(sample: tuple, p: int, hw: int, t_b: int, cfg: StreamConfig, norm: NormStats,
                rng: np.random.Generator) -> tuple[dict, np.ndarray, dict, dict]:
    """(normalised inputs with NaN -> 0, months, mask of view a, mask of view b) of one sample."""
    x, months = sample_inputs(sample, p * hw, t_b)
    present = token_presence(x, p)
    kw = dict(encode_ratio=cfg.encode_ratio, decode_ratio=cfg.decode_ratio,
              min_encoded_bandsets=cfg.min_encoded_bandsets)  # fmt: skip
    mask_a = modality_cross_random(present, rng, **kw)
    mask_b = modality_cross_random(present, rng, **kw)
    x = {m: np.nan_to_num(norm.normalise(m, v), nan=0.0) for m, v in x.items()}
    return x, months, mask_a, mask_b


def collate(samples: list[tuple[dict, np.ndarray, dict, dict]], p: int, modalities) -> dict:
    """The olmoearth/layout.py batch dict (numpy) of made samples."""
    return {
        "x": {m: np.stack([s[0][m] for s in samples]).astype(np.float32) for m in modalities},
        "months": np.stack([s[1] for s in samples]).astype(np.int64),
        "patch_size": int(p),
        "mask_a": {m: np.stack([s[2][m] for s in samples]) for m in modalities},
        "mask_b": {m: np.stack([s[3][m] for s in samples]) for m in modalities},
    }


def window_batches(item: dict, cfg: StreamConfig, norm: NormStats) -> list[dict]:
    """Ray Data flat_map: read the window's cells, crop, mask, normalise and collate its batches (the first
    item["skip"] batches are drawn but not made)."""
    subs, epoch = json.loads(item["subs"]), item["epoch"]
    rng = np.random.default_rng([cfg.seed, epoch, item["window"], 29])
    chunks, shapes, crop = plan_window(len(subs), item["num_batches"], cfg, rng)
    skip = item.get("skip", 0)
    needed = {int(i) for idx in chunks[skip:] for i in idx}
    cut = read_samples(cfg, Storage(), subs, needed, crop)
    out = []
    for b, ((p, hw, t_budget), idx) in enumerate(zip(shapes, chunks, strict=True)):
        if b < skip:
            continue
        t_b = min(t_budget, max(cut[int(i)][2] for i in idx))
        batch = collate([make_sample(cut[int(i)], p, hw, t_b, cfg, norm, rng) for i in idx], p, cfg.modalities)
        out.append({"batch": pickle.dumps(batch, protocol=5), "index": item["first_batch"] + b, "epoch": epoch,
                    "num_samples": len(idx), "samples": json.dumps([subs[int(i)] for i in idx])})  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------
# Driver side


def epoch_windows(cfg: StreamConfig, storage: Storage, epoch: int = 0,
                  skip_batches: int = 0) -> tuple[list[dict], Callable[[dict], list[dict]]]:
    """The epoch's windows as work items, and the function that turns one item into its batch rows
    (`window_batches` with the config and the chosen statistics, `stream_norm_stats`, bound); the first
    `skip_batches` batches are left out (resume). What the Ray Data stream maps over; any other runner can
    map it the same way."""
    manifest = load_manifest(cfg.shards_uri, storage)
    norm = stream_norm_stats(cfg, storage)
    items = []
    for w in epoch_plan(cfg, storage, epoch, manifest):
        end = w["first_batch"] + w["num_batches"]
        if end <= skip_batches:
            continue
        # subs as JSON: Arrow cannot hold the mixed [path, row, quadrant] lists (Ray would warn and pickle)
        w = dict(w, epoch=epoch, skip=max(0, skip_batches - w["first_batch"]), subs=json.dumps(w["subs"]))
        items.append(w)
    if not items:
        raise ValueError(f"epoch {epoch} has no batches after skipping {skip_batches} ({cfg.shards_uri})")
    return items, functools.partial(window_batches, cfg=cfg, norm=norm)


def training_dataset(cfg: StreamConfig, storage: Storage, epoch: int = 0, skip_batches: int = 0):
    """A Ray Dataset of one epoch, one row per collated batch, in a fixed order for (seed, epoch); the first
    `skip_batches` batches are left out (resume)."""
    import ray

    items, fn = epoch_windows(cfg, storage, epoch, skip_batches)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(fn, num_cpus=cfg.num_cpus_per_task)
    ds.context.execution_options.preserve_order = True
    return ds


def to_torch(batch: dict, device="cpu") -> dict:
    import torch

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return {
        "x": {m: t(v) for m, v in batch["x"].items()},
        "months": t(batch["months"]),
        "patch_size": int(batch["patch_size"]),
        "mask_a": {m: t(v) for m, v in batch["mask_a"].items()},
        "mask_b": {m: t(v) for m, v in batch["mask_b"].items()},
    }


def indexed_batches(shard_or_dataset, cfg: StreamConfig, device="cpu") -> Iterator[tuple[int, dict]]:
    """(batch index in the epoch, layout.py batch of torch tensors) of a training_dataset, or of one
    `streaming_split` iterator of it."""
    rows = shard_or_dataset.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=cfg.prefetch_batches)
    for table in rows:
        for raw, index in zip(table.column("batch"), table.column("index"), strict=True):
            yield int(index.as_py()), to_torch(pickle.loads(raw.as_buffer()), device)


def iter_training_batches(shard_or_dataset, cfg: StreamConfig, device="cpu") -> Iterator[dict]:
    """The batches of `indexed_batches` without their indices."""
    for _, batch in indexed_batches(shard_or_dataset, cfg, device):
        yield batch


def check_batch(batch: dict, cfg: StreamConfig) -> None:
    """Assert the layout.py contract (used by tests and the bench): shapes, budget, maps never encoded."""
    from olmoearth.layout import ENCODER

    p = batch["patch_size"]
    B, T = batch["months"].shape
    for m in cfg.modalities:
        mod = MODALITIES[m]
        x = batch["x"][m]
        assert x.shape[0] == B and x.shape[3] == (T if mod.temporal else 1) and x.shape[4] == mod.num_bands, (
            m,
            x.shape,
        )
        h, w = x.shape[1] // p, x.shape[2] // p
        for key in ("mask_a", "mask_b"):
            mk = batch[key][m]
            assert tuple(mk.shape) == (B, h, w, x.shape[3], mod.num_bandsets), (m, key, mk.shape)
            if not mod.encoder_input:
                assert not bool((mk == ENCODER).any()), f"{m} marked for the encoder"
    n_tok = sum(int(np.prod(batch["mask_a"][m].shape[1:])) for m in cfg.modalities)
    assert n_tok <= cfg.token_budget, (n_tok, cfg.token_budget)
