"""Latent MIM Lite pretraining on Ray Train with DeepSpeed as the engine.

    cfg = load_config(PretrainConfig, argv)
    result = fit(cfg)                       # TorchTrainer(train_loop, ...).fit() plus resume / pruning

One run = one name under `run.storage_path` (a local path or s3:// URI):

    <storage_path>/<name>/
        TorchTrainer_<trial>/checkpoint_00000N/   Ray Train checkpoints (last K kept)
            ds/...                               DeepSpeed checkpoint (tag "ds"; every rank's ZeRO shards)
            train_state.json                     step, epoch, data position, config, metrics history
            reference.pt                         (final checkpoint) a batch + the encoder's output on it
        metrics.jsonl, loss_curve.png            written by rank 0 at every checkpoint and at the end

Each worker: build the model, wrap it in a DeepSpeed engine (ZeRO 1/2/3, AdamW on the trainable parameters
only: the frozen target projection is never in the optimiser), restore the latest checkpoint if Ray hands
one over, then per epoch read its split of the corpus stream (rank 0 builds the epoch's Ray Data dataset,
already skipping the part of the epoch finished before the checkpoint, and deals `streaming_split`
iterators to all ranks), step, log, checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from olmoearth.checkpoint import DS_TAG, REFERENCE_FILE, STATE_FILE
from olmoearth.layout import DECODER, ENCODER, MISSING
from pipelines.common.storage import Storage, is_s3, join, strip_scheme
from pipelines.pretrain.engine import (
    OptimConfig,
    deepspeed_config,
    grad_accum_steps,
    lr_factor_fn,
    resolve_precision,
    use_own_torch_extensions_dir,
)
from pipelines.pretrain.stream import StreamConfig
from pipelines.pretrain.throughput import ModelShape, RunningMeter, memory_bytes, peak_flops, train_step_flops

# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelSection:
    size: str = "base"  # nano | tiny | base | large


@dataclass
class TrainSection:
    max_steps: int = 667_200  # optimiser steps (the original Base: 300 epochs x 2,224 steps)
    global_batch_size: int = 512  # samples per optimiser step, all workers and microbatches together
    zero_stage: int = 2  # DeepSpeed ZeRO stage 1, 2 or 3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 3622
    log_every: int = 10  # steps between metrics rows
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the last K checkpoints are kept
    fail_at_step: int = 0  # fault-injection for tests: the last worker raises at this step (fresh start only)
    probe_every: int = 0  # steps between in-loop probes of the encoder (0: none)
    probe_uri: str = ""  # a labelled synthetic corpus (olmoearth synth --labelled) scored by the probe
    probe_max_chips: int = 256
    probe_chip_size: int = 32  # the probe task is pipelines.evaluation.synth_task.EUROSAT_LIKE (that of
    probe_max_timesteps: int = 1  # configs/eval_synth.yaml) with these two taken from here


@dataclass
class ScalingSection:
    num_workers: int = 8
    use_gpu: bool = True
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu
    threads_per_worker: int = 0  # torch intra-op threads per worker; 0 leaves Ray's default (its CPUs)
    normal_priority: bool = True  # run the training workers at niceness 0 (Ray starts workers at 15)


@dataclass
class RunSection:
    name: str = "olmoearth-pretrain"
    storage_path: str = "runs"  # local path or s3:// URI; the run lives in <storage_path>/<name>
    s3_endpoint: str | None = None  # S3-compatible server (else AWS_ENDPOINT_URL / AWS)
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before giving up
    resume: bool = True  # a resubmitted name continues from its latest checkpoint


@dataclass
class PretrainConfig:
    """Latent MIM Lite pretraining with Ray Train + DeepSpeed."""

    model: ModelSection = field(default_factory=ModelSection)
    data: StreamConfig = field(default_factory=StreamConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)


def run_uri(cfg: PretrainConfig) -> str:
    return join(cfg.run.storage_path, cfg.run.name)


def micro_batch_size(cfg: PretrainConfig) -> int:
    """Samples per worker per forward/backward: the stream's batch (one collated batch per row)."""
    return int(cfg.data.batch_size)


