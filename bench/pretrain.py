"""Pretraining throughput, side by side in one run, on a synthetic corpus in local files:

1. this job (`pipelines.pretrain.job.fit`: Ray Train + DeepSpeed ZeRO-2, the Ray Data stream), 1 worker
   -> tokens/s per worker;
2. a plain single-process PyTorch loop over the same model, the same batches in the same order, the same
   AdamW groups, schedule and clipping, fed by a torch DataLoader (1 worker process) that runs the same
   batch-making code as the stream (`pipelines.pretrain.stream.window_batches`: read, crop, mask, normalise,
   collate) -> tokens/s. This is the target's baseline: what the job adds over plain PyTorch is Ray Train,
   DeepSpeed and Ray Data, not the batch-making work, which any loop has to do somewhere. On a 2-core machine
   that work, on the other core, slows the training thread somewhat (shared core resources), in both loops;
3. the same plain loop over the batches read into memory beforehand (no data work at all while training):
   the upper bound, reported beside it;
   both plain loops run before, between and after the jobs and the mean of the three counts is taken (the
   machine may be shared); a second figure pairs each logging interval of the job with the same steps of
   the DataLoader loops (median of the three) and takes the median ratio over intervals, which bursts of
   other load move less;
4. this job with 2 workers, global batch 2 x micro batch, over the same epoch (half the steps) -> tokens/s
   in total;
5. two in-memory plain loops at once in two processes, each over every other batch: the most 2 workers could
   get on this machine without any framework, stream or communication (what bounds the scaling);
6. DeepSpeed's own share, without Ray: its engine (the job's DeepSpeed config) and the plain loop in one
   process, alternating step by step over the in-memory batches.

Every training process uses one torch thread, so "per worker" compares like with like. Steady state: the
first logging interval (start-up: worker group, DeepSpeed, the stream's first batches) is left out of
every rate, and the same steps are left out of the plain loop; the start-up is printed separately, split
into its parts. The cores the whole machine kept busy during each part are printed too (`*_busy_cores`,
from /proc/stat): a part that used more than its own share ran beside other load. The corpus holds one
epoch of `--steps` batches, so no epoch restart falls inside the measurement. DeepSpeed's per-step
bookkeeping (gradient hooks, flattening, the global norm) is a fixed cost per parameter tensor whatever the
batch, so the ratio depends on the step's size: the default micro batch of 8 samples is the CPU config's 4
doubled, still far below the original's 32 per GPU; `--micro_batch 4` measures the smaller step.

    DS_ACCELERATOR=cpu python bench/pretrain.py [--steps 80] [--log_every 5] [--micro_batch 8] [--size nano]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402 - after the environment above


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, all cores, from /proc/stat (Linux)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


class BusyCores:
    """Cores the whole machine kept busy while inside `with` blocks (every process, not only ours): a run
    that used more than its own share shows other load, which moves any single-run figure."""

    def __init__(self):
        self.busy = self.total = 0

    def __enter__(self):
        self.start = cpu_jiffies()

    def __exit__(self, *exc):
        busy, total = cpu_jiffies()
        self.busy += busy - self.start[0]
        self.total += total - self.start[1]

    @property
    def cores(self) -> float:
        return self.busy / max(self.total, 1) * (os.cpu_count() or 1)


def run_job(cfg, storage) -> dict:
    """Run the job; its steady-state rates from the metrics rows it logged (first interval left out)."""
    from pipelines.pretrain.config import run_uri
    from pipelines.pretrain.job import fit

    busy = BusyCores()
    started = time.time()
    with busy:
        fit(cfg)
    wall = time.time() - started
    rows = [json.loads(line) for line in storage.read_text(run_uri(cfg) + "/metrics.jsonl").splitlines()]
    if len(rows) < 2:
        raise SystemExit(f"{cfg.run.name}: {len(rows)} metrics rows; raise --steps or lower --log_every")
    steady = rows[1:]
    seconds = sum(r["interval_s"] for r in steady)
    tokens = sum(r["tokens_per_s"] * r["interval_s"] for r in steady)
    steps = steady[-1]["step"] - rows[0]["step"]
    step_s = seconds / steps
    workers = cfg.scaling.num_workers
    return {
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_worker": tokens / seconds / workers,
        "step_s": step_s,
        # fit() called -> first step done: first row's end less its steps at the steady rate
        "startup_s": rows[0]["time"] - started - rows[0]["step"] * step_s,
        "wall_s": wall,
        "data_wait_frac": sum(r["data_wait_frac"] * r["interval_s"] for r in steady) / seconds,
        "report_frac": sum(r.get("report_frac", 0.0) * r["interval_s"] for r in steady) / seconds,
        "mfu": sum(r["mfu"] * r["interval_s"] for r in steady) / seconds,
        "interval_rates": [r["tokens_per_s_per_worker"] for r in steady],
        "startup_parts": {k[len("startup_"):]: v for k, v in rows[0].items() if k.startswith("startup_")},
        "busy_cores": busy.cores,
    }


class StreamWindows(torch.utils.data.IterableDataset):
    """The epoch's batches for a torch DataLoader: each window of the epoch plan through the stream's own
    `window_batches` (`pipelines.pretrain.stream.epoch_windows`), in the job's order; yields the pickled batches, as
    the Ray Data stream's rows hold them (the loop unpickles and converts them as the job does)."""

    def __init__(self, data_cfg, storage, epoch: int = 0):
        from pipelines.pretrain.stream import epoch_windows

        super().__init__()
        self.items, self.fn = epoch_windows(data_cfg, storage, epoch)

    def __iter__(self):
        torch.set_num_threads(1)
        for item in self.items:
            for row in self.fn(item):
                yield row["batch"]


