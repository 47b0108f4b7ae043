"""Pretraining throughput, side by side in one run, on a small synthetic corpus (local files):

1. this job (Ray Train + DeepSpeed ZeRO-2, the Ray Data stream), 1 worker      -> tokens/s per worker
2. a plain single-process PyTorch loop: same model, same batches (pre-read into memory), same AdamW
   groups, schedule and clipping                                               -> tokens/s
3. this job with 2 workers                                                     -> tokens/s in total
Every process uses one torch thread, so "per worker" compares like with like.

    DS_ACCELERATOR=cpu python bench/pretrain.py [--steps 40] [--size nano]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def job_throughput(cfg, storage, key: str) -> float:
    """Mean of a metric over the run's logged rows, leaving out the first (start-up) interval."""
    from pipelines.train import fit, run_uri

    fit(cfg)
    rows = [json.loads(line) for line in storage.read_text(run_uri(cfg) + "/metrics.jsonl").splitlines()]
    rows = rows[1:] or rows
    tokens = sum(r[key] * r["interval_s"] for r in rows)
    return tokens / sum(r["interval_s"] for r in rows)


def plain_loop(cfg, batches: list[dict], steps: int) -> float:
    """tokens/s of a single-process loop over the same model, batches and optimiser."""
    import torch

    from olmoearth import build_model
    from olmoearth.layout import MISSING
    from pipelines.deepspeed_config import lr_factor_fn

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.size)
    o = cfg.optim
    opt = torch.optim.AdamW(model.param_groups(o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor_fn(o, cfg.train.max_steps))
    model.train()
    warmup = max(1, steps // 5)
    tokens, start = 0, None
    for step in range(steps):
        if step == warmup:
            tokens, start = 0, time.perf_counter()
        batch = batches[step % len(batches)]
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        tokens += sum(int((m != MISSING).sum()) for m in batch["mask_a"].values())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--size", default="nano")
    ap.add_argument("--samples", type=int, default=8, help="256x256 cells in the synthetic corpus")
    args = ap.parse_args()

    import ray
    import torch

    from olmoearth.config import from_dict
    from pipelines.build import BuildConfig, build_corpus
    from pipelines.storage import Storage
    from pipelines.stream import iter_training_batches, training_dataset
    from pipelines.synth import SynthConfig, write_corpus
    from pipelines.train import PretrainConfig

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench_pretrain_")
    storage = Storage()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        write_corpus(SynthConfig(num_samples=args.samples, seed=0, timesteps=3), f"{tmp}/raw", storage)
        build_corpus(BuildConfig(raw_uri=f"{tmp}/raw", out_uri=f"{tmp}/shards", samples_per_shard=4), storage)
        base = {
            "model": {"size": args.size},
            "data": {"shards_uri": f"{tmp}/shards", "batch_size": 4, "min_patch_size": 4, "max_patch_size": 4,
                     "max_tokens_per_side": 4, "token_budget": 400, "local_shuffle_buffer": 64},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "train": {"max_steps": args.steps, "global_batch_size": 4, "zero_stage": 2, "precision": "fp32",
                      "log_every": max(1, args.steps // 5), "checkpoint_every": 10**6, "keep_checkpoints": 1},
            "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1, "threads_per_worker": 1},
            "run": {"name": "w1", "storage_path": f"{tmp}/runs", "resume": False},
        }  # fmt: skip
        cfg1 = from_dict(PretrainConfig, base)
        job1 = job_throughput(cfg1, storage, "tokens_per_s_per_worker")

        cfg2 = from_dict(PretrainConfig, base)
        cfg2.train.global_batch_size = 8
        cfg2.scaling.num_workers = 2
        cfg2.run.name = "w2"
        job2 = job_throughput(cfg2, storage, "tokens_per_s")

        ds = training_dataset(cfg1.data, storage, epoch=0)
        batches = list(iter_training_batches(ds, cfg1.data))
        plain = plain_loop(cfg1, batches, args.steps)
    finally:
        ray.shutdown()

    print(f"job_1worker_tokens_per_s: {job1:.1f} tokens/s")
    print(f"plain_pytorch_tokens_per_s: {plain:.1f} tokens/s")
    print(f"job_2workers_tokens_per_s: {job2:.1f} tokens/s")
    print(f"ratio job_vs_plain_per_worker: {job1 / plain:.3f}")
    print(f"ratio scaling_efficiency_2_workers: {job2 / (2 * job1):.3f}")


if __name__ == "__main__":
    main()
