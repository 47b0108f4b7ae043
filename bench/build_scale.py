"""Scale of the corpus build's driver: plan the build over N raw samples and extrapolate to the original's
285,288.

    python bench/build_scale.py [--sizes 10000,30000,100000] [--root /tmp/olmoearth-build-scale] [--clean]

For each N a local tree of empty files in the raw layout (every bandset of every modality: 12 files a sample,
the most a sample has) plus the temporal modalities' timestep CSVs is made once (kept under --root for the
next run; --clean removes it afterwards). Then, in a fresh process per N, the driver's planning runs as
`build_corpus` runs it: list and group the files (pipelines/corpus/raw_layout.list_raw), plan the parts,
assign samples to parts, find the parts to build and serialise every part's spec for Ray Data
(pipelines/corpus/build.part_items). Measured: its wall time (without tracemalloc), the peak of Python
allocations during it (tracemalloc, second pass) and the process's peak RSS (after the first pass; its RSS
before planning, the interpreter and imports, is printed too). A least-squares line in N
of each figure is extrapolated to 285,288 samples (target: <= 2 GiB driver memory, linear time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL = 285_288  # samples of the original's pretraining corpus


def make_tree(root: str, n: int) -> str:
    """n samples of empty files in the raw layout under root/n<N> (made once; a marker says it is whole)."""
    from olmoearth.modalities import MODALITIES
    from pipelines.corpus import raw_layout as rl

    tree = os.path.join(root, f"n{n}")
    if os.path.exists(os.path.join(tree, ".complete")):
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    d = dt.date(2021, 1, 1)
    cells = [(32600 + i % 60, i // 60, -(i % 997)) for i in range(n)]  # (epsg, col, row), all distinct
    for m in MODALITIES.values():
        folder = os.path.join(tree, m.raw_folder)
        os.makedirs(folder)
        for epsg, col, row in cells:
            for bs in m.bandsets:
                os.close(os.open(os.path.join(folder, rl.file_name(epsg, col, row, bs.resolution)),
                                 os.O_CREAT | os.O_WRONLY, 0o644))  # fmt: skip
        if m.temporal:
            rows = [(rl.sample_id(*c), 0, d, d + dt.timedelta(days=30)) for c in cells]
            with open(rl.csv_uri(tree, m.name), "w") as fh:
                fh.write(rl.write_timesteps_csv(rows))
    open(os.path.join(tree, ".complete"), "w").close()
    return tree


def plan_once(tree: str) -> dict:
    """The driver's planning of a build of `tree`: -> figures of this process."""
    from pipelines.common.storage import Storage
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.build import BuildConfig, part_items
    from pipelines.corpus.plan import listed_parts, make_plan, parts_to_build

    cfg = BuildConfig(raw_uri=tree, out_uri=tree + "-out")

    def run():
        listing = rl.list_raw(tree, Storage())
        plan = make_plan(len(listing.samples), cfg, None, "plan.json")
        listed = listed_parts(listing.samples, plan)
        todo = parts_to_build(listed, {})
        items = part_items(listing.samples, listed, todo, plan, {})
        return len(listing.samples), listing.files_found, len(items), sum(len(i["spec"]) for i in items)

    with open("/proc/self/status") as fh:  # the process before planning: interpreter and imports
        base = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
    t0 = time.perf_counter()
    n, files, parts, spec_bytes = run()
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; before tracemalloc's own
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"samples": n, "files": files, "parts": parts, "spec_bytes": spec_bytes, "seconds": seconds,
            "py_peak_bytes": peak, "rss_peak_bytes": rss, "rss_base_bytes": base}  # fmt: skip


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys on xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--root", default="/tmp/olmoearth-build-scale")
    ap.add_argument("--clean", action="store_true", help="remove the trees afterwards")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child process: plan this tree, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(plan_once(args.one)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        tree = make_tree(args.root, n)
        made = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--one", tree], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"tree_{n}_made: {made:.1f} s", file=sys.stderr)
        print(f"plan_time_{n}: {r['seconds']:.2f} s")
        print(f"plan_time_per_sample_{n}: {r['seconds'] / n * 1e6:.1f} us")
        print(f"driver_py_peak_{n}: {r['py_peak_bytes'] / 2**20:.0f} MiB")
        print(f"driver_rss_peak_{n}: {r['rss_peak_bytes'] / 2**20:.0f} MiB")
        print(f"driver_rss_before_planning_{n}: {r['rss_base_bytes'] / 2**20:.0f} MiB")
        print(f"part_specs_{n}: {r['spec_bytes'] / 2**20:.0f} MiB")
    xs = [r["samples"] for r in rows]
    for key, unit, scale in (("seconds", "s", 1), ("py_peak_bytes", "MiB", 2**20), ("rss_peak_bytes", "MiB", 2**20)):
        a, b = fit(xs, [r[key] for r in rows])
        print(f"extrapolated_{key.replace('_bytes', '')}_{FULL}: {(a + b * FULL) / scale:.0f} {unit}")
    first, last = rows[0], rows[-1]
    print(f"ratio plan_time_per_sample_{last['samples']}_over_{first['samples']}: "
          f"{(last['seconds'] / last['samples']) / (first['seconds'] / first['samples']):.2f}")  # fmt: skip
    print(f"ratio rss_per_sample_{last['samples']}_over_{first['samples']}: "
          f"{(last['rss_peak_bytes'] / last['samples']) / (first['rss_peak_bytes'] / first['samples']):.2f}")
    if args.clean:
        shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