def dataloader_batches(windows: StreamWindows, steps: int):
    """layout.py batches from a DataLoader with one worker process running the stream's batch-making code
    (spawned: this process runs Ray, which must not be forked)."""
    import pickle

    from pipelines.pretrain.stream import to_torch

    loader = torch.utils.data.DataLoader(windows, batch_size=None, num_workers=1, prefetch_factor=4,
                                         multiprocessing_context="spawn")  # fmt: skip
    for i, raw in enumerate(loader):
        if i == steps:
            break
        yield to_torch(pickle.loads(raw))


def plain_step_fn(cfg):
    """One optimiser step of the plain PyTorch loop: the job's model, AdamW groups, schedule and clipping."""
    from olmoearth import build_model
    from pipelines.pretrain.engine import lr_factor_fn

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.size)
    o = cfg.optim
    groups = model.param_groups(o.weight_decay, exempt_norms_and_biases=o.exempt_norms_and_biases)  # as the job
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor_fn(o, cfg.train.max_steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step(batch: dict) -> None:
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip)
        opt.step()
        sched.step()

    return step


def deepspeed_step_fn(cfg):
    """One optimiser step of a DeepSpeed engine built as the job's workers build it (`build_engine`, same
    config), in this process, without Ray."""
    from olmoearth import build_model
    from pipelines.pretrain.worker import build_engine

    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg.model.size), 1, 1, False, "fp32")

    def step(batch: dict) -> None:
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()

    return step


def batch_tokens(batch: dict) -> int:
    from olmoearth.layout import MISSING

    return sum(int((m != MISSING).sum()) for m in batch["mask_a"].values())


def plain_loop(cfg, batches, interval: int, start_at: float = 0.0) -> list[tuple[int, float]]:
    """A single-process loop over the same model, batches and optimiser: (tokens, seconds) of each interval
    of `interval` steps, the first (warm-up) interval left out as in the job's figures. batches: a list in
    memory or a generator (the DataLoader). start_at: wall-clock time to start stepping at (so that
    concurrent copies overlap)."""
    torch.set_num_threads(1)
    step_fn = plain_step_fn(cfg)
    time.sleep(max(0.0, start_at - time.time()))
    intervals, tokens, started = [], 0, time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        step_fn(batch)
        tokens += batch_tokens(batch)
        if step % interval == 0:
            intervals.append((tokens, time.perf_counter() - started))
            tokens, started = 0, time.perf_counter()
    return intervals[1:]


def deepspeed_vs_plain(cfg, batches: list[dict], warmup: int) -> tuple[float, float]:
    """Seconds of the plain step and of the in-process DeepSpeed step over the same batches, the two
    alternating step by step (so that load on the machine hits both alike), warm-up steps left out. Runs
    in its own process: DeepSpeed's process group must not live in the bench's driver."""
    import socket

    import deepspeed

    from pipelines.pretrain.engine import use_own_torch_extensions_dir

    use_own_torch_extensions_dir()  # init_distributed may compile DeepSpeed's op before build_engine would set it
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    fns = {"plain": plain_step_fn(cfg), "deepspeed": deepspeed_step_fn(cfg)}
    seconds = {name: 0.0 for name in fns}
    for i, batch in enumerate(batches):
        for name, step_fn in fns.items():
            started = time.perf_counter()
            step_fn(batch)
            if i >= warmup:
                seconds[name] += time.perf_counter() - started
    return seconds["plain"], seconds["deepspeed"]