def validate(cfg: PretrainConfig) -> int:
    """Check the numbers that must agree; returns the gradient-accumulation steps."""
    t = cfg.train
    for name in ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, name) <= 0:
            raise ValueError(f"train.{name} must be > 0, got {getattr(t, name)}")
    if cfg.scaling.num_workers <= 0:
        raise ValueError(f"scaling.num_workers must be > 0, got {cfg.scaling.num_workers}")
    resolve_precision(t.precision, cfg.scaling.use_gpu)
    lr_factor_fn(cfg.optim, t.max_steps)  # checks the warmup fits the run
    if t.zero_stage not in (1, 2, 3):
        raise ValueError(f"train.zero_stage must be 1, 2 or 3, got {t.zero_stage}")
    return grad_accum_steps(t.global_batch_size, micro_batch_size(cfg), cfg.scaling.num_workers)


# ----------------------------------------------------------------------------------------------------------
# Training state kept in every checkpoint


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch of the stream
    consumed: list = field(default_factory=list)  # stream batch indices of this epoch trained on (all ranks)
    samples_seen: int = 0
    tokens_seen: int = 0
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

    def to_json(self, cfg: PretrainConfig, world_size: int) -> str:
        out = dataclasses.asdict(self)
        out.update(world_size=world_size, config=dataclasses.asdict(cfg))
        return json.dumps(out)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ----------------------------------------------------------------------------------------------------------
# Per-worker pieces


def model_shape(model) -> ModelShape:
    """The sizes that set the FLOPs of a step, from the model's own config."""
    c = model.config
    return ModelShape(enc_dim=c.encoder_dim, enc_depth=c.encoder_depth, dec_dim=c.decoder_dim,
                      dec_depth=c.decoder_depth, mlp_ratio=float(c.mlp_ratio))


def token_counts(batch: dict) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Per-sample counts of present tokens and, per view, of encoded and decoded tokens."""
    views = []
    present = None
    for key in ("mask_a", "mask_b"):
        enc = dec = pres = 0
        for m in batch[key].values():
            m = m.reshape(m.shape[0], -1)
            enc = enc + (m == ENCODER).sum(1)
            dec = dec + (m == DECODER).sum(1)
            pres = pres + (m != MISSING).sum(1)
        views.append((torch.as_tensor(enc).cpu().numpy(), torch.as_tensor(dec).cpu().numpy()))
        present = torch.as_tensor(pres).cpu().numpy()
    return present, views


def cast_batch(batch: dict, dtype: torch.dtype) -> dict:
    """Floating-point inputs to the engine's parameter dtype (bf16 training runs bf16 activations)."""
    if dtype == torch.float32:
        return batch
    out = dict(batch)
    out["x"] = {k: v.to(dtype) for k, v in batch["x"].items()}
    return out


def grouped(it: Iterator, n: int) -> Iterator[list]:
    """Consecutive groups of n items; a short tail is returned too (the caller decides)."""
    group = []
    for item in it:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def waited(it: Iterator, meter: RunningMeter) -> Iterator:
    """The items of `it`, adding the time spent waiting for each to the meter's data wait."""
    it = iter(it)
    while True:
        started = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        meter.add_data_wait(time.perf_counter() - started)
        yield item


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _all_reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def epoch_iterator(cfg: PretrainConfig, storage: Storage, epoch: int, state: TrainState, rank: int,
                   world_size: int):
    """This rank's split of the epoch's stream. Rank 0 builds the Ray Data dataset (leaving out the batches
    already trained on, see TrainState.resume_point) and deals one `streaming_split` iterator to every
    rank; equal=True gives every rank the same number of batches, so no rank waits alone in a collective."""
    import torch.distributed as dist

    from pipelines.pretrain.stream import training_dataset

    if rank == 0:
        skip, later = state.resume_point()
        ds = training_dataset(cfg.data, storage, epoch=epoch, skip_batches=skip)
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


def indexed_batches(shard, cfg: PretrainConfig, device) -> Iterator[tuple[int, dict]]:
    """(batch index in the epoch, layout.py batch of torch tensors) from the stream's rows
    ({"batch": pickled numpy batch, "index": int, ...}, see pipelines/pretrain/stream.py)."""
    import pickle

    from pipelines.pretrain.stream import to_torch

    rows = shard.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=cfg.data.prefetch_batches)
    for table in rows:
        for raw, index in zip(table.column("batch"), table.column("index"), strict=True):
            yield int(index.as_py()), to_torch(pickle.loads(raw.as_buffer()), device)


