"""Which rows a training worker sees in an epoch, and the D4 augmentation of a batch.

Every epoch the training rows are put in a seeded order (seed, epoch) and cut into world_size equal runs
of steps_per_epoch x batch_size rows: each rank trains on its own run and all ranks take the same number
of steps (DeepSpeed's collectives need that); the few rows past the last full step are counted as dropped
in the epoch's summary. Evaluation rows are dealt round-robin and padded with repeats to the same number
of batches on every rank (ZeRO-3 gathers parameters collectively, even in eval); padding is not scored.

D4: one of the 8 symmetries of the square (k quarter turns, then an optional left-right flip), drawn per
sample, applied alike to every modality's (H, W) axes and to a per-pixel label."""

from __future__ import annotations

import numpy as np
import torch


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int) -> int:
    steps = num_rows // (batch_size * world_size)
    if steps == 0:
        raise ValueError(f"the train split has {num_rows} samples, fewer than one step of train.batch_size "
                         f"{batch_size} x {world_size} workers; lower train.batch_size or train.num_workers")
    return steps


def epoch_rows(rows: list[dict], seed: int, epoch: int, batch_size: int, rank: int, world_size: int) -> list[dict]:
    """This rank's training rows of `epoch`, in its order (a multiple of batch_size)."""
    per_rank = steps_per_epoch(len(rows), batch_size, world_size) * batch_size
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    return [rows[i] for i in order[rank * per_rank : (rank + 1) * per_rank]]


def eval_batches(rows: list[dict], batch_size: int, rank: int, world_size: int) -> list[tuple[list[dict], int]]:
    """This rank's evaluation batches as (rows, how many of them are real, not padding)."""
    if not rows:
        return []
    mine = rows[rank::world_size]
    per_rank = -(-len(rows) // world_size)
    n_batches = -(-per_rank // batch_size)
    padded = mine + [rows[0]] * (n_batches * batch_size - len(mine))
    out = []
    for b in range(n_batches):
        part = padded[b * batch_size : (b + 1) * batch_size]
        real = max(0, min(batch_size, len(mine) - b * batch_size))
        out.append((part, real))
    return out


def epoch_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The D4 draws of (seed, epoch, rank), and torch's global RNG seeded from the same triple: the encoder's
    drop path draws from it, so an epoch (also one redone after a worker failure) is the same every run."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
    return np.random.default_rng([seed, epoch, rank])


def d4(x: dict[str, np.ndarray], labels: np.ndarray, per_pixel: bool, rng: np.random.Generator):
    """A random D4 transform per sample: x {m: (B, H, W, T, C)}, labels (B, H, W) when per_pixel (or
    (B, K, H, W) for several per-pixel targets) else untouched. Returns new arrays."""
    n = len(labels)
    ks, flips = rng.integers(0, 4, n), rng.integers(0, 2, n).astype(bool)
    out_x = {m: np.stack([_sym(v[i], ks[i], flips[i], (0, 1)) for i in range(n)]) for m, v in x.items()}
    if not per_pixel:
        return out_x, labels
    axes = (0, 1) if labels.ndim == 3 else (1, 2)
    return out_x, np.stack([_sym(labels[i], ks[i], flips[i], axes) for i in range(n)])


def _sym(a: np.ndarray, k: int, flip: bool, axes: tuple[int, int]) -> np.ndarray:
    a = np.rot90(a, k=int(k), axes=axes)
    return np.ascontiguousarray(np.flip(a, axis=axes[1]) if flip else a)


def to_device(x: dict[str, np.ndarray], months: np.ndarray, labels: np.ndarray, device):
    """numpy batch -> tensors on the device (labels keep their dtype: int64 classes, float targets)."""
    xt = {m: torch.as_tensor(v, dtype=torch.float32).to(device) for m, v in x.items()}
    return xt, torch.as_tensor(months).long().to(device), torch.as_tensor(labels).to(device)
