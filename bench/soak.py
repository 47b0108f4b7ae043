"""Soak of the Serve endpoint: many concurrent clients for a bounded time, good requests mixed with every
hostile input of the endpoint's hardening (bench/lib/hostile.py), all on 127.0.0.1; stops by itself.

Reports, per hostile kind, the outcomes seen (HTTP status, or what the connection did); for the good
requests their count, errors (target 0), p50 / p99 latency; and the replica's resident memory over time,
with its growth after the warm-up (target < 10%). A replica that grows past --max_replica_gib ends the run
early (the machine is shared), and the run exits 1.

    python bench/soak.py [--duration_s 300] [--clients 64] [--hostile_clients 16] [--model random:nano]
Prints `NAME: VALUE UNIT` and `ratio NAME: VALUE` lines.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TQDM_DISABLE", "1")

HOST = "127.0.0.1"


class Soak:
    """The shared state of one soak: the deadline, the outcomes, the good latencies, the RSS samples."""

    def __init__(self, args, port: int, kinds: dict):
        self.args, self.port, self.kinds = args, port, kinds
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.duration_s
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: dict[str, collections.Counter] = {k: collections.Counter() for k in kinds}
        self.good_lat: list[tuple[float, float]] = []  # (time since start, latency s)
        self.good_errors: collections.Counter = collections.Counter()
        self.error_examples: dict[str, str] = {}  # the first answer body per failing status, for diagnosis
        self.rss: list[tuple[float, int, int]] = []  # (time since start, pid, bytes)
        self.aborted = ""

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def good_client(self, i: int) -> None:
        import requests

        rng = np.random.default_rng(i)
        bodies = [good_body(rng, j) for j in range(4)]
        with requests.Session() as s:
            while self.running():
                (ctype, query, body) = bodies[int(rng.integers(len(bodies)))]
                t = time.monotonic()
                try:
                    r = s.post(f"http://{HOST}:{self.port}/embed?{query}", data=body,
                               headers={"Content-Type": ctype}, timeout=self.args.timeout_s)  # fmt: skip
                    ok, what, text = r.status_code == 200, str(r.status_code), r.text[:300]
                except requests.RequestException as e:
                    ok, what, text = False, type(e).__name__, str(e)[:300]
                with self.lock:
                    if ok:
                        self.good_lat.append((t - self.t0, time.monotonic() - t))
                    else:
                        self.good_errors[what] += 1
                        self.error_examples.setdefault(what, text)

    def hostile_client(self, i: int) -> None:
        names = list(self.kinds)
        n = i
        while self.running():
            kind = self.kinds[names[n % len(names)]]
            n += 1
            # the full timeout even near the deadline: a cut-short wait would read as the server's fault
            timeout = self.args.slow_hold_s if kind.slow else self.args.timeout_s
            try:
                outcome = kind.send(HOST, self.port, timeout)
            except OSError as e:
                outcome = type(e).__name__
            with self.lock:
                self.outcomes[kind.name][outcome] += 1

    def watch_replica(self) -> None:
        """RSS of the replica every --rss_every_s; ends the soak if it passes --max_replica_gib."""
        import psutil

        pid = None
        while self.running():
            if pid is None or not psutil.pid_exists(pid):
                pid = replica_pid()  # the state API only when the replica (re)started: it costs a round trip
            if pid is not None:
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    rss = None
                if rss:  # 0: a process on its way out
                    with self.lock:
                        self.rss.append((time.monotonic() - self.t0, pid, rss))
                    if rss > self.args.max_replica_gib * 2**30:
                        self.aborted = f"replica RSS {rss / 2**30:.1f} GiB > --max_replica_gib"
                        self.stop.set()
            self.stop.wait(self.args.rss_every_s)


def good_body(rng: np.random.Generator, j: int) -> tuple[str, str, bytes]:
    """(Content-Type, query, body) of a valid request: .npz of 32 or 64 px, or a multipart GeoTIFF."""
    from bench.lib.hostile import good_npz

    if j < 3:
        return "application/x-npz", "patch_size=4", good_npz(rng, size=(32, 64, 32)[j], t=2)
    from rasterio.transform import from_origin

    from pipelines.imagery.geotiff import geotiff_bytes

    x = (rng.random((24, 32, 32)) * 3000).astype(np.uint16)  # 2 timesteps x 12 bands, time-major
    tif = geotiff_bytes(x, 32618, from_origin(500000.0, 4000000.0, 10.0, 10.0))
    boundary = "soakgood"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="sentinel2_l2a"; filename="s2.tif"\r\n'
            f"Content-Type: image/tiff\r\n\r\n").encode() + tif + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="months"\r\n\r\n5,6\r\n'
            f"--{boundary}--\r\n").encode()  # fmt: skip
    return f"multipart/form-data; boundary={boundary}", "patch_size=4&format=npy", body


def replica_pid() -> int | None:
    """The encoder replica of this bench's own cluster: a descendant of this process (the embedded cluster's
    raylet is its child) whose process title names the deployment; other sessions' replicas are not."""
    import psutil

    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "OlmoEarthEncoder" in " ".join(p.cmdline()):
                return p.pid
        except psutil.Error:
            continue
    return None


