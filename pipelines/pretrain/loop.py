"""One training worker's run, Ray Train's per-worker function (`train_loop`).

Each worker: build the model, wrap it in a DeepSpeed engine (ZeRO 1/2/3, AdamW on the trainable parameters
only: the frozen target projection is never in the optimiser), restore the latest checkpoint if Ray hands
one over, then per epoch read its split of the corpus stream (rank 0 builds the epoch's Ray Data dataset,
already skipping the part of the epoch finished before the checkpoint, and deals `streaming_split`
iterators to all ranks), step, log, validate, probe, checkpoint.

Validation (train.val_every > 0): the held-out shards' fixed batches (pipelines/pretrain/validation.py) are
built once per worker process at start, and the model's loss parts on them join the metrics row every
val_every steps and at the end; a fresh run also logs them, with the probe, before its first step, as step 0:
the untrained model's figures that the curve starts from. Each metrics row also holds the training loss per
patch size of its interval (`loss_p<p>`): the batch's patch size sets most of a step's loss.

The driver (pipelines/pretrain/job.py) hands every worker the config object, the test fault plan
(pipelines/common/faults.py) and an optional probe: any picklable `probe(encoder) -> {name: score}` built by
the caller (pipelines/evaluation/hook.py `make_probe`), so this stage never imports a later one."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from olmoearth.checkpoint import DS_TAG, REFERENCE_FILE, STATE_FILE
from olmoearth.layout import DECODER, ENCODER, MISSING
from olmoearth.modalities import MAX_PATCH_SIZE
from pipelines.common.iterables import grouped
from pipelines.common.storage import Storage
from pipelines.pretrain.checkpoints import TrainState, restore_checkpoint, save_history, write_completeness
from pipelines.pretrain.collective import all_reduce_mean, all_reduce_sum, epoch_iterator, gather_consumed
from pipelines.pretrain.config import PretrainConfig, final_step, micro_batch_size, run_uri
from pipelines.pretrain.engine import grad_accum_steps, resolve_precision
from pipelines.pretrain.stream import indexed_batches, num_batches, stream_norm_stats, to_torch
from pipelines.pretrain.throughput import RunningMeter, memory_bytes, peak_flops, train_step_flops
from pipelines.pretrain.validation import validation_batches, validation_losses
from pipelines.pretrain.worker import (
    autocast,
    build_engine,
    init_weights,
    model_shape,
    normal_priority,
    reference_output,
)

LOSS_KEYS = ("loss", "patch_disc", "contrastive")

Probe = Callable[[torch.nn.Module], dict]


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


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


class TrainLoop:
    """One worker: `TrainLoop(cfg, faults, probe, submitted).run()`."""

    def __init__(self, cfg: PretrainConfig, faults: dict, probe: Probe | None, submitted: float):
        import ray.train

        entered = time.time()
        self.cfg, self.faults = cfg, faults
        self.probe = probe if cfg.train.probe_every > 0 else None
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._set_up_process()
        self.storage, self.out_uri = Storage(), run_uri(cfg)
        self._build_engine()
        self.state, self.resumed = TrainState(), False
        self._restore()
        self.peak, self.peak_source = peak_flops(self.device, self.precision)
        self.meter = RunningMeter(self.peak)
        # where this attempt's start-up went, logged once in its first metrics row: fit() called -> this loop
        # entered (worker group, imports), -> engine ready (model, DeepSpeed, checkpoint), -> first batch
        self.ready = time.time()
        self.startup: dict | None = {"startup_worker_s": entered - submitted, "startup_engine_s": self.ready - entered}
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.n_micro = 0
        self.patch_sums: dict[int, torch.Tensor] = {}  # training loss summed per patch size, this interval
        self.patch_counts: dict[int, int] = {}
        self.last_batch = None
        self.val_batches = self._load_validation()

    def _set_up_process(self) -> None:
        import ray.train.torch

        cfg = self.cfg
        if cfg.scaling.normal_priority:
            normal_priority()
        if cfg.scaling.threads_per_worker > 0:
            torch.set_num_threads(cfg.scaling.threads_per_worker)
        use_gpu = cfg.scaling.use_gpu
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        self.precision = resolve_precision(cfg.train.precision, use_gpu)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.grad_accum = grad_accum_steps(cfg.train.global_batch_size, micro_batch_size(cfg), self.world_size)

    def _build_engine(self) -> None:
        import ray.train

        from olmoearth import build_model

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model.size, norm_stats=stream_norm_stats(cfg.data, self.storage))
        if cfg.model.init_from and ray.train.get_checkpoint() is None:  # a resumed run restores its own instead
            init_weights(model, cfg.model.init_from, self.storage)
        self.shape = model_shape(model)
        self.engine = build_engine(cfg, model, self.world_size, self.grad_accum, cfg.scaling.use_gpu,
                                   self.precision)  # fmt: skip

    def _restore(self) -> None:
        """The latest complete checkpoint's weights, optimiser and training state, when Ray hands one over."""
        state = restore_checkpoint(self.storage, self.out_uri, self.engine, TrainState.from_json)
        if state is None:
            return
        self.state = state
        self.state.resumed_from.append(self.state.step)
        self.resumed = True

    # ------------------------------------------------------------------------------------------------------

    def run(self) -> None:
        state = self.state
        if state.step == 0 and self.cfg.train.val_every > 0:
            self._evaluate_untrained()
        while state.step < final_step(self.cfg):
            if state.resume_point()[0] >= num_batches(self.cfg.data, self.storage, state.epoch):
                self._finish_epoch(state.consumed)  # resumed from a checkpoint taken at the very end of an epoch
                continue
            if self._run_epoch():
                break
        if self.rank == 0:
            print(f"pretraining finished at step {state.step}; MFU peak from {self.peak_source}")

    def _run_epoch(self) -> bool:
        """Train on this rank's split of the current epoch; True when the run reached its final step in it."""
        started = time.perf_counter()
        shard = epoch_iterator(self.cfg.data, self.storage, self.state.epoch, self.state, self.rank, self.world_size)
        self.meter.add_data_wait(time.perf_counter() - started)
        mine: list[int] = []  # indices this rank trained on since the epoch (re)started
        already = list(self.state.consumed)
        steps = 0
        batches = indexed_batches(shard, self.cfg.data, self.device)
        for group in grouped(waited(batches, self.meter), self.grad_accum):
            if len(group) < self.grad_accum:  # an epoch's tail that does not fill a step (counted as dropped)
                break
            if self.startup is not None and "startup_first_batch_s" not in self.startup:
                self.startup["startup_first_batch_s"] = time.time() - self.ready
            for index, batch in group:
                self._micro_step(batch)
                mine.append(index)
            steps += 1
            if self._after_step(already, mine):
                return True
        if steps == 0 and not already:
            t = self.cfg.train
            raise ValueError(
                f"epoch {self.state.epoch} of the corpus stream gave no full step: global batch "
                f"{t.global_batch_size} needs {self.grad_accum} batches of {micro_batch_size(self.cfg)} per "
                f"worker x {self.world_size} workers ({self.cfg.data.shards_uri})"
            )
        self._finish_epoch(already + gather_consumed(mine))
        return False

    def _micro_step(self, batch: dict) -> None:
        out = self.engine(cast_batch(batch, self.dtype))
        self.engine.backward(out["loss"])
        self.engine.step()
        for k in LOSS_KEYS:
            if k in out:
                self.loss_sums[k] = self.loss_sums.get(k, 0.0) + out[k].detach().float()
        self.n_micro += 1
        p = int(batch["patch_size"])
        self.patch_sums[p] = self.patch_sums.get(p, 0.0) + out["loss"].detach().float()
        self.patch_counts[p] = self.patch_counts.get(p, 0) + 1
        present, views = token_counts(batch)
        self.meter.add_work(len(present), int(present.sum()), train_step_flops(self.shape, present, views))
        self.state.tokens_seen += int(present.sum()) * self.world_size
        self.last_batch = batch

    def _after_step(self, already: list[int], mine: list[int]) -> bool:
        """Count the optimiser step just taken; log, probe and checkpoint when due. True at the final step."""
        state, t = self.state, self.cfg.train
        state.step += 1
        state.samples_seen += t.global_batch_size
        self._inject_fault()
        done = state.step >= final_step(self.cfg)
        validate = t.val_every > 0 and (state.step % t.val_every == 0 or done)
        row = self._metrics_row() if state.step % t.log_every == 0 or done or validate else None
        if validate:
            self._run_validation(row)
        if self.probe is not None and (state.step % t.probe_every == 0 or done):
            self._run_probe(row)
        if row is not None:
            state.history.append(row)
        started = time.perf_counter()
        if state.step % t.checkpoint_every == 0 or done:
            state.consumed = already + gather_consumed(mine)
            self._report(row, checkpoint=True)
        elif row is not None:
            self._report(row, checkpoint=False)
        self.meter.add_report_wait(time.perf_counter() - started)
        return done

    def _inject_fault(self) -> None:
        """The test fault "train_step": the last worker raises at that step of an attempt started fresh."""
        step = self.state.step
        if self.faults.get("train_step") == step and not self.resumed and self.rank == self.world_size - 1:
            raise RuntimeError(f"fault injection: worker {self.rank} fails at step {step} (train_step)")

    def _metrics_row(self) -> dict:
        losses = all_reduce_mean({k: float(v) / self.n_micro for k, v in self.loss_sums.items()}, self.device)
        self.loss_sums, self.n_micro = {}, 0
        row = self.meter.record(self.world_size, lambda counts: all_reduce_sum(counts, self.device))
        row.update(losses)
        row.update(self._patch_losses())
        row.update(step=self.state.step, epoch=self.state.epoch, lr=float(self.engine.get_lr()[0]),
                   grad_norm=grad_norm(self.engine), memory_gb=memory_bytes(self.device) / 2**30,
                   peak_tflops=self.peak / 1e12)  # fmt: skip
        if self.startup is not None:
            row.update(self.startup)
            self.startup = None
        return row

    def _patch_losses(self) -> dict:
        """{"loss_p<p>": mean training loss of the interval's batches of patch size p} over all ranks."""
        sizes = range(1, MAX_PATCH_SIZE + 1)
        local = [float(self.patch_sums.get(p, 0.0)) for p in sizes]
        local += [float(self.patch_counts.get(p, 0)) for p in sizes]
        total = all_reduce_sum(local, self.device)
        self.patch_sums, self.patch_counts = {}, {}
        n = len(sizes)
        return {f"loss_p{p}": total[i] / total[n + i] for i, p in enumerate(sizes) if total[n + i] > 0}

    def _evaluates(self) -> bool:
        """Whether this rank runs the probe and the validation: rank 0 alone, or every rank under ZeRO-3,
        whose parameter gathers are collective (all ranks then compute the same figures)."""
        return self.rank == 0 or self.cfg.train.zero_stage == 3

    def _load_validation(self) -> list[dict] | None:
        """The validation batches on this rank's device, when validation is on and this rank evaluates."""
        t = self.cfg.train
        if t.val_every <= 0 or not self._evaluates():
            return None
        batches = validation_batches(self.cfg.data, self.storage, t.val_patch_sizes, t.val_max_samples)
        return [cast_batch(to_torch(b, self.device), self.dtype) for b in batches]

    def _run_validation(self, row: dict | None) -> None:
        """The model's loss parts on the validation batches; they join this step's row (rank 0's)."""
        if self.val_batches is None:
            return
        started = time.perf_counter()
        with autocast(self.dtype):
            losses = validation_losses(self.engine.module, self.val_batches)
        self.meter.start += time.perf_counter() - started  # validation time is not training time
        if row is not None and self.rank == 0:
            row.update(losses)

    def _evaluate_untrained(self) -> None:
        """Step 0 of a fresh run: the validation losses (and probe scores) of the model before any step."""
        row = {"step": 0, "epoch": 0}
        self._run_validation(row)
        if self.probe is not None:
            self._run_probe(row)
        self.state.history.append(row)
        self._report(row, checkpoint=False)

    def _run_probe(self, row: dict | None) -> None:
        """Score the encoder being trained; the scores join this step's row."""
        if not self._evaluates():
            return
        started = time.perf_counter()
        with autocast(self.dtype):
            scores = {f"probe/{k}": float(v) for k, v in self.probe(self.engine.module.encoder).items()}
        self.meter.start += time.perf_counter() - started  # probe time is not training time
        if row is not None and self.rank == 0:
            row.update(scores)

    def _report(self, row: dict | None, checkpoint: bool) -> None:
        """Hand the metrics (and, when due, a checkpoint of every rank) to Ray Train."""
        import ray.train
        from ray.train import Checkpoint

        state = self.state
        metrics = dict(row or {}, step=state.step, epoch=state.epoch)
        if not checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)  # collective: every rank writes its ZeRO shards
            reference = None
            if state.step >= final_step(self.cfg) and self.last_batch is not None:  # all ranks (ZeRO-3)
                reference = reference_output(self.engine.module.encoder, self.last_batch, self.dtype)
            if self.rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as fh:
                    fh.write(state.to_json(self.cfg, self.world_size, self.engine.module.encoder.norm_stats))
                if reference is not None:
                    torch.save(reference, os.path.join(tmp, REFERENCE_FILE))
                save_history(self.storage, self.out_uri, state.history)
            write_completeness(tmp, self.rank)  # last: this rank's files and sizes, checked on resume/export
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def _finish_epoch(self, consumed: list[int]) -> None:
        state = self.state
        total = num_batches(self.cfg.data, self.storage, state.epoch)
        summary = {"epoch": state.epoch, "batches": total, "trained": len(consumed),
                   "unique": len(set(consumed)), "dropped": total - len(set(consumed))}  # fmt: skip
        state.epochs.append(summary)
        if self.rank == 0:
            print(f"epoch {state.epoch} done: {summary}")
        state.epoch += 1
        state.consumed = []


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function: config = {"cfg", "faults", "probe", "submitted"} from the driver."""
    TrainLoop(config["cfg"], config["faults"], config["probe"], config["submitted"]).run()
