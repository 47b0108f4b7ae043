"""The driver side of fine-tuning: an encoder and a task head trained on labelled data with Ray Train and
DeepSpeed, in the pretraining run layout (pipelines/pretrain: engine config, checkpoints with completeness
manifests, resume after a worker failure, pruning, progress bar).

    cfg = load_config(FinetuneConfig, argv)
    summary = fit(cfg)       # validate, check the data, TorchTrainer(train_loop, ...).fit(), best.json, report.json

Before any worker starts, `fit` reads the dataset's rows once and checks them (pipelines/finetune/data.py
`checked_splits`: fatal input raises naming the file and field; skipped samples are counted per split with
their reason), builds the task spec and the model once (so a wrong `model.init_from` or head fails here),
and writes report.json with the counts. The workers get the config object, the checked rows and the task;
afterwards the driver keeps the last K checkpoints and the best one, and completes report.json with the
best epoch and its test scores."""

from __future__ import annotations

import dataclasses
import json
import time

from pipelines.common.faults import fault_plan
from pipelines.common.ray_start import init_ray
from pipelines.common.storage import Storage, join
from pipelines.finetune.batches import steps_per_epoch
from pipelines.finetune.config import FinetuneConfig, best_metric, frozen_epochs, run_uri, validate
from pipelines.finetune.loop import build_model, train_loop
from pipelines.finetune.state import BEST_FILE, REPORT_FILE, best_checkpoint
from pipelines.pretrain.checkpoints import prune_checkpoints, ray_storage
from pipelines.pretrain.job import _progress_callback, _resume_point


def prepare(cfg: FinetuneConfig, storage: Storage) -> tuple[dict, dict, dict]:
    """(task spec dict, splits {split: rows}, data report {split: {"used", "skipped": {reason: n}}})."""
    from pipelines.finetune.data import checked_splits, make_reader, task_spec

    reader = make_reader(cfg.data)
    info = reader.info()
    task = task_spec(cfg.data, info, cfg.model.head)
    t = cfg.train
    if t.class_weights and len(t.class_weights) != task.num_outputs:
        raise ValueError(f"train.class_weights has {len(t.class_weights)} weights, the task {task.num_outputs} "
                         f"classes {task.class_names}")  # fmt: skip
    best_metric(cfg, task.kind)  # the metric exists for this kind of task
    splits, counts = checked_splits(reader, task)
    steps_per_epoch(len(splits["train"]), t.batch_size, t.num_workers)  # at least one step per epoch
    build_model(cfg, task, storage)  # the encoder loads and the head fits it, before any worker starts
    return task.to_dict(), splits, counts


def _trainer(cfg: FinetuneConfig, fs, path: str, resume_from, initial: int, total: int, loop_config: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    metric, _ = best_metric(cfg, loop_config["task"]["kind"])
    keys = ("loss", f"val/{metric}")
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            # every checkpoint is kept by Ray: the workers prune to the last K and the best themselves
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[_progress_callback(total, initial, desc="finetune", keys=keys)], verbose=0,
        ),
        resume_from_checkpoint=resume_from,
    )  # fmt: skip


def fit(cfg: FinetuneConfig) -> dict:
    """Run (or continue) a fine-tuning run; returns report.json's content (also in run_uri(cfg))."""
    validate(cfg)
    started = time.time()
    storage = Storage()
    uri = run_uri(cfg)
    task, splits, counts = prepare(cfg, storage)
    for split, c in counts.items():
        print(f"finetune {split}: {c['used']} used, skipped {c['skipped'] or 'none'}")
    storage.makedirs(cfg.run.storage_path)
    t = cfg.train
    steps = steps_per_epoch(len(splits["train"]), t.batch_size, t.num_workers)
    # each epoch trains on steps x batch x workers rows of its seeded order; the rest wait for a later epoch
    dropped = len(splits["train"]) - steps * t.batch_size * t.num_workers
    report = {"run": uri, "task": task, "data": counts, "train_rows_left_out_per_epoch": dropped,
              "config": dataclasses.asdict(cfg)}  # fmt: skip
    storage.write_text(join(uri, REPORT_FILE), json.dumps(report, indent=2))
    total = steps * t.epochs
    fs, path = ray_storage(storage, cfg.run.storage_path)
    resume_from, initial = _resume_point(cfg, storage, fs)
    if initial < total:
        loop_config = {"cfg": cfg, "splits": splits, "task": task, "faults": fault_plan()}
        trainer = _trainer(cfg, fs, path, resume_from, initial, total, loop_config)
        init_ray()
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    else:
        print(f"{uri} already reached step {initial} of {total}; nothing to train")
    return _finish(cfg, storage, report, steps, started)


def _finish(cfg: FinetuneConfig, storage: Storage, report: dict, steps: int, started: float) -> dict:
    """Prune to the last K checkpoints + the best, and complete report.json."""
    uri = run_uri(cfg)
    best = json.loads(storage.read_text(join(uri, BEST_FILE)))
    prune_checkpoints(storage, uri, cfg.run.keep_checkpoints, protect=(best["step"],))
    best["checkpoint"] = best_checkpoint(storage, uri)
    storage.write_text(join(uri, BEST_FILE), json.dumps(best, indent=2))
    rows = [json.loads(line) for line in storage.read_text(join(uri, "metrics.jsonl")).splitlines() if line]
    at_best = next(r for r in rows if r["epoch"] == best["epoch"])
    report.update(
        best=best,
        test_at_best={k[5:]: v for k, v in at_best.items() if k.startswith("test/")},
        val_at_best={k[4:]: v for k, v in at_best.items() if k.startswith("val/")},
        epochs=len(rows), steps_per_epoch=steps, frozen_epochs=frozen_epochs(cfg),
        seconds=round(time.time() - started, 1),
    )  # fmt: skip
    storage.write_text(join(uri, REPORT_FILE), json.dumps(report, indent=2))
    print(f"finetune best epoch {best['epoch']}: {best['metric']} = {best['value']}; test {report['test_at_best']}")
    return report
