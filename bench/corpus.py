"""Corpus throughput on a real S3 server (SeaweedFS, started here), side by side in one run:

  1. raw read-and-decode: every GeoTIFF of the synthetic corpus fetched from the bucket (s3fs) and decoded
     with rasterio in a plain loop, one core -> samples/s, MB/s (the floor any build must pay);
  2. the build job (`build_corpus`, Ray Data) on a 1-CPU Ray cluster -> samples/s, MB/s; ratio build/raw
     (target >= 0.7 per core: validation, gridding onto 10 m, float16 shards and statistics cost little);
  3. the training stream (`training_dataset` + `iter_training_batches`: crops, token budget, two masks,
     normalisation, collation) with shuffle="local" and shuffle="full" -> samples/s;
  4. the nano model's training step (forward both views + backward + AdamW) on batches of that stream ->
     samples/s it consumes; ratio stream/nano (target >= 3).

    python bench/corpus.py [--samples 16] [--timesteps 12] [--batch 16] [--steps 4] [--build-only]
Build figures: `build` is end to end (listing, plan, Ray Data start-up, part tasks, statistics, manifest);
`build_in_task` is the work inside the part tasks alone (the steady state a long build approaches);
`build_fixed` is the end-to-end time the tasks do not explain (start-up and bookkeeping, paid once per run).
Prints `NAME: VALUE UNIT` lines and `ratio NAME: VALUE` lines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--timesteps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--samples-per-shard", type=int, default=4)
    ap.add_argument("--build-only", action="store_true", help="skip the stream and nano figures")
    ap.add_argument(
        "--cpus", type=int, default=1, help="logical CPUs of the Ray cluster for build and stream"
    )
    args = ap.parse_args()

    import numpy as np
    import ray

    from pipelines.build import BuildConfig, build_corpus
    from pipelines.raster import read_geotiff
    from pipelines.seaweed import SeaweedServer
    from pipelines.storage import Storage
    from pipelines.stream import StreamConfig, iter_training_batches, training_dataset
    from pipelines.synth import SynthConfig, write_corpus

    tmp = tempfile.mkdtemp(prefix="bench-corpus-")
    server = SeaweedServer(os.path.join(tmp, "weed")).start()
    os.environ.update(server.env())
    try:
        storage = Storage(server.endpoint)
        raw, out = "s3://bench-raw", "s3://bench-shards"
        storage.makedirs(raw)
        storage.makedirs(out)
        t = time.time()
        write_corpus(SynthConfig(num_samples=args.samples, seed=0, timesteps=args.timesteps), raw, storage)
        print(f"synth_write: {args.samples / (time.time() - t):.2f} samples/s")

        # 1. plain loop: fetch + decode every file
        fs = storage.fs(raw)
        files = [f for f in fs.find(raw) if f.endswith(".tif")]
        t, nbytes = time.time(), 0
        for f in files:
            data = fs.cat_file(f)
            nbytes += len(data)
            arr, _ = read_geotiff(data)
            arr.sum(dtype=np.float64)  # touch every value
        dt_raw = time.time() - t
        raw_sps, raw_mbs = args.samples / dt_raw, nbytes / dt_raw / 1e6
        print(f"raw_read_decode: {raw_sps:.2f} samples/s")
        print(f"raw_read_decode_bytes: {raw_mbs:.1f} MB/s")

        # 2. the build job on a Ray cluster of args.cpus CPUs
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        t = time.time()
        s = build_corpus(
            BuildConfig(raw_uri=raw, out_uri=out, s3_endpoint=server.endpoint,
                       samples_per_shard=args.samples_per_shard), storage
        )
        dt_build = time.time() - t
        build_sps, build_mbs = s["samples_written"] / dt_build, s["bytes_in"] / dt_build / 1e6
        print(f"build: {build_sps:.2f} samples/s")
        print(f"build_bytes: {build_mbs:.1f} MB/s")
        print(f"build_per_core: {build_sps / args.cpus:.2f} samples/s")
        print(f"ratio build_per_core/raw_read_decode: {build_sps / args.cpus / raw_sps:.2f}")
        # the work inside the part tasks alone (no Ray start-up, listing, statistics job or manifest)
        import json

        done = [json.loads(storage.read_text("s3://" + f)) for f in storage.fs(out).find(out + "/_done")]
        task_s = sum(d["seconds"] for d in done)
        print(f"build_in_task: {s['samples_written'] / task_s:.2f} samples/s")
        print(f"ratio build_in_task/raw_read_decode: {s['samples_written'] / task_s / raw_sps:.2f}")
        print(f"build_fixed: {max(dt_build - task_s / args.cpus, 0.0):.2f} s")
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
