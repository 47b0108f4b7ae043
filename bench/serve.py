"""Serving benchmark, side by side in one run:

1. large-area job (Ray Data actor pool, corpus in SeaweedFS) vs the bare encoder forward over the same tiles
   in this process (pixels already in memory): km² per second, steady state and end to end, their ratios
   (target >= 0.8), and where the job's time went;
2. the Serve endpoint under 16 concurrent clients: requests/s, p50 / p99 latency, errors (target 0), the
   mean number of requests that shared a forward, and the same requests decoded and encoded in this process.

    python bench/serve.py [--cells 8] [--tile 128] [--patch 8] [--threads 1] [--requests 20] [--model random:nano]
                          [--device cuda] [--precision bf16]
Both sides of each comparison run on the same device and precision (`--device cuda`: the area job's actor and
the endpoint's replica hold one GPU each; `--precision auto`: bf16 on CUDA, fp32 on CPU).
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
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.synth import SynthConfig, write_corpus

    synth = SynthConfig(num_samples=cells * cells, seed=5, labelled=True, missing_timestep_rate=0.0,
                        missing_modality_rate=0.0, cloud_rate=0.0, ray_tasks=2)  # fmt: skip
    summary = write_corpus(synth, root, storage)
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


def bench_area(args, storage) -> None:
    from serve.embedder import Embedder
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.embed_area import embed_area
    from serve.mapping.plan import make_source, plan

    bucket = f"s3://bench-{uuid.uuid4().hex[:8]}"
    start = dt.date(2021, 6, 1)
    end = start + dt.timedelta(days=30 * args.periods - 1)
    t = time.perf_counter()
    info = make_corpus(storage, bucket + "/raw", args.cells, start.isoformat())
    print(f"corpus_write: {time.perf_counter() - t:.1f} s ({args.cells} x {args.cells} cells, 12 timesteps each)")
    cfg = EmbedAreaConfig(bbox=info["bbox"], bbox_crs="EPSG:32618", crs="EPSG:32618", source=bucket + "/raw",
                          time_start=start.isoformat(), time_end=end.isoformat(), model_uri=args.model,
                          patch_size=args.patch, tile_size=args.tile, overlap=args.overlap, num_actors=1,
                          batch_size=args.batch, out=bucket + "/emb", formats=["cog"], preview=False,
                          torch_threads=args.threads, num_cpus_per_actor=1.0, precision=args.precision,
                          num_gpus_per_actor=1.0 if args.device == "cuda" else 0.0)  # fmt: skip
    # the bare forward over the same tiles: pixels read beforehand (not timed) into memory, same model, torch
    # threads and batch size, in this process; timed before and after the job, since other load drifts
    grid, tiles = plan(cfg)
    source = make_source(cfg, storage, grid)
    xs = [source.read(t, grid) for t in tiles]
    embedder = Embedder(args.model, device=args.device, num_threads=args.threads, precision=args.precision)
    months = np.tile(source.months, (args.batch, 1))
    embedder.embed({m: np.stack([x[m] for x in xs[: args.batch]]) for m in xs[0]}, months, args.patch)  # warm-up

    def bare_forward() -> float:
        t = time.perf_counter()
        for i in range(0, len(xs), args.batch):
            chunk = xs[i : i + args.batch]
            embedder.embed({m: np.stack([x[m] for x in chunk]) for m in chunk[0]}, months[: len(chunk)], args.patch)
        return time.perf_counter() - t

    bare_before = bare_forward()
    print(f"load_average_job_start: {os.getloadavg()[0]:.2f}")
    report = embed_area(cfg)
    assert not report["failed"], report["failed"]
    print(f"load_average_job_end: {os.getloadavg()[0]:.2f}")
    bare_after = bare_forward()
    bare = (bare_before + bare_after) / 2
    area, sec = report["area_km2"], report["seconds"]
    print(f"area_km2: {area:.2f} km2")
    print(f"area_tiles: {len(tiles)} tiles")
    for k in ("setup", "startup", "actor_init", "worker_read", "worker_embed", "worker_write",
              "worker_write_wait", "encode", "assemble_streamed", "assemble", "first_tile", "after_last_tile",
              "total"):  # fmt: skip
        if sec.get(k) is not None:
            print(f"area_job_seconds_{k}: {sec[k]:.2f} s")
    print(f"bare_encoder_seconds: {bare:.2f} s (before the job {bare_before:.2f}, after {bare_after:.2f})")
    print(f"bare_encoder_throughput: {area / bare:.3f} km2/s")
    steady = report["km2_per_s_steady"]
    if steady:
        print(f"area_job_steady_throughput: {steady:.3f} km2/s")
    print(f"area_job_end_to_end_throughput: {area / sec['total']:.3f} km2/s")
    if steady:
        print(f"ratio area_job_steady_vs_bare_forward: {steady / (area / bare):.3f}")
    print(f"ratio area_job_end_to_end_vs_bare_forward: {bare / sec['total']:.3f}")


def bench_endpoint(args) -> None:
    from ray import serve

    from bench.lib.cpu import cpu_by_role, tree_cpu_seconds
    from pipelines.common.local_s3 import free_port
    from serve.app import ServeConfig, run

    cfg = ServeConfig(model_uri=args.model, port=free_port(), min_replicas=1, max_replicas=1,
                      max_batch_size=args.max_batch,
                      max_ongoing_requests=32, batch_wait_timeout_s=args.wait, num_cpus=1.0,
                      torch_threads=args.threads, precision=args.precision,
                      num_gpus=1.0 if args.device == "cuda" else 0.0)  # fmt: skip
    run(cfg)
    url = f"http://127.0.0.1:{cfg.port}/embed"
    rng = np.random.default_rng(0)
    xs = [(rng.random((1, 32, 32, 2, 12)) * 3000).astype(np.float32) for _ in range(16)]
    bodies = []
    for x in xs:
        buf = io.BytesIO()
        np.savez(buf, sentinel2_l2a=x, months=np.array([5, 6]))
        bodies.append(buf.getvalue())
    n = 16 * args.requests
    bare = BareForward(args, bodies)
    bare_before = bare.run(4)
    http_client(url, bodies[0], args.requests)  # warm-up
    cpu_before = tree_cpu_seconds()
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: http_client(url, bodies[i], args.requests), range(16)))
    wall = time.perf_counter() - t
    cpu = cpu_by_role(cpu_before, tree_cpu_seconds())
    handle = serve.get_app_handle(cfg.name)
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        handle_lat = list(pool.map(lambda i: handle_client(handle, xs[i], args.requests), range(16)))
    handle_wall = time.perf_counter() - t
    bare_after = bare.run(4)
    lat = np.concatenate([r[0] for r in results]) * 1000
    errors = sum(r[1] for r in results)
    sizes = [s for r in results for s in r[2]]
    mean_batch = float(np.mean(sizes)) if sizes else 0.0
    matched = max(1, round(mean_batch))
    bare_matched = bare.run(matched)
    bare_s = (bare_before + bare_after) / 2
    print("endpoint_clients: 16 clients")
    print(f"endpoint_requests: {len(lat)} requests")
    print(f"endpoint_requests_per_s: {len(lat) / wall:.2f} req/s")
    print(f"endpoint_latency_p50: {np.percentile(lat, 50):.1f} ms")
    print(f"endpoint_latency_p99: {np.percentile(lat, 99):.1f} ms")
    print(f"endpoint_errors: {errors} requests")
    print(f"endpoint_mean_batch: {mean_batch:.2f} requests/forward")
    print(f"bare_forward_requests_per_s: {n / bare_s:.2f} req/s (batches of 4, no HTTP; before the clients "
          f"{n / bare_before:.2f}, after {n / bare_after:.2f})")  # fmt: skip
    print(f"bare_forward_matched_requests_per_s: {n / bare_matched:.2f} req/s (batches of {matched}, the "
          "endpoint's mean batch)")  # fmt: skip
    hl = np.concatenate(handle_lat) * 1000
    print(f"endpoint_handle_requests_per_s: {len(hl) / handle_wall:.2f} req/s (DeploymentHandle embed_arrays, "
          f"no HTTP; p99 {np.percentile(hl, 99):.1f} ms)")  # fmt: skip
    print(f"ratio endpoint_vs_bare_forward: {(len(lat) / wall) / (n / bare_s):.3f}")
    print(f"ratio endpoint_vs_bare_forward_matched_batch: {(len(lat) / wall) / (n / bare_matched):.3f}")
    print(f"ratio endpoint_handle_vs_bare_forward: {(len(hl) / handle_wall) / (n / bare_s):.3f}")
    print_time_split([st for r in results for st in r[3]])
    # where the machine's CPU went during the HTTP run ("bench": the 16 client threads of this process)
    for role, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"endpoint_cpu_{role}: {1000 * seconds / len(lat):.1f} ms/request")
    print(f"endpoint_cpu_cores_busy: {sum(cpu.values()) / wall:.2f} cores")
    serve.shutdown()


def http_client(url: str, body: bytes, requests_n: int):
    """One client, one request at a time -> (latencies s, errors, batch sizes, Server-Timing splits)."""
    import requests

    lat, errors, sizes, stages = [], 0, [], []
    with requests.Session() as s:
        for _ in range(requests_n):
            t = time.perf_counter()
            r = s.post(url, params={"patch_size": 4}, data=body, timeout=300,
                       headers={"Content-Type": "application/x-npz", "X-Timing": "1"})  # fmt: skip
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors += 1
            else:
                sizes.append(int(r.headers["x-batch-size"]))
                stages.append(parse_server_timing(r.headers.get("server-timing", ""), lat[-1] * 1000))
    return lat, errors, sizes, stages


def handle_client(handle, x: np.ndarray, requests_n: int) -> list[float]:
    """The same requests through the handle ingress (serve/app.py embed_arrays) -> latencies in s."""
    lat = []
    for _ in range(requests_n):
        t = time.perf_counter()
        handle.embed_arrays.remote({"sentinel2_l2a": x}, np.array([5, 6]), 4).result()
        lat.append(time.perf_counter() - t)
    return lat


class BareForward:
    """What the endpoint's requests cost without HTTP / Serve: decode + validate + forward in this process,
    same model and torch threads; timed before and after the clients, since other load drifts."""

    def __init__(self, args, bodies: list[bytes]):
        from serve.embedder import Embedder
        from serve.inputs import Limits, parse_npz

        self.parse = lambda b: parse_npz(b, 4, Limits())
        self.embedder = Embedder(args.model, device=args.device, num_threads=args.threads, precision=args.precision)
        self.bodies, self.n = bodies, 16 * args.requests
        self.embedder.embed(self.parse(bodies[0]).x, np.array([[5, 6]]), 4)  # warm-up

    def run(self, per: int) -> float:
        """Seconds for all the requests in batches of `per`."""
        t = time.perf_counter()
        for i in range(0, self.n, per):
            inps = [self.parse(self.bodies[(i + k) % 16]) for k in range(min(per, self.n - i))]
            x = {"sentinel2_l2a": np.concatenate([a.x["sentinel2_l2a"] for a in inps])}
            self.embedder.embed(x, np.concatenate([a.months for a in inps]), 4)
        return time.perf_counter() - t


def parse_server_timing(header: str, client_ms: float) -> dict:
    """The endpoint's Server-Timing (serve/app.py: body, decode, queue, forward, encode, replica; ms) plus
    `proxy`: the client's latency outside the replica (HTTP client, Serve's proxy, the hop to the replica)."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    if "replica" in out:
        out["proxy"] = client_ms - out["replica"]
    return out


