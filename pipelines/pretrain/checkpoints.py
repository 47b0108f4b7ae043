"""A run's checkpoints on storage, and the training state each one holds.

    <storage_path>/<name>/
        TorchTrainer_<trial>/checkpoint_00000N/   Ray Train checkpoints (last K kept)
            ds/...                               DeepSpeed checkpoint (tag DS_TAG; every rank's ZeRO shards)
            train_state.json                     TrainState: step, epoch, data position, config, metrics history
            reference.pt                         (final checkpoint) a batch + the encoder's output on it
            complete.<rank>.json                 each rank's files with their sizes, written last
        metrics.jsonl, loss_curve.png            written by rank 0 at every checkpoint and at the end

The file names belong to olmoearth/checkpoint.py. Ray keeps K checkpoints per trial and a resubmitted run is
a new trial, so listing, resuming and pruning look across all trials of the run. A checkpoint counts only
when complete (`checkpoint_problem`): resume and export take the newest complete one and name every
incomplete one they pass over (an upload cut short, a shard deleted since)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

from olmoearth.checkpoint import DS_TAG, STATE_FILE
from olmoearth.modalities import NormStats
from pipelines.common.storage import Storage, is_s3, join, strip_scheme

log = logging.getLogger(__name__)


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


COMPLETE_PREFIX = "complete."  # complete.<rank>.json: one rank's files of a checkpoint with their sizes


def write_completeness(local_dir: str, rank: int) -> str:
    """The last file a rank writes into its part of a checkpoint (after DeepSpeed's files and, on rank 0,
    train_state.json): every file of `local_dir` with its size, as `complete.<rank>.json`. A checkpoint on
    storage is complete when every rank's manifest is there and every file it lists has that size, which
    an interrupted upload or a file deleted later fails, whatever order the files were uploaded in."""
    files = {}
    for folder, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            if not rel.startswith(COMPLETE_PREFIX):
                files[rel] = os.path.getsize(path)
    out = os.path.join(local_dir, f"{COMPLETE_PREFIX}{rank}.json")
    Storage().write_text(out, json.dumps({"rank": rank, "files": files}))
    return out


def _run_listing(storage: Storage, uri: str) -> dict[str, dict[str, int]]:
    """checkpoint URI -> {path inside it: size} for every checkpoint of the run at `uri`: one recursive
    listing of the run folder, whatever the number of checkpoints."""
    fs = storage.fs(uri)
    root = fs._strip_protocol(uri.rstrip("/"))
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    out: dict[str, dict[str, int]] = {}
    for path, info in found.items():
        parts = fs._strip_protocol(path)[len(root) + 1 :].split("/", 2)
        if len(parts) == 3 and parts[1].startswith("checkpoint_") and info.get("type") != "directory":
            ckpt = join(uri.rstrip("/"), parts[0], parts[1])
            out.setdefault(ckpt, {})[parts[2]] = int(info["size"])
    return out


def checkpoint_problem(storage: Storage, ckpt: str, files: dict[str, int] | None = None) -> str | None:
    """Why the checkpoint folder `ckpt` is not complete (None when it is): its training state, every rank's
    completeness manifest (`write_completeness`) and every file listed there with its size. `files`: the
    folder's {path: size} when already listed."""
    if files is None:
        files = _run_listing(storage, ckpt.rsplit("/", 2)[0]).get(ckpt.rstrip("/"), {})
    if STATE_FILE not in files:
        return f"no {STATE_FILE}"
    try:
        world = int(json.loads(storage.read_text(join(ckpt, STATE_FILE))).get("world_size", 1))
    except (ValueError, OSError) as e:
        return f"unreadable {STATE_FILE}: {e}"
    for rank in range(world):
        name = f"{COMPLETE_PREFIX}{rank}.json"
        if name not in files:
            return f"no {name} (rank {rank}'s files were not all uploaded, or it predates completeness manifests)"
        try:
            listed = json.loads(storage.read_text(join(ckpt, name)))["files"]
        except (ValueError, KeyError, OSError) as e:
            return f"unreadable {name}: {e}"
        for rel, size in sorted(listed.items()):
            if rel not in files:
                return f"{rel} is missing (listed in {name})"
            if files[rel] != size:
                return f"{rel} has {files[rel]} bytes, {name} lists {size}"
    return None