def report(soak: Soak) -> int:
    args = soak.args
    wall = time.monotonic() - soak.t0
    print(f"soak_wall: {wall:.0f} s")
    print(f"soak_clients: {args.clients} clients ({args.clients - args.hostile_clients} good, "
          f"{args.hostile_clients} hostile)")  # fmt: skip
    for name, seen in soak.outcomes.items():
        total = sum(seen.values())
        print(f"hostile_{name}: {total} requests (" + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())) + ")")
        bad = sum(v for k, v in seen.items() if k.startswith("5") or k in ("200", "held", "timeout"))
        print(f"hostile_{name}_accepted_or_failed: {bad} requests")
    lat = np.array([x for _, x in soak.good_lat]) * 1000
    errors = sum(soak.good_errors.values())
    print(f"good_requests: {len(lat)} requests")
    print(f"good_requests_per_s: {len(lat) / wall:.2f} req/s")
    print(f"good_errors: {errors} requests" + (f" ({dict(soak.good_errors)})" if errors else ""))
    for what, text in soak.error_examples.items():
        print(f"  first {what} answer: {text!r}")
    if len(lat):
        print(f"good_latency_p50: {np.percentile(lat, 50):.1f} ms")
        print(f"good_latency_p99: {np.percentile(lat, 99):.1f} ms")
    rc = rss_report(soak)
    if soak.aborted:
        print(f"soak_aborted: 1 ({soak.aborted})")
        rc = 1
    return rc if errors == 0 else 1


def rss_report(soak: Soak) -> int:
    samples = soak.rss
    if not samples:
        print("replica_rss_samples: 0 samples")
        return 1
    pids = []
    for _, pid, _ in samples:
        if not pids or pids[-1] != pid:
            pids.append(pid)
    print(f"replica_restarts: {len(pids) - 1} restarts")
    step = max(1, len(samples) // 10)
    for t, _, rss in samples[::step]:
        print(f"replica_rss_at_{t:.0f}s: {rss / 2**20:.0f} MiB")
    warm = soak.args.warmup_s
    after = [r for t, _, r in samples if t >= warm]
    if len(after) < 4:
        print(f"replica_rss_samples_after_warmup: {len(after)} samples (run longer than --warmup_s)")
        return 0
    k = max(2, len(after) // 10)
    base, end = float(np.median(after[:k])), float(np.median(after[-k:]))
    print(f"replica_rss_after_warmup: {base / 2**20:.0f} MiB")
    print(f"replica_rss_end: {end / 2**20:.0f} MiB")
    print(f"replica_rss_peak: {max(r for _, _, r in samples) / 2**20:.0f} MiB")
    print(f"ratio replica_rss_end_vs_after_warmup: {end / base:.3f}")
    return 0


def run(args) -> int:
    from ray import serve

    from bench.lib.hostile import make_kinds
    from pipelines.common.local_s3 import free_port
    from pipelines.common.ray_start import init_ray
    from serve.app import ServeConfig
    from serve.app import run as serve_run

    with tempfile.TemporaryDirectory() as tmp:
        t = time.monotonic()
        kinds = make_kinds(tmp, bomb_mib=args.bomb_mib)
        if args.kinds:
            kinds = {k: v for k, v in kinds.items() if k in args.kinds.split(",")}
        print(f"hostile_inputs_built: {time.monotonic() - t:.1f} s ({len(kinds)} kinds)")
        init_ray(address="local", num_cpus=max(4, os.cpu_count() or 2))
        cfg = ServeConfig(model_uri=args.model, host=HOST, port=free_port(), min_replicas=1, max_replicas=1,
                          torch_threads=args.threads)  # fmt: skip
        serve_run(cfg)
        soak = Soak(args, cfg.port, kinds)
        threads = [threading.Thread(target=soak.watch_replica, daemon=True)]
        threads += [threading.Thread(target=soak.good_client, args=(i,), daemon=True)
                    for i in range(args.clients - args.hostile_clients)]  # fmt: skip
        threads += [threading.Thread(target=soak.hostile_client, args=(i,), daemon=True)
                    for i in range(args.hostile_clients)]  # fmt: skip
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=max(0.0, soak.deadline - time.monotonic()) + args.timeout_s + 30)
        soak.stop.set()
        rc = report(soak)
        serve.shutdown()
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration_s", type=float, default=300, help="how long the clients send, seconds")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients in all")
    ap.add_argument("--hostile_clients", type=int, default=16, help="of them, clients cycling the hostile kinds")
    ap.add_argument("--kinds", default="", help="comma-separated hostile kinds to send (default: all)")
    # long enough for the replica's allocator to reach its working set under 64 clients (it climbs for minutes)
    ap.add_argument("--warmup_s", type=float, default=120, help="memory growth is measured after this")
    ap.add_argument("--timeout_s", type=float, default=120, help="client timeout per request")
    ap.add_argument("--slow_hold_s", type=float, default=30, help="how long a slow-body client waits at most")
    ap.add_argument("--rss_every_s", type=float, default=2, help="replica memory sampling interval")
    ap.add_argument("--max_replica_gib", type=float, default=6, help="end the soak early past this replica RSS")
    ap.add_argument("--bomb_mib", type=int, default=1024, help="what the zip bomb's member expands to")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the replica")
    ap.add_argument("--model", default="random:nano")
    args = ap.parse_args()
    # the bench stops itself: if teardown hangs past its deadline, the process ends anyway
    watchdog = threading.Timer(args.duration_s + args.timeout_s + 180, lambda: os._exit(2))
    watchdog.daemon = True
    watchdog.start()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
