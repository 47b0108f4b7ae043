"""One fine-tuning worker's run, Ray Train's per-worker function (`train_loop`).

Each worker: build the fine-tuned model (the encoder of `model.init_from` + a fresh head), wrap it in a
DeepSpeed engine (pipelines/pretrain/engine.py's config: ZeRO 1/2/3, AdamW, clipping) over the schedule's
parameter groups (pipelines/finetune/schedule.py), restore the latest checkpoint if Ray hands one over,
then per epoch: train on its run of the epoch's rows (pipelines/finetune/batches.py), batches read with
pipelines/finetune/data.py `load_batch` and D4-augmented, the schedule setting every group's lr before
each step; recompute the head's input statistics from train rows in eval mode (`recalibrate_head_norms`);
score the val and test splits (every rank its share, combined over the process group); step the plateau
scheduler; checkpoint (the pretraining run layout: DeepSpeed files, train_state.json, the
completeness manifests written last) and report the epoch's metrics row to Ray.

While the original schedule keeps the backbone frozen its parameters get lr 0 and weight decay 0 (so
AdamW leaves them bit-identical) and, under ZeRO 1/2, requires_grad False (no backward through the
encoder: the cost of a frozen epoch is the forward and the head's backward)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np
import torch

from olmoearth.checkpoint import DS_TAG, STATE_FILE
from pipelines.common.storage import Storage, is_s3
from pipelines.finetune.batches import d4, epoch_rng, epoch_rows, eval_batches, steps_per_epoch, to_device
from pipelines.finetune.config import FinetuneConfig, best_metric, run_uri
from pipelines.finetune.metrics import ScoreAccumulator
from pipelines.finetune.schedule import Plateau, apply_schedule, is_frozen, param_groups
from pipelines.finetune.state import FinetuneState, write_records
from pipelines.pretrain.checkpoints import prune_checkpoints, restore_checkpoint, write_completeness
from pipelines.pretrain.collective import all_reduce_mean, all_reduce_sum
from pipelines.pretrain.engine import (
    OptimConfig,
    deepspeed_config,
    resolve_precision,
    use_own_torch_extensions_dir,
)
from pipelines.pretrain.worker import normal_priority


def build_model(cfg: FinetuneConfig, task, storage: Storage):
    """The FineTunedModel to train: the encoder of model.init_from (its norm stats with it) and a head
    seeded by train.seed, in train mode."""
    from olmoearth import load_model
    from olmoearth.finetuned import FineTunedModel

    source = cfg.model.init_from
    loaded = load_model(source, fs=storage.fs(source) if is_s3(source) else None)
    encoder = getattr(loaded, "encoder", loaded)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = FineTunedModel(encoder, task)
    if cfg.model.drop_path >= 0:
        for block in model.encoder.blocks:
            block.drop_path.p = cfg.model.drop_path
    return model.train()


@torch.no_grad()
def recalibrate_head_norms(model, forward, batches, average=None) -> None:
    """Set the head's input statistics (every FeatureNorm's running mean and variance) to those of the
    model's eval-mode features over `batches` ((x, months) pairs, run through `forward`: the model or its
    engine), averaged over ranks by `average` (in place on a tensor) when given. Leaves the model in eval mode.

    Why: the pooled features are nearly one vector plus small chip-specific deviations, which FeatureNorm
    divides by their tiny spread; BatchNorm's running statistics trail the features by ~10 steps and are
    taken with drop path on, so after steps at a head-group lr (which includes the encoder's final norm) they
    no longer describe the features being scored, and an evaluation or an exported model can predict one
    class for every chip while the training loss keeps falling."""
    from olmoearth.heads import FeatureNorm

    norms = [m for m in model.head.modules() if isinstance(m, FeatureNorm)]
    model.eval()
    if not norms:
        return
    momenta = [n.momentum for n in norms]
    for n in norms:
        n.reset_running_stats()
        n.momentum = None  # a cumulative average over the batches
        n.train()
    for x, months in batches:
        forward(x, months)
    for n, momentum in zip(norms, momenta, strict=True):
        n.momentum = momentum
        n.eval()
        if average is not None:
            average(n.running_mean)
            average(n.running_var)


def build_engine(cfg: FinetuneConfig, model, world_size: int, precision: str):
    """(DeepSpeed engine, the schedule's group metas in the optimiser's order)."""
    import deepspeed

    t = cfg.train
    use_own_torch_extensions_dir()
    metas = param_groups(model, cfg)
    optim = OptimConfig(lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip, warmup_steps=0)
    ds_config = deepspeed_config(optim, t.zero_stage, t.batch_size, world_size, 1, t.use_gpu, precision)
    groups = [{"params": m["params"], "lr": m["lr"], "weight_decay": m["weight_decay"]} for m in metas]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine, metas


def all_gather(obj) -> list:
    """Every rank's `obj`, on every rank (a one-element list without a process group)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class FinetuneLoop:
    """One worker: `FinetuneLoop(cfg, splits, task, faults).run()`."""

    def __init__(self, cfg: FinetuneConfig, splits: dict[str, list[dict]], task: dict, faults: dict):
        import ray.train

        from olmoearth.finetuned import TaskSpec
        from pipelines.finetune.data import make_reader

        self.cfg, self.splits, self.faults = cfg, splits, faults
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._set_up_process()
        self.storage, self.out_uri = Storage(), run_uri(cfg)
        self.reader = make_reader(cfg.data)
        self.task = TaskSpec.from_dict(task)
        self.steps = steps_per_epoch(len(splits["train"]), cfg.train.batch_size, self.world_size)
        self.metric, higher = best_metric(cfg, self.task.kind)
        self.has_val = bool(splits.get("val"))
        weights = cfg.train.class_weights
        self.class_weights = torch.tensor(weights, dtype=torch.float32) if weights else None
        model = build_model(cfg, self.task, self.storage)
        self.engine, self.metas = build_engine(cfg, model, self.world_size, self.precision)
        plateau = Plateau(higher if self.has_val else False, cfg.schedule.plateau_factor, cfg.schedule.plateau_patience)
        self.state, self.resumed = FinetuneState(plateau=plateau.to_dict()), False
        self._restore()

    def _set_up_process(self) -> None:
        import ray.train.torch

        t = self.cfg.train
        normal_priority()
        if t.threads_per_worker > 0:
            torch.set_num_threads(t.threads_per_worker)
        self.device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
        self.precision = resolve_precision(t.precision, t.use_gpu)

    def _restore(self) -> None:
        """The latest complete checkpoint's weights, optimiser and state, when Ray hands one over."""
        state = restore_checkpoint(self.storage, self.out_uri, self.engine, FinetuneState.from_json)
        if state is None:
            return
        self.state = state
        self.state.resumed_from.append(self.state.step)
        self.resumed = True

    # ------------------------------------------------------------------------------------------------------

    def run(self) -> None:
        while self.state.epoch < self.cfg.train.epochs:
            self._run_epoch()
        if self.rank == 0:
            print(f"fine-tuning finished: {self.state.epoch} epochs, {self.state.step} steps, best {self.state.best}")

    def _set_frozen(self, frozen: bool) -> None:
        """No backward through the backbone while it is frozen (ZeRO 1/2; under ZeRO-3 lr 0 and no decay do
        it alone, its partitioned parameters being left as DeepSpeed set them)."""
        if self.cfg.train.zero_stage == 3:
            return
        for p in self.engine.module.backbone_parameters():
            p.requires_grad_(not frozen)

    def _run_epoch(self) -> None:
        cfg, state = self.cfg, self.state
        t, epoch = cfg.train, state.epoch
        frozen = is_frozen(cfg, epoch)
        self._set_frozen(frozen)
        rows = epoch_rows(self.splits["train"], t.seed, epoch, t.batch_size, self.rank, self.world_size)
        rng = epoch_rng(t.seed, epoch, self.rank)
        plateau = Plateau.from_dict(state.plateau)
        self.engine.module.train_for(frozen)
        loss_sum, data_s, started, lrs = 0.0, 0.0, time.perf_counter(), {}
        for b in range(self.steps):
            fetched = time.perf_counter()
            xt, mt, lt = self._train_batch(rows[b * t.batch_size : (b + 1) * t.batch_size], rng)
            data_s += time.perf_counter() - fetched
            lrs = apply_schedule(self.engine.optimizer.param_groups, self.metas, cfg, epoch, state.step, self.steps,
                                 plateau.scale)  # fmt: skip
            loss = self._step(xt, mt, lt)
            loss_sum += loss
            state.step += 1
            state.samples_seen += t.batch_size * self.world_size
            self._inject_fault()
            if t.log_every and b + 1 < self.steps and state.step % t.log_every == 0:
                self._report({"loss": loss_sum / (b + 1)}, checkpoint=False)
        train_s = time.perf_counter() - started
        row = self._epoch_row(loss_sum / self.steps, lrs, frozen, train_s, data_s, rows)
        self._finish_epoch(row, plateau)

    def _train_batch(self, rows: list[dict], rng: np.random.Generator):
        from pipelines.finetune.data import load_batch

        x, months, labels = load_batch(self.reader, rows)
        if self.cfg.train.augment:
            x, labels = d4(x, labels, self.task.per_pixel, rng)
        return to_device(x, months, labels, self.device)

    def _step(self, x: dict, months: torch.Tensor, labels: torch.Tensor) -> float:
        from olmoearth.finetuned import task_loss

        out = self.engine(x, months)  # (B, K) or (B, K, H, W)
        loss = task_loss(self.task, out, labels, self.class_weights)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())

    def _inject_fault(self) -> None:
        """The test fault "train_step": the last worker raises at that step of an attempt started fresh."""
        step = self.state.step
        if self.faults.get("train_step") == step and not self.resumed and self.rank == self.world_size - 1:
            raise RuntimeError(f"fault injection: worker {self.rank} fails at step {step} (train_step)")

    def _recalibrate(self, rows: list[dict]) -> None:
        """The head's input statistics from the first train.recalibrate_rows of this rank's epoch rows (every
        rank as many, so as many forwards), averaged over the ranks (recalibrate_head_norms)."""
        import torch.distributed as dist

        from pipelines.finetune.data import load_batch

        part, size = rows[: self.cfg.train.recalibrate_rows], self.cfg.train.eval_batch_size
        if not part:
            return

        def batches():
            for i in range(0, len(part), size):
                x, months, labels = load_batch(self.reader, part[i : i + size])
                xt, mt, _ = to_device(x, months, labels, self.device)
                yield xt, mt

        def average(t: torch.Tensor) -> None:
            dist.all_reduce(t)
            t /= dist.get_world_size()

        distributed = dist.is_initialized() and dist.get_world_size() > 1
        recalibrate_head_norms(self.engine.module, self.engine, batches(), average if distributed else None)
        self.engine.train()

    def _epoch_row(self, loss: float, lrs: dict, frozen: bool, train_s: float, data_s: float,
                   rows: list[dict]) -> dict:
        state, t = self.state, self.cfg.train
        train = all_reduce_mean({"loss": loss, "train_s": train_s, "data_s": data_s}, self.device)
        samples = t.batch_size * self.steps * self.world_size
        row = {"epoch": state.epoch + 1, "step": state.step, "loss": train["loss"], "frozen": frozen,
               "samples_per_s": samples / max(train["train_s"], 1e-9),
               "data_wait_frac": train["data_s"] / max(train["train_s"], 1e-9)}  # fmt: skip
        row.update({f"lr/{name}": lr for name, lr in lrs.items()})
        started = time.perf_counter()
        self._recalibrate(rows)
        for split in ("val", "test"):
            scores = self._evaluate(split)
            row.update({f"{split}/{k}": v for k, v in (scores or {}).items()})
        row["eval_s"] = time.perf_counter() - started
        return row

    @torch.no_grad()
    def _evaluate(self, split: str) -> dict | None:
        """The split's scores (metrics.py), every rank scoring its share; None for an empty split."""
        from olmoearth.finetuned import task_loss
        from pipelines.finetune.data import load_batch

        rows = self.splits.get(split) or []
        if not rows:
            return None
        acc = ScoreAccumulator(self.task.kind, self.task.num_outputs)
        self.engine.eval()
        for part, real in eval_batches(rows, self.cfg.train.eval_batch_size, self.rank, self.world_size):
            x, months, labels = load_batch(self.reader, part)
            xt, mt, lt = to_device(x, months, labels, self.device)
            out = self.engine(xt, mt)  # every rank the same number of forwards (ZeRO-3 gathers collectively)
            if real:
                loss = task_loss(self.task, out[:real], lt[:real], self.class_weights)
                acc.add(out[:real], labels[:real], float(loss))
        self.engine.train()
        return acc.scores(lambda v: all_reduce_sum(v, self.device), all_gather)

    def _finish_epoch(self, row: dict, plateau: Plateau) -> None:
        """Plateau step, best epoch, epoch summary, checkpoint."""
        state, t = self.state, self.cfg.train
        monitored = row.get(f"val/{self.metric}") if self.has_val else row["loss"]
        if self.cfg.schedule.kind == "original" and not is_frozen(self.cfg, state.epoch):
            if plateau.update(float(monitored)) and self.rank == 0:
                print(f"epoch {state.epoch + 1}: validation plateau, lr x {plateau.factor} (scale {plateau.scale:.3g})")
        state.plateau = plateau.to_dict()
        value = row.get(f"val/{self.metric}") if self.has_val else None
        if self._is_best(value):
            state.best = {"metric": f"val/{self.metric}" if self.has_val else "last epoch (no val split)",
                          "value": value, "epoch": state.epoch + 1, "step": state.step}  # fmt: skip
        trained = t.batch_size * self.steps * self.world_size
        state.epochs.append({"epoch": state.epoch + 1, "trained": trained,
                             "dropped": len(self.splits["train"]) - trained, "frozen": row["frozen"]})  # fmt: skip
        state.history.append(row)
        state.epoch += 1
        self._report(row, checkpoint=True)

    def _is_best(self, value: float | None) -> bool:
        best = self.state.best
        if value is None or not best or best.get("value") is None:
            return True
        _, higher = best_metric(self.cfg, self.task.kind)
        return value > best["value"] if higher else value < best["value"]

    def _report(self, row: dict, checkpoint: bool) -> None:
        """Hand the metrics (and, at an epoch's end, a checkpoint of every rank) to Ray Train."""
        import ray.train
        from ray.train import Checkpoint

        state = self.state
        metrics = dict(row, step=state.step, epoch=state.epoch)
        if not checkpoint:
            ray.train.report(metrics)
            return
        module = self.engine.module
        self._set_frozen(False)  # every parameter saved as trainable, as the optimiser holds it
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)  # collective: every rank writes its ZeRO shards
            if self.rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as fh:
                    fh.write(state.to_json(self.cfg, self.world_size, module.encoder.norm_stats, self.task.to_dict(),
                                           dataclasses.asdict(module.encoder.config)))  # fmt: skip
                write_records(self.storage, self.out_uri, state.history, state.best)
            write_completeness(tmp, self.rank)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        self._prune()

    def _prune(self) -> None:
        """Once every rank's upload is done: the run's last K checkpoints and the best one are kept."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            best = self.state.best.get("step")
            prune_checkpoints(self.storage, self.out_uri, self.cfg.run.keep_checkpoints,
                              protect=() if best is None else (best,))  # fmt: skip


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function: config = {"cfg", "splits", "task", "faults"} from the driver."""
    FinetuneLoop(config["cfg"], config["splits"], config["task"], config["faults"]).run()