def scan_checkpoints(storage: Storage, uri: str) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
    """(complete checkpoints as (step, URI) oldest first, incomplete ones as (URI, why)) of the run at
    `uri`, across all its trials."""
    complete, incomplete = [], []
    for ckpt, files in sorted(_run_listing(storage, uri).items()):
        problem = checkpoint_problem(storage, ckpt, files)
        if problem is not None:
            incomplete.append((ckpt, problem))
            continue
        try:
            step = int(json.loads(storage.read_text(join(ckpt, STATE_FILE)))["step"])
        except (ValueError, KeyError) as e:
            incomplete.append((ckpt, f"unreadable step in {STATE_FILE}: {e}"))
            continue
        complete.append((step, ckpt))
    return sorted(complete), incomplete


def list_checkpoints(storage: Storage, uri: str) -> list[tuple[int, str]]:
    """(step, checkpoint URI) of every complete checkpoint (`checkpoint_problem`) of the run at `uri` (all its
    trials), oldest first; each incomplete one is named in a warning, with what it lacks."""
    complete, incomplete = scan_checkpoints(storage, uri)
    for ckpt, why in incomplete:
        log.warning("skipping incomplete checkpoint %s: %s", ckpt, why)
    return complete


def latest_checkpoint(storage: Storage, uri: str) -> str | None:
    found = list_checkpoints(storage, uri)
    return found[-1][1] if found else None


def checkpoint_step(storage: Storage, checkpoint: str) -> int:
    """The optimiser step a checkpoint folder was taken at."""
    return int(json.loads(storage.read_text(join(checkpoint, STATE_FILE)))["step"])


def resolve_checkpoint(storage: Storage, uri: str) -> str:
    """A complete checkpoint folder URI from either a checkpoint folder (refused, saying what it lacks, when
    incomplete) or a run folder (its newest complete checkpoint; newer incomplete ones are named in a
    warning)."""
    uri = uri.rstrip("/")
    if storage.exists(join(uri, STATE_FILE)):
        problem = checkpoint_problem(storage, uri)
        if problem is not None:
            raise ValueError(f"incomplete checkpoint {uri}: {problem}; pass its run folder to take the "
                             "newest complete one")  # fmt: skip
        return uri
    latest = latest_checkpoint(storage, uri)
    if latest is None:
        raise FileNotFoundError(f"no pretraining checkpoint (a complete folder: {STATE_FILE} and every "
                                f"rank's completeness manifest) at or under {uri}")  # fmt: skip
    return latest


def resume_checkpoint(storage: Storage, run: str, offered: str | None) -> str | None:
    """The checkpoint to resume the run at `run` from: `offered` (the one Ray hands a restarted worker group)
    when it is complete, else the run's newest complete one, saying so; None when there is none."""
    if offered is None:
        return None
    problem = checkpoint_problem(storage, offered)
    if problem is None:
        return offered
    latest = latest_checkpoint(storage, run)
    log.warning("not resuming from incomplete checkpoint %s (%s); %s", offered, problem,
                f"resuming from {latest}" if latest else "no complete checkpoint: starting afresh")  # fmt: skip
    return latest


def ray_checkpoint(storage: Storage, uri: str):
    """A Ray Train Checkpoint of the checkpoint folder at `uri` (s3:// or local)."""
    from ray.train import Checkpoint

    fs, _ = ray_storage(storage, uri)
    return Checkpoint(path=strip_scheme(uri) if is_s3(uri) else os.path.abspath(uri), filesystem=fs)


def checkpoint_uri(checkpoint, run: str) -> str:
    """The URI of a Ray Train Checkpoint of the run at `run` (Ray knows only its path in a filesystem)."""
    return ("s3://" + checkpoint.path.lstrip("/")) if is_s3(run) else checkpoint.path


def prune_checkpoints(storage: Storage, uri: str, keep: int, protect: tuple[int, ...] = ()) -> list[str]:
    """Delete all but the newest `keep` checkpoints of a run across its trials, and those taken at a step in
    `protect` (a fine-tuning run's best epoch). Returns the deleted URIs."""
    found = list_checkpoints(storage, uri)
    doomed = [path for step, path in found[:-keep] if step not in protect] if keep > 0 else []
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


def restore_checkpoint(storage: Storage, run: str, engine, parse_state):
    """Load the checkpoint Ray Train hands this worker into the DeepSpeed `engine`, or, if that one is
    incomplete on storage now (a shard lost since it was reported), the run's newest complete one.
    -> the training state parsed from its STATE_FILE by `parse_state(text)`, or None: nothing to resume."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    offered = checkpoint_uri(checkpoint, run)
    uri = resume_checkpoint(storage, run, offered)
    if uri is None:
        return None
    if uri != offered:
        checkpoint = ray_checkpoint(storage, uri)
    with checkpoint.as_directory() as d:
        engine.load_checkpoint(d, tag=DS_TAG)
        with open(os.path.join(d, STATE_FILE)) as fh:
            return parse_state(fh.read())
