"""Materialisation benchmark, on SeaweedFS: `materialize` of cells from a static STAC catalog against the raw
windowed read of the same COG bytes.

A synthetic corpus of cells x cells cells (Sentinel-2, one month) is written and its pixels published as a
static STAC catalog (bench/stac_map.py's `write_catalog`): each cell seen by `--scenes` acquisitions of the
month (one tiled GeoTIFF per band at its stored resolution plus an SCL asset each; acquisition k clear only on
the k-th stripe of the cell, so the month's composite needs all of them, as a cloudy month does), items with
the projection extension's exact footprints, as public catalogs have. Then:

- materialise: `materialize` of every cell (Ray tasks of 1 CPU on a local cluster of `--cores` CPUs), end to
  end (planning and search included), written back in the raw layout; its Sentinel-2 files are checked equal to
  the corpus's own (every acquisition holds the corpus's pixels, so the round trip must be exact);
- raw read: in one process, for every cell, each asset of each item the job hands that cell (bands and SCL)
  opened with rasterio and the cell's window read, an item's files at once in the reader threads the job uses
  (no warping, masking, compositing, conversion or writing): the same COG bytes with the same I/O overlap,
  the floor of what any reader pays;
- `ratio materialize_vs_raw_read`: (materialise cells/s / cores) / (raw read cells/s); target >= 0.6;
- `ratio raw_read_cpu_over_materialize_cpu`: CPU seconds per cell of the raw read over the job's, each counted
  over this process and the processes it started (the Ray cluster, the S3 server): what the job's work costs
  beside the bytes, whatever else runs on the machine.

SeaweedFS runs on the same machine and takes about half a core while either side reads. `--cores 1` (the
default) is the per-core comparison: one Ray CPU against one reading process, each with the server on the
other core of a 2-core machine; `--cores 2` puts the job's two workers on the cores the server shares.

    python bench/materialize.py [--cells 4] [--scenes 3] [--cores 1] [--repeats 2]
Prints `NAME: VALUE UNIT` and `ratio NAME: VALUE` lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import uuid

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TQDM_DISABLE", "1")
START, END = "2021-06-01", "2021-06-30"  # one calendar month: the corpus's one 30-day period


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def raw_read(cfg, storage) -> float:
    """Seconds to read, in this process, each cell's window of every asset (bands and mask) of every item the
    job hands that cell (the same COG bytes the materialisation reads), each file opened once and kept open
    (as the job's workers keep theirs), an item's files read at once in the reader threads the job uses
    (`Handles.map`): the same I/O concurrency, so the ratio is what the processing costs, not the overlap."""
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.materialize import load_cells, plan_jobs
    from pipelines.imagery.sources import Handles, source_window

    jobs = plan_jobs(cfg, load_cells(cfg, storage), storage)
    t0 = time.perf_counter()
    handles = Handles(storage, size=1 << 20)

    def read(job):
        href, bounds = job
        ds = handles.get(href)
        win = source_window(ds, bounds)  # None: the file does not reach the cell
        if win is not None:
            ds.read(1, window=win)

    with handles.env_ctx():
        for job in jobs:
            bounds = rl.cell_bounds(job["cell"].col, job["cell"].row)
            for spec in job["sources"].values():
                for rec in spec["items"]:
                    hrefs = [href for _, href in [*rec["assets"].values(), *([rec["mask"]] if rec["mask"] else [])]]
                    handles.map(read, [(href, bounds) for href in hrefs])
    handles.close()
    return time.perf_counter() - t0


def check_equal(storage, raw: str, out: str, sids: list[str]) -> None:
    """The materialised Sentinel-2 files hold exactly the corpus's pixels."""
    from olmoearth.modalities import MODALITIES
    from pipelines.corpus import raw_layout as rl
    from pipelines.imagery.geotiff import read_geotiff

    folder = MODALITIES["sentinel2_l2a"].raw_folder
    for sid in sids:
        epsg, col, row = rl.parse_sample_id(sid)
        for bs in MODALITIES["sentinel2_l2a"].bandsets:
            name = f"{folder}/{rl.file_name(epsg, col, row, bs.resolution)}"
            a, _ = read_geotiff(f"{raw}/{name}", storage)
            b, _ = read_geotiff(f"{out}/{name}", storage)
            assert np.array_equal(a[: bs.num_bands], b), (sid, bs.resolution)


def run(args, storage) -> None:
    from bench.lib.cpu import cpu_spent
    from pipelines.corpus.materialize import materialize
    from pipelines.corpus.materialize_config import MaterializeConfig

    bucket = f"s3://bench-mat-{uuid.uuid4().hex[:8]}"
    _bench("serve").make_corpus(storage, bucket + "/raw", args.cells, START)
    catalog = _bench("stac_map").write_catalog(storage, bucket + "/raw", bucket, args.scenes)
    from pipelines.corpus.raw_layout import list_samples

    sids = sorted(list_samples(bucket + "/raw", storage))
    mat, raw, mat_cpu, raw_cpu = [], [], [], []
    for k in range(args.repeats):
        out = f"{bucket}/out-{k}"
        cfg = MaterializeConfig(cell_ids=sids, time_start=START, time_end=END, stac=catalog,
                                collections={"sentinel2_l2a": "sentinel-2-l2a"}, out=out)  # fmt: skip
        report, wall, cpu = cpu_spent(materialize, cfg, storage)
        mat.append(wall), mat_cpu.append(cpu)
        assert report["written"] == len(sids) and not report["failed"], report
        check_equal(storage, bucket + "/raw", out, sids)
        _, wall, cpu = cpu_spent(raw_read, cfg, storage)
        raw.append(wall), raw_cpu.append(cpu)
    n = len(sids)
    mat_rate, raw_rate = n / min(mat), n / min(raw)
    mat_ms, raw_ms = 1000 * min(mat_cpu) / n, 1000 * min(raw_cpu) / n
    print(f"cells: {n} cells, {args.scenes} scene(s) each")
    print(f"materialize_throughput: {mat_rate:.3f} cells/s on {args.cores} cores (runs {', '.join(f'{n / s:.3f}' for s in mat)})")
    print(f"materialize_per_core: {mat_rate / args.cores:.3f} cells/s/core")
    print(f"raw_read_throughput: {raw_rate:.3f} cells/s on 1 core (runs {', '.join(f'{n / s:.3f}' for s in raw)})")
    print(f"materialize_cpu: {mat_ms:.1f} ms/cell (CPU of driver, Ray workers and S3 server)")
    print(f"raw_read_cpu: {raw_ms:.1f} ms/cell (CPU of the reading process and S3 server)")
    print(f"ratio materialize_vs_raw_read: {mat_rate / args.cores / raw_rate:.3f}")
    print(f"ratio raw_read_cpu_over_materialize_cpu: {raw_ms / mat_ms:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=4, help="cells x cells corpus cells (2560 m each)")
    ap.add_argument("--scenes", type=int, default=3,
                    help="acquisitions per cell in the month, each clear on its own part of the cell (a composite needs all)")
    ap.add_argument("--cores", type=int, default=1,
                    help="CPUs of the local Ray cluster the job runs on (1: one Ray CPU against one reading process, "
                         "each with the S3 server on another core)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side; the best is reported")
    args = ap.parse_args()

    from bench.lib.services import local_services

    with local_services(num_cpus=args.cores) as storage:
        run(args, storage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
