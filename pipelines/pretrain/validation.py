"""The validation set of pretraining: the corpus shards held out of training, cut into batches once, and a
model's loss on them.

    batches = validation_batches(cfg.data, storage, patch_sizes=[2, 4, 8], max_samples=64)
    losses = validation_losses(model, [to_torch(b) for b in batches])
    # {"val_loss", "val_patch_disc", "val_contrastive", "val_loss_p2", "val_loss_p4", "val_loss_p8"}

Held out: the manifest's last `data.val_shards` shards (`pipelines.pretrain.stream.split_shards`; the build
shuffled the samples globally before writing them, so these are a random share of the corpus). The
training stream's epoch plan is made from the other shards only, so no training batch holds a held-out
sample.

The batches are made by the training stream's own code (`window_batches`: crop, time window, the two
masks, normalisation, collation): one window per validation patch size over the same held-out samples, its
random draws (batch order, tokens per side, crops, time windows, masks) seeded by the stream seed and that
window alone. Every evaluation of a run, a run restarted from a checkpoint and a new run with the same data
settings therefore score the very same batches. The loss is taken in eval mode (no drop path, no flips)
under no_grad, so it depends on the weights alone."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import numpy as np
import torch

from olmoearth.modalities import MAX_PATCH_SIZE
from pipelines.common.storage import Storage
from pipelines.corpus.shards import load_manifest
from pipelines.pretrain.stream import SUB, StreamConfig, split_shards, stream_norm_stats, window_batches

VAL_PARTS = ("loss", "patch_disc", "contrastive")  # the model's loss parts, logged as val_<part>
VAL_WINDOW = 1000  # window numbers of the validation windows (1000 + i for the i-th patch size): their seeds


def held_out_samples(cfg: StreamConfig, storage: Storage, max_samples: int = 0) -> list[list]:
    """[[shard, row, quadrant]] of the held-out 128 x 128 samples: all of them, or a seeded subset of
    `max_samples` in shard order."""
    _, held = split_shards(load_manifest(cfg.shards_uri, storage), cfg.val_shards)
    subs = [[s["path"], r, q] for s in held for r in range(s["rows"]) for q in range(4)]
    if max_samples and len(subs) > max_samples:
        keep = np.sort(np.random.default_rng([cfg.seed, 31]).choice(len(subs), size=max_samples, replace=False))
        subs = [subs[int(i)] for i in keep]
    return subs


def check_patch_sizes(patch_sizes: list[int]) -> None:
    if not patch_sizes:
        raise ValueError("train.val_patch_sizes is empty: give at least one patch size")
    for p in patch_sizes:
        if not 1 <= int(p) <= min(MAX_PATCH_SIZE, SUB):
            raise ValueError(f"train.val_patch_sizes: patch size {p} is outside 1..{MAX_PATCH_SIZE}")


def validation_batches(cfg: StreamConfig, storage: Storage, patch_sizes: list[int], max_samples: int = 0
                       ) -> list[dict]:  # fmt: skip
    """The validation batches (numpy batch dicts of olmoearth/layout.py), patch size by patch size, each
    holding `cfg.batch_size` samples (the contrastive part depends on the batch size, as in training) except
    possibly each size's last."""
    if cfg.val_shards <= 0:
        raise ValueError("a validation set needs data.val_shards > 0 (the manifest's last shards, held out)")
    check_patch_sizes(patch_sizes)
    subs = held_out_samples(cfg, storage, max_samples)
    norm = stream_norm_stats(cfg, storage)  # the statistics the training stream uses
    batches = []
    for i, p in enumerate(patch_sizes):
        fixed = dataclasses.replace(cfg, min_patch_size=int(p), max_patch_size=int(p), drop_last=False)
        item = {"window": VAL_WINDOW + i, "first_batch": 0, "epoch": 0, "subs": json.dumps(subs),
                "num_batches": math.ceil(len(subs) / cfg.batch_size)}  # fmt: skip
        batches += [pickle.loads(row["batch"]) for row in window_batches(item, fixed, norm)]
    return batches


def validation_losses(model: torch.nn.Module, batches: list[dict]) -> dict[str, float]:
    """The model's loss parts on the validation batches (torch batch dicts on the model's device), each a
    mean over samples: {"val_loss", "val_patch_disc", "val_contrastive"} and the total per patch size,
    "val_loss_p<p>". Eval mode under no_grad; the model's mode and torch's RNG are left as they were."""
    was_training, rng = model.training, torch.random.get_rng_state()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(batch)
                n = int(batch["months"].shape[0])
                parts = {f"val_{k}": float(out[k]) for k in VAL_PARTS}
                parts[f"val_loss_p{int(batch['patch_size'])}"] = float(out["loss"])
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v * n
                    counts[k] = counts.get(k, 0) + n
    finally:
        model.train(was_training)
        torch.random.set_rng_state(rng)
    return {k: sums[k] / counts[k] for k in sums}
