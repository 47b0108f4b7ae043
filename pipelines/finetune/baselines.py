"""What a fine-tuned model is compared with, on the same rows and the same held-out split:

- the frozen linear probe of the same encoder (the evaluation stage's probes, pipelines/evaluation/score.py:
  logistic regression on pooled embeddings for classification, the per-patch linear layer for segmentation,
  hyper-parameters chosen on the val split, scored on test);
- a plain PyTorch loop over the same model, head, batches and schedule (no Ray, no DeepSpeed), the
  reference of the job's throughput in bench/finetune.py.

    frozen_probe(reader, splits, task, encoder) -> {"metric": "miou", "value": 0.41, "split": "test", ...}
    plain_finetune(cfg, reader, splits, task, model, epochs) -> (model, {"samples_per_s": ..., ...})"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipelines.finetune.batches import d4, epoch_rng, epoch_rows, steps_per_epoch
from pipelines.finetune.config import FinetuneConfig


def frozen_probe(reader, splits: dict[str, list[dict]], task, encoder, seed: int = 0, batch_size: int = 32) -> dict:
    """The frozen linear probe's score of `encoder` on the test split (the record of score_task)."""
    from pipelines.evaluation.extract import Features, embed_in_process
    from pipelines.evaluation.score import score_task
    from pipelines.evaluation.task import TaskInfo
    from pipelines.finetune.data import load_batch

    rows = [r for s in ("train", "val", "test") for r in splits[s]]
    chips, labels = [], []
    for i in range(0, len(rows), batch_size):
        x, months, y = load_batch(reader, rows[i : i + batch_size])
        chips += [({m: v[j] for m, v in x.items()}, months[j]) for j in range(len(y))]
        labels.append(y)
    feats = embed_in_process(chips, {"frozen": encoder.eval()}, patch_size=task.patch_size, pooling="mean",
                             dense=task.per_pixel, batch_size=batch_size)  # fmt: skip
    f = Features([r["id"] for r in rows], np.array([s for s in ("train", "val", "test") for _ in splits[s]]),
                 np.concatenate(labels), feats)  # fmt: skip
    info = TaskInfo("finetune", task.kind, list(task.class_names))
    records = score_task(info, f, probes=("linear",), seed=seed)
    main = {"classification": "accuracy", "multilabel": "map", "segmentation": "miou"}[task.kind]
    return next(r for r in records if r["metric"] == main)


def plain_finetune(cfg: FinetuneConfig, reader, splits: dict[str, list[dict]], model, epochs: int | None = None,
                   threads: int = 0) -> tuple[torch.nn.Module, dict]:
    """The job's training steps as a plain single-process loop: the same rows of each epoch (rank 0 of a
    world of 1), the same D4 draws, the schedule, AdamW with the same groups and clipping, the head's
    statistics recomputed after each epoch. Returns the model (in eval mode) and {"samples_per_s",
    "epoch_samples_per_s", "train_s", "steps"} (training time only, as the job's rows)."""
    from olmoearth.finetuned import task_loss
    from pipelines.finetune.data import load_batch
    from pipelines.finetune.loop import recalibrate_head_norms
    from pipelines.finetune.schedule import apply_schedule, is_frozen, param_groups

    t = cfg.train
    if threads:
        torch.set_num_threads(threads)
    metas = param_groups(model, cfg)
    opt = torch.optim.AdamW([{"params": m["params"], "lr": m["lr"], "weight_decay": m["weight_decay"]}
                             for m in metas])  # fmt: skip
    steps = steps_per_epoch(len(splits["train"]), t.batch_size, 1)
    weights = torch.tensor(t.class_weights) if t.class_weights else None
    step, train_s, rates = 0, 0.0, []
    for epoch in range(epochs or t.epochs):
        rows = epoch_rows(splits["train"], t.seed, epoch, t.batch_size, 0, 1)
        rng = epoch_rng(t.seed, epoch, 0)
        for p in model.backbone_parameters():
            p.requires_grad_(not is_frozen(cfg, epoch))
        model.train_for(is_frozen(cfg, epoch))
        started = time.perf_counter()
        for b in range(steps):
            x, months, labels = load_batch(reader, rows[b * t.batch_size : (b + 1) * t.batch_size])
            if t.augment:
                x, labels = d4(x, labels, model.task.per_pixel, rng)
            apply_schedule(opt.param_groups, metas, cfg, epoch, step, steps, 1.0)
            loss = task_loss(model.task, model(x, torch.as_tensor(months)), torch.as_tensor(labels), weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            step += 1
        took = time.perf_counter() - started
        train_s += took
        rates.append(steps * t.batch_size / max(took, 1e-9))
        # as the job's workers before they evaluate (not timed either)
        recalibrate_head_norms(model, model, input_batches(reader, rows[: t.recalibrate_rows], t.eval_batch_size))
    for p in model.parameters():
        p.requires_grad_(True)
    return model, {"samples_per_s": step * t.batch_size / max(train_s, 1e-9), "epoch_samples_per_s": rates,
                   "train_s": train_s, "steps": step}


def input_batches(reader, rows: list[dict], batch_size: int):
    """(x, months tensor) of `rows`, batch_size at a time."""
    from pipelines.finetune.data import load_batch

    for i in range(0, len(rows), batch_size):
        x, months, _ = load_batch(reader, rows[i : i + batch_size])
        yield x, torch.as_tensor(months)


@torch.no_grad()
def scores_on(model, reader, rows: list[dict], batch_size: int = 32) -> dict[str, float]:
    """The scores (pipelines/finetune/metrics.py) of `model` on `rows`, in one process."""
    from olmoearth.finetuned import task_loss
    from pipelines.finetune.data import load_batch
    from pipelines.finetune.metrics import ScoreAccumulator, local_gather, local_reduce

    model.eval()
    acc = ScoreAccumulator(model.task.kind, model.task.num_outputs)
    for i in range(0, len(rows), batch_size):
        x, months, labels = load_batch(reader, rows[i : i + batch_size])
        out = model(x, torch.as_tensor(months))
        acc.add(out, labels, float(task_loss(model.task, out, torch.as_tensor(labels))))
    return acc.scores(local_reduce, local_gather)
