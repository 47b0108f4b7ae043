"""What the training workers exchange over their process group: summed counts and mean losses for the
metrics rows, the batch indices each rank trained on (the data position a checkpoint records), and the
epoch's stream iterators, which rank 0 builds and deals to every rank. With one worker (or no process group)
each of them is a plain local value."""

from __future__ import annotations

import torch

from pipelines.common.storage import Storage
from pipelines.pretrain.checkpoints import TrainState
from pipelines.pretrain.stream import StreamConfig, training_dataset


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device) -> list[float]:
    """The element-wise sum of `values` over all ranks."""
    import torch.distributed as dist

    if not _distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    """The mean of each named value over all ranks (every rank logs the same keys)."""
    import torch.distributed as dist

    if not _distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def gather_consumed(mine: list[int]) -> list[int]:
    """Every rank's trained batch indices of this epoch, on every rank."""
    import torch.distributed as dist

    if not _distributed():
        return list(mine)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(mine))
    return sorted(i for part in out for i in part)


def epoch_iterator(data: StreamConfig, storage: Storage, epoch: int, state: TrainState, rank: int,
                   world_size: int):
    """This rank's split of the epoch's stream. Rank 0 builds the Ray Data dataset (leaving out the batches
    already trained on, see TrainState.resume_point) and deals one `streaming_split` iterator to every
    rank; equal=True gives every rank the same number of batches, so no rank waits alone in a collective."""
    import torch.distributed as dist

    if rank == 0:
        skip, later = state.resume_point()
        ds = training_dataset(data, storage, epoch=epoch, skip_batches=skip)
        if later:
            ds = ds.filter(lambda row: int(row["index"]) not in later)
        splits = ds.streaming_split(world_size, equal=True) if world_size > 1 else [ds.iterator()]
    else:
        splits = [None] * world_size
    if world_size > 1:
        box = [splits]
        dist.broadcast_object_list(box, src=0)
        splits = box[0]
    return splits[rank]