def _gather_consumed(mine: list[int]) -> list[int]:
    """Every rank's trained batch indices of this epoch, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(mine)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(mine))
    return sorted(i for part in out for i in part)


def _save_history(storage: Storage, uri: str, history: list[dict]) -> None:
    from pipelines.pretrain.plots import loss_curve_png

    storage.write_text(join(uri, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
    if history:
        storage.write_bytes(join(uri, "loss_curve.png"), loss_curve_png(history, title=os.path.basename(uri)))


def normal_priority() -> bool:
    """Set every thread of this process to niceness 0. Ray starts its worker processes at niceness 15
    (RAY_worker_niceness), so on a node shared with other work the training workers yield the CPU to any
    normal-priority process (on the shared build machine the job ran at ~0.6 of a plain PyTorch loop,
    docs/pretraining.md). Lowering a niceness needs CAP_SYS_NICE (root): without it nothing changes.
    Returns whether the calling thread now runs at niceness 0."""
    tids = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tids:  # on Linux the niceness is per thread; threads started later inherit their creator's
        try:
            if os.getpriority(os.PRIO_PROCESS, int(tid)) > 0:
                os.setpriority(os.PRIO_PROCESS, int(tid), 0)
        except ProcessLookupError:  # the thread has ended
            continue
        except PermissionError:
            break
    return os.getpriority(os.PRIO_PROCESS, 0) == 0


def build_engine(cfg: PretrainConfig, model, world_size: int, grad_accum: int, use_gpu: bool, precision: str):
    """The DeepSpeed engine over the model's trainable groups (the frozen target projection is not in them),
    with the config's ZeRO stage, AdamW, clipping and schedule; the bench builds its in-process engine here too."""
    import deepspeed

    use_own_torch_extensions_dir()  # before DeepSpeed compiles its ops
    ds_config = deepspeed_config(cfg.optim, cfg.train.zero_stage, micro_batch_size(cfg), world_size, grad_accum,
                                 use_gpu, precision)  # fmt: skip
    schedule = lr_factor_fn(cfg.optim, cfg.train.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.param_groups(cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )  # fmt: skip
    return engine


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function."""
    import ray.train
    from ray.train import Checkpoint

    from olmoearth import build_model
    from pipelines.pretrain.stream import load_norm_stats, num_batches

    cfg: PretrainConfig = config["cfg"]
    entered = time.time()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu
    if cfg.scaling.normal_priority:
        normal_priority()
    if cfg.scaling.threads_per_worker > 0:
        torch.set_num_threads(cfg.scaling.threads_per_worker)
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, use_gpu)
    grad_accum = grad_accum_steps(cfg.train.global_batch_size, micro_batch_size(cfg), world_size)
    storage = Storage(cfg.run.s3_endpoint)
    out_uri = run_uri(cfg)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.size)
    model.encoder.norm_stats = load_norm_stats(cfg.data.shards_uri, storage)  # what export will save
    shape = model_shape(model)
    engine = build_engine(cfg, model, world_size, grad_accum, use_gpu, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    state, resumed = TrainState(), False
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            with open(os.path.join(d, STATE_FILE)) as fh:
                state = TrainState.from_json(fh.read())
        state.resumed_from.append(state.step)
        resumed = True

    probe_set = None
    if cfg.train.probe_every > 0:
        probe_set = load_probe(cfg)

    peak, peak_source = peak_flops(device, precision)
    meter = RunningMeter(peak)
    # where this attempt's start-up went, logged once in its first metrics row: fit() called -> this loop
    # entered (worker group, imports), -> engine ready (model, DeepSpeed, checkpoint), -> first batch
    ready = time.time()
    startup: dict | None = {"startup_worker_s": entered - config["submitted"], "startup_engine_s": ready - entered}
    loss_sums: dict[str, torch.Tensor] = {}
    last_batch = None
    max_steps = cfg.train.max_steps

    def report(checkpoint_now: bool, row: dict | None) -> None:
        metrics = dict(row or {}, step=state.step, epoch=state.epoch)
        if not checkpoint_now:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)  # collective: every rank writes its ZeRO shards
            reference = None
            if state.step >= max_steps and last_batch is not None:
                reference = reference_output(engine.module.encoder, last_batch, dtype)  # all ranks (ZeRO-3)
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as fh:
                    fh.write(state.to_json(cfg, world_size))
                if reference is not None:
                    torch.save(reference, os.path.join(tmp, REFERENCE_FILE))
                _save_history(storage, out_uri, state.history)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def finish_epoch(consumed: list[int]) -> None:
        total = num_batches(cfg.data, storage, state.epoch)
        summary = {"epoch": state.epoch, "batches": total, "trained": len(consumed),
                   "unique": len(set(consumed)), "dropped": total - len(set(consumed))}  # fmt: skip
        state.epochs.append(summary)
        if rank == 0:
            print(f"epoch {state.epoch} done: {summary}")
        state.epoch += 1
        state.consumed = []

    n_micro = 0
    while state.step < max_steps:
        if state.resume_point()[0] >= num_batches(cfg.data, storage, state.epoch):
            finish_epoch(state.consumed)  # resumed from a checkpoint taken at the very end of an epoch
            continue
        started = time.perf_counter()
        shard = epoch_iterator(cfg, storage, state.epoch, state, rank, world_size)
        meter.add_data_wait(time.perf_counter() - started)
        mine: list[int] = []  # indices this rank trained on since the epoch (re)started
        already = list(state.consumed)
        steps_this_epoch, done = 0, False
        for group in grouped(waited(indexed_batches(shard, cfg, device), meter), grad_accum):
            if len(group) < grad_accum:  # an epoch's tail that does not fill a step (counted as dropped)
                break
            if startup is not None and "startup_first_batch_s" not in startup:
                startup["startup_first_batch_s"] = time.time() - ready
            for index, batch in group:
                out = engine(cast_batch(batch, dtype))
                engine.backward(out["loss"])
                engine.step()
                for k in ("loss", "patch_disc", "contrastive"):
                    if k in out:
                        loss_sums[k] = loss_sums.get(k, 0.0) + out[k].detach().float()
                n_micro += 1
                present, views = token_counts(batch)
                meter.add_work(len(present), int(present.sum()), train_step_flops(shape, present, views))
                state.tokens_seen += int(present.sum()) * world_size
                mine.append(index)
                last_batch = batch
            state.step += 1
            steps_this_epoch += 1
            state.samples_seen += cfg.train.global_batch_size
            if cfg.train.fail_at_step == state.step and not resumed and rank == world_size - 1:
                raise RuntimeError(f"fault injection: worker {rank} fails at step {state.step} (train.fail_at_step)")

            done = state.step >= max_steps
            row = None
            if state.step % cfg.train.log_every == 0 or done:
                losses = _all_reduce_mean({k: float(v) / n_micro for k, v in loss_sums.items()}, device)
                loss_sums, n_micro = {}, 0
                row = meter.record(world_size, lambda counts: _all_reduce_sum(counts, device))
                row.update(losses)
                row.update(step=state.step, epoch=state.epoch, lr=float(engine.get_lr()[0]),
                           grad_norm=_grad_norm(engine), memory_gb=memory_bytes(device) / 2**30,
                           peak_tflops=peak / 1e12)
                if startup is not None:
                    row.update(startup)
                    startup = None
            if probe_set is not None and (state.step % cfg.train.probe_every == 0 or done):
                # ZeRO-3 gathers parameters collectively: then every rank runs the (identical) probe
                if rank == 0 or cfg.train.zero_stage == 3:
                    started = time.perf_counter()
                    scores = run_probe(engine.module.encoder, probe_set, dtype)
                    meter.start += time.perf_counter() - started  # probe time is not training time
                    if row is not None and rank == 0:
                        row.update(scores)
            if row is not None:
                state.history.append(row)
            started = time.perf_counter()
            if state.step % cfg.train.checkpoint_every == 0 or done:
                state.consumed = already + _gather_consumed(mine)
                report(True, row)
            elif row is not None:
                report(False, row)
            meter.add_report_wait(time.perf_counter() - started)
            if done:
                break
        if done:
            break
        if steps_this_epoch == 0 and not already:
            raise ValueError(
                f"epoch {state.epoch} of the corpus stream gave no full step: global batch "
                f"{cfg.train.global_batch_size} needs {grad_accum} batches of {micro_batch_size(cfg)} per worker "
                f"x {world_size} workers ({cfg.data.shards_uri})"
            )
        finish_epoch(already + _gather_consumed(mine))
    if rank == 0:
        print(f"pretraining finished at step {state.step}; MFU peak from {peak_source}")


def load_probe(cfg: PretrainConfig):
    """The in-memory labelled set of the in-loop probe (pipelines/evaluation/hook.py)."""
    from pipelines.evaluation.hook import load_probe_set
    from pipelines.evaluation.synth_task import EUROSAT_LIKE, SynthTaskReader

    if not cfg.train.probe_uri:
        raise ValueError("train.probe_every > 0 needs train.probe_uri (a labelled synthetic corpus)")
    task = dict(EUROSAT_LIKE, chip_size=cfg.train.probe_chip_size, max_timesteps=cfg.train.probe_max_timesteps)
    reader = SynthTaskReader(root=cfg.train.probe_uri, s3_endpoint=cfg.run.s3_endpoint, **task)
    return load_probe_set(reader, max_chips=cfg.train.probe_max_chips, seed=cfg.train.seed)


def run_probe(encoder, probe_set, dtype: torch.dtype) -> dict[str, float]:
    """kNN / linear-probe scores of the encoder being trained (its mode and the RNG are left as they were)."""
    from pipelines.evaluation.hook import probe

    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16,
                        enabled=dtype == torch.bfloat16):
        return {f"probe/{k}": float(v) for k, v in probe(encoder, probe_set).items()}


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def reference_output(encoder, batch: dict, dtype: torch.dtype, max_samples: int = 2) -> dict:
    """A reference input (a few samples of a training batch, de-normalised to raw units with the corpus
    statistics) and what `olmoearth.encode` gives for it with the in-training encoder. Saved with the final
    checkpoint; `export` checks that the exported encoder reproduces it."""
    from olmoearth import encode
    from olmoearth.modalities import MODALITIES

    stats = encoder.norm_stats
    x = {}
    for name, v in batch["x"].items():
        if MODALITIES[name].encoder_input:
            lo, hi = (torch.as_tensor(a, dtype=torch.float32) for a in (stats.lo[name], stats.hi[name]))
            x[name] = v[:max_samples].float().cpu() * (hi - lo) + lo  # (b, H, W, T, C) raw units
    months = batch["months"][:max_samples].cpu()
    patch_size = int(batch["patch_size"])
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16,
                        enabled=dtype == torch.bfloat16):
        out = encode(encoder, x, months, patch_size)
    return {"x": x, "months": months, "patch_size": patch_size, "precision": str(dtype).split(".")[-1],
            "pooled": out.pooled.float().cpu(), "patches": out.patches.float().cpu()}


# ----------------------------------------------------------------------------------------------------------
# Driver side: checkpoints of a run, resume, pruning, progress


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


def prune_checkpoints(storage: Storage, uri: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints of a run across its trials (Ray keeps K per trial; a
    resubmitted run is a new trial). Returns the deleted URIs."""
    found = list_checkpoints(storage, uri)
    doomed = [path for _, path in found[:-keep]] if keep > 0 else []
    fs = storage.fs(uri)
    for path in doomed:
        fs.rm(path, recursive=True)
    return doomed


def _progress_callback(total: int, initial: int):
    """A Ray Tune callback that moves a tqdm bar on the driver as workers report steps. The bar is made on
    the driver at the first result (the callback itself is pickled into the run's config)."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.bar = None

        def __getstate__(self):
            return {"bar": None}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="pretrain", unit="step")
            step = int(result.get("step", self.bar.n))
            self.bar.update(max(0, step - self.bar.n))
            post = {k: f"{result[k]:.4g}" for k in ("loss", "lr", "tokens_per_s") if k in result}
            self.bar.set_postfix(post, refresh=False)

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

    return Progress()


def fit(cfg: PretrainConfig):
    """Run (or continue) pretraining; returns Ray's Result (None when the run had already reached
    train.max_steps). The run's final metrics.jsonl and loss_curve.png lie in run_uri(cfg)."""
    import ray
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    validate(cfg)
    storage = Storage(cfg.run.s3_endpoint)
    uri = run_uri(cfg)
    storage.makedirs(cfg.run.storage_path)
    fs, path = ray_storage(storage, cfg.run.storage_path)

    resume_from, initial = None, 0
    if cfg.run.resume:
        latest = latest_checkpoint(storage, uri)
        if latest is not None:
            resume_from = Checkpoint(path=strip_scheme(latest) if is_s3(latest) else latest, filesystem=fs)
            initial = int(json.loads(storage.read_text(join(latest, STATE_FILE)))["step"])
            print(f"resuming {uri} from {latest} (step {initial})")
    if initial >= cfg.train.max_steps:
        print(f"{uri} already reached step {initial} >= train.max_steps={cfg.train.max_steps}; nothing to do")
        return None

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "submitted": time.time()},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[_progress_callback(cfg.train.max_steps, initial)], verbose=0,
        ),
        resume_from_checkpoint=resume_from,
    )  # fmt: skip
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # a submitted job, or a cluster chosen by the user
            ray.init()
        else:  # a local cluster with logical CPUs to spare, so Ray Data never starves behind the workers
            ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    prune_checkpoints(storage, uri, cfg.train.keep_checkpoints)
    return result