def in_subprocess(fn, *args):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def rate(intervals: list[tuple[int, float]]) -> float:
    return sum(t for t, _ in intervals) / sum(s for _, s in intervals)


def plain_loops_in_parallel(cfg, batches: list[dict], interval: int) -> float:
    """Total tokens/s of two plain loops running at once in two processes, each over every other batch
    (as 2 workers split them), no communication: what this machine allows for 2 workers."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    start_at = time.time() + 15  # after both processes have imported torch and built their model
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        runs = [pool.submit(plain_loop, cfg, batches[i::2], interval, start_at) for i in range(2)]
        return sum(rate(r.result()) for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80, help="steps of the 1-worker run (the 2-worker run: half)")
    ap.add_argument("--log_every", type=int, default=5)
    ap.add_argument("--size", default="nano")
    ap.add_argument("--micro_batch", type=int, default=8, help="samples per worker per step")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic corpus and runs (a temp folder)")
    ap.add_argument("--shards", default="", help="an already built corpus to use (else one is synthesised)")
    args = ap.parse_args()
    if args.steps % (2 * args.log_every) or args.steps < 4 * args.log_every:
        raise SystemExit("--steps must be a multiple of 2 x --log_every and at least 4 x --log_every")

    import numpy as np
    import ray

    from pipelines.common.config import from_dict
    from pipelines.common.ray_start import init_ray
    from pipelines.common.storage import Storage
    from pipelines.corpus.build import BuildConfig, build_corpus
    from pipelines.corpus.synth import SynthConfig, write_corpus
    from pipelines.pretrain.config import PretrainConfig
    from pipelines.pretrain.stream import iter_training_batches, num_batches, training_dataset

    torch.set_num_threads(1)
    load_at_start = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="bench_pretrain_")
    storage = Storage()
    init_ray(num_cpus=8, address="local", log_to_driver=False)
    try:
        shards = args.shards or f"{tmp}/shards"
        if not args.shards:
            cells = math.ceil(args.steps * args.micro_batch / 4)  # 4 training samples per 256 x 256 cell
            write_corpus(SynthConfig(num_samples=cells, seed=0, timesteps=3), f"{tmp}/raw", storage)
            build_corpus(BuildConfig(raw_uri=f"{tmp}/raw", out_uri=shards, samples_per_shard=4), storage)
        base = {
            "model": {"size": args.size},
            "data": {"shards_uri": shards, "batch_size": args.micro_batch, "min_patch_size": 4,
                     "max_patch_size": 4, "max_tokens_per_side": 4, "token_budget": 400,
                     "local_shuffle_buffer": 64},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "train": {"max_steps": args.steps, "global_batch_size": args.micro_batch, "zero_stage": 2,
                      "precision": "fp32", "log_every": args.log_every, "checkpoint_every": 10**6,
                      "keep_checkpoints": 1},
            "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1, "threads_per_worker": 1},
            "run": {"name": "w1", "storage_path": f"{tmp}/runs", "resume": False},
        }  # fmt: skip
        cfg1 = from_dict(PretrainConfig, base)
        if num_batches(cfg1.data, storage) < args.steps:
            raise SystemExit(f"the corpus has fewer than {args.steps} batches")
        # the batches the 1-worker job trains on, in its order (epoch 0, index order)
        started = time.perf_counter()
        batches = []
        for batch in iter_training_batches(training_dataset(cfg1.data, storage, epoch=0), cfg1.data):
            batches.append(batch)
            if len(batches) == args.steps:
                break
        read_s = time.perf_counter() - started

        windows = StreamWindows(cfg1.data, storage)

        def plain_pair() -> None:  # the DataLoader loop and the in-memory loop, one after the other
            with loader_busy:
                loader_runs.append(plain_loop(cfg1, dataloader_batches(windows, args.steps), args.log_every))
            with memory_busy:
                memory_runs.append(plain_loop(cfg1, batches, args.log_every))

        loader_busy, memory_busy = BusyCores(), BusyCores()

        # the plain loops run before, between and after the jobs: the machine may be shared
        loader_runs, memory_runs = [], []
        plain_pair()
        job1 = run_job(cfg1, storage)
        plain_pair()
        cfg2 = from_dict(PretrainConfig, base)
        cfg2.train.max_steps = args.steps // 2
        cfg2.train.global_batch_size = 2 * args.micro_batch
        cfg2.scaling.num_workers = 2
        cfg2.run.name = "w2"
        job2 = run_job(cfg2, storage)
        plain_pair()
        plain2 = plain_loops_in_parallel(cfg1, batches, args.log_every)
        ds_plain_s, ds_s = in_subprocess(deepspeed_vs_plain, cfg1, batches, args.log_every)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    loader_rates = [rate(run) for run in loader_runs]
    memory_rates = [rate(run) for run in memory_runs]
    plain, plain_memory = float(np.mean(loader_rates)), float(np.mean(memory_rates))
    # paired by interval (the 1-worker job and the plain loop train the same batches in each interval):
    # job rate / the DataLoader loops' median rate, median over intervals; robust to bursts of other load
    paired = [job / np.median([run[i][0] / run[i][1] for run in loader_runs])
              for i, job in enumerate(job1["interval_rates"])]  # fmt: skip

    print(f"cpu_cores: {os.cpu_count()} cores")
    print(f"load_average_1min: {load_at_start:.2f} processes at start, {os.getloadavg()[0]:.2f} at the end")
    print(f"stream_read_in_driver: {read_s / args.steps * 1000:.1f} ms/batch (Ray Data start-up included)")
    runs = ", ".join(f"{r:.1f}" for r in loader_rates)
    print(f"plain_pytorch_tokens_per_s: {plain:.1f} tokens/s (DataLoader, mean of 3 runs: {runs})")
    runs = ", ".join(f"{r:.1f}" for r in memory_rates)
    print(f"plain_pytorch_busy_cores: {loader_busy.cores:.2f} cores (DataLoader loops), "
          f"{memory_busy.cores:.2f} cores (in-memory loops), of {os.cpu_count()}: the whole machine")
    print(f"plain_pytorch_in_memory_tokens_per_s: {plain_memory:.1f} tokens/s (batches in memory, mean of 3 runs: {runs})")
    for name, job in (("job_1worker", job1), ("job_2workers", job2)):
        print(f"{name}_tokens_per_s: {job['tokens_per_s']:.1f} tokens/s")
        print(f"{name}_tokens_per_s_per_worker: {job['tokens_per_s_per_worker']:.1f} tokens/s")
        print(f"{name}_step_time: {job['step_s'] * 1000:.1f} ms")
        print(f"{name}_data_wait: {job['data_wait_frac'] * 100:.1f} %")
        print(f"{name}_report_wait: {job['report_frac'] * 100:.1f} % (in ray.train.report)")
        print(f"{name}_mfu: {job['mfu'] * 100:.2f} % (of a measured 1-thread fp32 matmul peak)")
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in job["startup_parts"].items())
        print(f"{name}_startup: {job['startup_s']:.1f} s ({parts})")
        print(f"{name}_fit_wall: {job['wall_s']:.1f} s")
        print(f"{name}_busy_cores: {job['busy_cores']:.2f} cores (whole machine, fit() start to end)")
        rates = job["interval_rates"]
        print(f"{name}_slowest_interval: {min(rates):.1f} tokens/s per worker (fastest {max(rates):.1f})")
    print(f"plain_pytorch_2_processes_tokens_per_s: {plain2:.1f} tokens/s (two independent loops at once)")
    print(f"ratio job_vs_plain_per_worker: {job1['tokens_per_s_per_worker'] / plain:.3f}")
    print(f"ratio job_vs_plain_per_worker_paired_median: {np.median(paired):.3f}")
    print(f"ratio job_vs_plain_in_memory_per_worker: {job1['tokens_per_s_per_worker'] / plain_memory:.3f}")
    print(f"ratio plain_dataloader_vs_plain_in_memory: {plain / plain_memory:.3f}")
    # DeepSpeed's own cost, without Ray: its engine and the plain loop in one process, alternating steps
    print(f"deepspeed_in_process_step_time: {ds_s / (args.steps - args.log_every) * 1000:.1f} ms "
          f"(plain step {ds_plain_s / (args.steps - args.log_every) * 1000:.1f} ms, same batches, alternating)")
    print(f"ratio deepspeed_in_process_vs_plain_paired: {ds_plain_s / ds_s:.3f}")
    print(f"ratio scaling_efficiency_2_workers: {job2['tokens_per_s'] / (2 * job1['tokens_per_s']):.3f}")
    # the same ratio for independent processes: the bound this machine (cores, memory bandwidth, other
    # tenants) sets on 2 workers, with no framework, data stream or communication at all
    print(f"ratio machine_scaling_2_processes: {plain2 / (2 * plain_memory):.3f}")
    print(f"ratio job_2workers_vs_2_plain_processes: {job2['tokens_per_s'] / plain2:.3f}")


if __name__ == "__main__":
    main()
