"""A run's checkpoints on storage, and the training state each one holds.

    <storage_path>/<name>/
        TorchTrainer_<trial>/checkpoint_00000N/   Ray Train checkpoints (last K kept)
            ds/...                               DeepSpeed checkpoint (tag DS_TAG; every rank's ZeRO shards)
            train_state.json                     TrainState: step, epoch, data position, config, metrics history
            reference.pt                         (final checkpoint) a batch + the encoder's output on it
        metrics.jsonl, loss_curve.png            written by rank 0 at every checkpoint and at the end

The file names belong to olmoearth/checkpoint.py. Ray keeps K checkpoints per trial and a resubmitted run is
a new trial, so listing, resuming and pruning look across all trials of the run."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from olmoearth.checkpoint import STATE_FILE
from olmoearth.modalities import NormStats
from pipelines.common.storage import Storage, is_s3, join, strip_scheme


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch of the stream
    consumed: list = field(default_factory=list)  # stream batch indices of this epoch trained on (all ranks)
    samples_seen: int = 0  # samples trained on, all workers
    tokens_seen: int = 0  # present tokens trained on, all workers
    epochs: list = field(default_factory=list)  # per finished epoch: batches in it, trained, unique, dropped
    resumed_from: list = field(default_factory=list)  # the step of every checkpoint this run restarted from
    history: list = field(default_factory=list)  # metrics rows logged so far

    def resume_point(self) -> tuple[int, set[int]]:
        """(skip_batches, later indices to leave out): the epoch's batches are numbered in a fixed order;
        everything before the first untrained index is skipped at the source, trained ones after it (ranks
        run ahead of each other by a few batches) are filtered out."""
        done = set(self.consumed)
        skip = 0
        while skip in done:
            skip += 1
        return skip, {i for i in done if i > skip}

    def to_json(self, cfg, world_size: int, norm_stats: NormStats) -> str:
        """The state with the run's config, world size and the corpus statistics the encoder normalises
        with (what `olmoearth.load` of the checkpoint folder, and so the export, gives the encoder)."""
        out = dataclasses.asdict(self)
        out.update(world_size=world_size, config=dataclasses.asdict(cfg), norm_stats=norm_stats.to_dict())
        return json.dumps(out)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def ray_storage(storage: Storage, uri: str):
    """(pyarrow filesystem, path) for Ray's RunConfig. For s3:// this wraps s3fs in pyarrow's FSSpecHandler:
    pyarrow's native S3 client fails multipart uploads against SeaweedFS (INVALID_ACCESS_KEY_ID on
    UploadPart), while s3fs works against it and AWS alike."""
    import pyarrow.fs as pafs

    if is_s3(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(storage.fs(uri))), strip_scheme(uri).rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def list_checkpoints(storage: Storage, uri: str) -> list[tuple[int, str]]:
    """(step, checkpoint URI) of every complete checkpoint of the run at `uri` (all its trials), oldest
    first. A checkpoint is complete when its train_state.json exists."""
    fs = storage.fs(uri)
    root = uri.rstrip("/")
    if not fs.exists(root):
        return []
    found = []
    for path in fs.glob(join(root, "*", "checkpoint_*", STATE_FILE)):
        path = path if "://" in path else (("s3://" + path) if is_s3(uri) else path)
        try:
            step = int(json.loads(storage.read_text(path))["step"])
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"unreadable training state {path}: {e}") from None
        found.append((step, path.rsplit("/", 1)[0]))
    return sorted(found)


def latest_checkpoint(storage: Storage, uri: str) -> str | None:
    found = list_checkpoints(storage, uri)
    return found[-1][1] if found else None


def checkpoint_step(storage: Storage, checkpoint: str) -> int:
    """The optimiser step a checkpoint folder was taken at."""
    return int(json.loads(storage.read_text(join(checkpoint, STATE_FILE)))["step"])


def resolve_checkpoint(storage: Storage, uri: str) -> str:
    """A checkpoint folder URI from either a checkpoint folder or a run folder (its latest checkpoint)."""
    uri = uri.rstrip("/")
    if storage.exists(join(uri, STATE_FILE)):
        return uri
    latest = latest_checkpoint(storage, uri)
    if latest is None:
        raise FileNotFoundError(f"no pretraining checkpoint (folder with {STATE_FILE}) at or under {uri}")
    return latest


def prune_checkpoints(storage: Storage, uri: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints of a run across its trials. Returns the deleted URIs."""
    found = list_checkpoints(storage, uri)
    doomed = [path for _, path in found[:-keep]] if keep > 0 else []
    fs = storage.fs(uri)
    for path in doomed:
        fs.rm(path, recursive=True)
    return doomed


def save_history(storage: Storage, uri: str, history: list[dict]) -> None:
    """The run's metrics.jsonl and loss_curve.png, rewritten whole from the metrics rows so far."""
    from pipelines.pretrain.plots import loss_curve_png

    storage.write_text(join(uri, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
    if history:
        storage.write_bytes(join(uri, "loss_curve.png"), loss_curve_png(history, title=os.path.basename(uri)))
