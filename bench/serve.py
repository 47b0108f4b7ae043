"""Serving benchmark, side by side in one run:

1. large-area job (Ray Data actor pool, corpus in SeaweedFS) vs the bare encoder forward over the same tiles
   in this process (pixels already in memory): km² per second, and their ratio (target >= 0.8);
2. the Serve endpoint under 16 concurrent clients: requests/s, p50 / p99 latency, errors (target 0), and
   the mean number of requests that shared a forward.

    python bench/serve.py [--cells 2] [--tile 128] [--patch 8] [--requests 20] [--model random:nano]
Prints `NAME: VALUE UNIT` and `ratio NAME: VALUE` lines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TQDM_DISABLE", "1")


def make_corpus(storage, root: str, cells: int, start: str) -> dict:
    """cells x cells contiguous synthetic corpus cells, all starting on `start`."""
    from pipelines import raw_layout as rl
    from pipelines.synth import SynthConfig, write_corpus

    summary = write_corpus(SynthConfig(num_samples=cells * cells, seed=5, labelled=True, missing_timestep_rate=0.0,
                                       missing_modality_rate=0.0, cloud_rate=0.0), root, storage)  # fmt: skip
    s0 = dt.date.fromisoformat(start)
    for name in ("sentinel2_l2a", "sentinel1", "landsat"):
        uri = rl.csv_uri(root, name)
        table = rl.parse_timesteps_csv(storage.read_text(uri))
        rows = [(sid, i, s + (s0 - p[0][1]), e + (s0 - p[0][1])) for sid, p in table.items() for i, s, e in p]
        storage.write_text(uri, rl.write_timesteps_csv(rows))
    ids = [rl.parse_sample_id(s) for s in summary["sample_ids"]]
    col0, row0 = min(c for _, c, _ in ids), min(r for _, _, r in ids)
    left, top = col0 * 2560.0, -row0 * 2560.0
    return {"bbox": [left, top - cells * 2560.0, left + cells * 2560.0, top]}


def bench_area(args, storage, endpoint: str) -> None:
    from serve.embed_area import EmbedAreaConfig, embed_area, make_source, plan
    from serve.model import Embedder

    bucket = f"s3://bench-{uuid.uuid4().hex[:8]}"
    t0 = ("2021-06-01", "2021-06-30")
    info = make_corpus(storage, bucket + "/raw", args.cells, t0[0])
    cfg = EmbedAreaConfig(bbox=info["bbox"], bbox_crs="EPSG:32618", crs="EPSG:32618", source=bucket + "/raw",
                          time_start=t0[0], time_end=t0[1], model_uri=args.model, patch_size=args.patch,
                          tile_size=args.tile, overlap=args.overlap, num_actors=1, batch_size=args.batch,
                          out=bucket + "/emb", formats=["cog"], preview=False, s3_endpoint=endpoint,
                          torch_threads=args.threads, num_cpus_per_actor=1.0)  # fmt: skip
    report = embed_area(cfg)
    assert not report["failed"], report["failed"]
    area = report["area_km2"]
    # the bare forward over the same tiles, pixels already in memory, in this process
    grid, tiles = plan(cfg)
    source = make_source(cfg, storage)
    xs = [source.read(t, grid) for t in tiles]
    embedder = Embedder(args.model, num_threads=args.threads)
    months = np.tile(source.months, (args.batch, 1))
    embedder.embed({m: np.stack([x[m] for x in xs[: args.batch]]) for m in xs[0]}, months, args.patch)  # warm-up
    t = time.perf_counter()
    for i in range(0, len(xs), args.batch):
        chunk = xs[i : i + args.batch]
        embedder.embed({m: np.stack([x[m] for x in chunk]) for m in chunk[0]}, months[: len(chunk)], args.patch)
    bare = time.perf_counter() - t
    job_enc, job_total = report["seconds"]["encode"], report["seconds"]["total"]
    print(f"area_km2: {area:.2f} km2")
    print(f"area_tiles: {len(tiles)} tiles")
    print(f"area_job_encode_throughput: {area / job_enc:.3f} km2/s")
    print(f"area_job_total_throughput: {area / job_total:.3f} km2/s")
    print(f"bare_encoder_throughput: {area / bare:.3f} km2/s")
    steady = report["km2_per_s_steady"]
    if steady:
        print(f"area_job_steady_throughput: {steady:.3f} km2/s")
        print(f"ratio area_job_steady_vs_bare_forward: {steady / (area / bare):.3f}")
    print(f"ratio area_job_vs_bare_forward: {bare / job_enc:.3f}")
    print(f"ratio area_job_total_vs_bare_forward: {bare / job_total:.3f}")


def bench_endpoint(args) -> None:
    import requests
    from ray import serve

    from pipelines.seaweed import free_port
    from serve.app import ServeConfig, run

    cfg = ServeConfig(model_uri=args.model, port=free_port(), min_replicas=1, max_replicas=1, max_batch_size=16,
                      max_ongoing_requests=32, batch_wait_timeout_s=0.01, num_cpus=1.0,
                      torch_threads=args.threads)  # fmt: skip
    run(cfg)
    url = f"http://127.0.0.1:{cfg.port}/embed"
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(16):
        buf = io.BytesIO()
        np.savez(buf, sentinel2_l2a=(rng.random((1, 32, 32, 2, 12)) * 3000).astype(np.float32), months=np.array([5, 6]))
        bodies.append(buf.getvalue())

    def client(i: int):
        lat, errors, sizes = [], 0, []
        with requests.Session() as s:
            for _ in range(args.requests):
                t = time.perf_counter()
                r = s.post(url, params={"patch_size": 4}, data=bodies[i],
                           headers={"Content-Type": "application/x-npz"}, timeout=300)  # fmt: skip
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors += 1
                else:
                    sizes.append(int(r.headers["x-batch-size"]))
        return lat, errors, sizes

    client(0)  # warm-up
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    wall = time.perf_counter() - t
    lat = np.concatenate([r[0] for r in results]) * 1000
    errors = sum(r[1] for r in results)
    sizes = [s for r in results for s in r[2]]
    print("endpoint_clients: 16 clients")
    print(f"endpoint_requests: {len(lat)} requests")
    print(f"endpoint_requests_per_s: {len(lat) / wall:.2f} req/s")
    print(f"endpoint_latency_p50: {np.percentile(lat, 50):.1f} ms")
    print(f"endpoint_latency_p99: {np.percentile(lat, 99):.1f} ms")
    print(f"endpoint_errors: {errors} requests")
    print(f"endpoint_mean_batch: {np.mean(sizes) if sizes else 0:.2f} requests/forward")
    serve.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=2, help="area of cells x cells corpus cells (2560 m each)")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--model", default="random:nano")
    args = ap.parse_args()

    import ray

    from pipelines.seaweed import SeaweedServer
    from pipelines.storage import Storage

    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(os.path.join(tmp, "weed")) as s3:
        os.environ.update(s3.env())
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
        try:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
            bench_area(args, Storage(s3.endpoint), s3.endpoint)
            bench_endpoint(args)
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