def print_time_split(stages: list[dict]) -> None:
    """Where a request's wall time went, mean and p99 per stage across the timed requests."""
    for name in ("proxy", "body", "decode", "queue", "forward", "encode", "replica"):
        v = [st[name] for st in stages if name in st]
        if v:
            print(f"endpoint_time_{name}: {np.mean(v):.2f} ms (p99 {np.percentile(v, 99):.2f} ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=8, help="area of cells x cells corpus cells (2560 m each)")
    ap.add_argument("--periods", type=int, default=1, help="30-day periods in the time range (model timesteps)")
    ap.add_argument("--tile", type=int, default=128, help="area job tile side, px")
    ap.add_argument("--overlap", type=int, default=16, help="area job tile overlap, px")
    ap.add_argument("--patch", type=int, default=8, help="area job patch size, px")
    ap.add_argument("--batch", type=int, default=8, help="area job tiles per encoder forward, both sides")
    # 1 thread: on a loaded machine more OpenMP threads per forward contend for the same cores
    ap.add_argument("--threads", type=int, default=1, help="torch threads per encoder, both sides")
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    # ~10-20% of a batch forward here (200-400 ms for 8 requests): batches fill, the wait costs little
    ap.add_argument("--wait", type=float, default=0.04, help="endpoint batch_wait_timeout_s")
    ap.add_argument("--max_batch", type=int, default=16, help="endpoint max_batch_size (requests per forward)")
    ap.add_argument("--model", default="random:nano", help="encoder: exported file, checkpoint or random:<size>")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both sides run the encoder")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32")
    ap.add_argument("--skip_area", action="store_true", help="skip the large-area job comparison")
    ap.add_argument("--skip_endpoint", action="store_true", help="skip the endpoint comparison")
    args = ap.parse_args()

    import ray

    from pipelines.common.local_s3 import SeaweedServer
    from pipelines.common.storage import Storage

    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(os.path.join(tmp, "weed")) as s3:
        os.environ.update(s3.env())
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
        try:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
            print(f"load_average_before: {os.getloadavg()[0]:.2f}")
            if not args.skip_area:
                bench_area(args, Storage())
            if not args.skip_endpoint:
                bench_endpoint(args)
            print(f"load_average_after: {os.getloadavg()[0]:.2f}")
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
