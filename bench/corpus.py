"""Corpus throughput on a real S3 server (SeaweedFS, started here), side by side in one run:

  1. raw read-and-decode: every GeoTIFF of the synthetic corpus fetched from the bucket (s3fs) and decoded
     with rasterio in a plain loop, one core -> samples/s, MB/s (the floor any build must pay). Measured
     before AND after the build (load on a shared machine drifts); the figure used is their mean;
  2. the build job (`build_corpus`, Ray Data) on a fresh 1-CPU Ray cluster -> samples/s, MB/s; ratio
     build/raw per core (target >= 0.7);
  3. the training stream (`training_dataset` + `iter_training_batches`: crops, token budget, two masks,
     normalisation, collation) with shuffle="local" and shuffle="full" -> samples/s;
  4. the nano model's training step (forward both views + backward + AdamW) on batches of that stream ->
     samples/s it consumes; ratio stream/nano (target >= 3).

    python bench/corpus.py [--samples 64] [--timesteps 12] [--batch 16] [--steps 4] [--build-only]
Build figures: `build` is end to end (listing, plan, timestep routing, Ray Data start-up, part tasks,
statistics, manifest); `build_in_task` is the work inside the part tasks alone (the steady state a long build
approaches); `build_fixed` is the end-to-end time the tasks do not explain (paid once per run). The default
corpus (64 samples, 12 months, ~0.75 GB of GeoTIFFs) is big enough that the fixed part is a minor share.
CPU seconds per sample (this process for the plain loop, the worker process for the build, the S3 server
excluded from both) give a load-independent companion ratio.
Prints `NAME: VALUE UNIT` lines and `ratio NAME: VALUE` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--timesteps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--samples-per-shard", type=int, default=8)
    ap.add_argument("--build-only", action="store_true", help="skip the stream and nano figures")
    ap.add_argument(
        "--cpus", type=int, default=1, help="logical CPUs of the Ray cluster for build and stream"
    )
    args = ap.parse_args()

    import numpy as np
    import ray

    from pipelines.common.local_s3 import SeaweedServer
    from pipelines.common.storage import Storage
    from pipelines.corpus.build import BuildConfig, build_corpus
    from pipelines.corpus.synth import SynthConfig, write_corpus
    from pipelines.imagery.geotiff import read_geotiff
    from pipelines.pretrain.stream import StreamConfig, iter_training_batches, training_dataset

    tmp = tempfile.mkdtemp(prefix="bench-corpus-")
    server = SeaweedServer(os.path.join(tmp, "weed")).start()
    os.environ.update(server.env())
    try:
        storage = Storage(server.endpoint)
        raw, out = "s3://bench-raw", "s3://bench-shards"
        storage.makedirs(raw)
        storage.makedirs(out)
        # the corpus is written by Ray tasks on every core of a throw-away cluster; the build gets a fresh one
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        t = time.time()
        write_corpus(SynthConfig(num_samples=args.samples, seed=0, timesteps=args.timesteps,
                                 ray_tasks=os.cpu_count()), raw, storage)  # fmt: skip
        print(f"synth_write: {args.samples / (time.time() - t):.2f} samples/s")
        ray.shutdown()

        # 1. plain loop: fetch + decode every file
        fs = storage.fs(raw)
        files = [f for f in fs.find(raw) if f.endswith(".tif")]

        def plain_loop() -> tuple[float, float, int]:
            t, c, nbytes = time.time(), time.process_time(), 0
            for f in files:
                data = fs.cat_file(f)
                nbytes += len(data)
                arr, _ = read_geotiff(data)
                arr.sum(dtype=np.float64)  # touch every value
            return time.time() - t, time.process_time() - c, nbytes

        dt_before, cpu_before, nbytes = plain_loop()

        # 2. the build job on a fresh Ray cluster of args.cpus CPUs
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        t = time.time()
        s = build_corpus(
            BuildConfig(raw_uri=raw, out_uri=out,
                        samples_per_shard=args.samples_per_shard), storage
        )  # fmt: skip
        dt_build = time.time() - t
        assert s["samples_written"] + s["samples_rejected"] == args.samples, s
        done = [json.loads(storage.read_text("s3://" + f)) for f in storage.fs(out).find(out + "/_done")]
        task_s = sum(d["seconds"] for d in done)
        task_cpu = sum(d["cpu_seconds"] for d in done)

        dt_after, cpu_after, _ = plain_loop()
        dt_raw, cpu_raw = (dt_before + dt_after) / 2, (cpu_before + cpu_after) / 2
        raw_sps, raw_mbs = args.samples / dt_raw, nbytes / dt_raw / 1e6
        n = s["samples_written"]
        build_sps, build_mbs = n / dt_build, s["bytes_in"] / dt_build / 1e6
        steady_sps = n / task_s
        print(f"raw_read_decode_before: {args.samples / dt_before:.2f} samples/s")
        print(f"raw_read_decode_after: {args.samples / dt_after:.2f} samples/s")
        print(f"raw_read_decode: {raw_sps:.2f} samples/s")
        print(f"raw_read_decode_bytes: {raw_mbs:.1f} MB/s")
        print(f"build: {build_sps:.2f} samples/s")
        print(f"build_bytes: {build_mbs:.1f} MB/s")
        print(f"build_per_core: {build_sps / args.cpus:.2f} samples/s")
        print(f"build_in_task: {steady_sps:.2f} samples/s")
        print(f"build_fixed: {max(dt_build - task_s / args.cpus, 0.0):.2f} s")
        print(f"shard_bytes: {s['bytes_out'] / n / 1e6:.2f} MB/sample")
        print(f"raw_cpu: {cpu_raw / args.samples * 1e3:.0f} ms/sample")
        print(f"build_cpu: {task_cpu / n * 1e3:.0f} ms/sample")
        print(f"ratio build_per_core/raw_read_decode: {build_sps / args.cpus / raw_sps:.2f}")
        print(f"ratio build_in_task/raw_read_decode: {steady_sps / raw_sps:.2f}")
        print(f"ratio raw_cpu/build_cpu: {cpu_raw / args.samples / (task_cpu / n):.2f}")
        if args.build_only:
            return

        # 3. the training stream
        rates = {}
        warm = StreamConfig(shards_uri=out, batch_size=args.batch)
        for _ in iter_training_batches(training_dataset(warm, storage, epoch=99), warm):
            pass  # start Ray Data's workers before timing
        for mode in ("local", "full"):
            cfg = StreamConfig(
                shards_uri=out, batch_size=args.batch, local_shuffle_buffer=4 * args.batch, shuffle=mode
            )
            t, n = time.time(), 0
            batches = []
            for b in iter_training_batches(training_dataset(cfg, storage, epoch=0), cfg):
                n += b["months"].shape[0]
                if len(batches) < args.steps:
                    batches.append(b)
            rates[mode] = n / (time.time() - t)
            print(f"stream_{mode}: {rates[mode]:.2f} samples/s")
        print(f"ratio stream_full/stream_local: {rates['full'] / rates['local']:.2f}")

        # 4. the nano training step on those batches
        import torch

        from olmoearth import build_model

        model = build_model("nano")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times, samples = [], 0
        for i, b in enumerate(batches):
            t = time.time()
            loss = model(b)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i > 0 or len(batches) == 1:  # the first step warms up
                times.append(time.time() - t)
                samples += b["months"].shape[0]
        nano = samples / sum(times)
        print(f"nano_train_step: {nano:.2f} samples/s")
        print(f"ratio stream_local/nano_train_step: {rates['local'] / nano:.2f}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
