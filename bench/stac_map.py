"""STAC input benchmark, in one run on SeaweedFS: the area job from a STAC catalog against the same job over the
same pixels already in the corpus layout.

A synthetic corpus of cells x cells cells (Sentinel-2, one 30-day period) is written, then the same pixels as a
static STAC catalog: one item per cell, one tiled GeoTIFF per band at its stored resolution (10 / 20 / 40 m) and
an SCL asset. Both jobs run with the same model, tiling and actors:

- km²/s end to end and steady state of each, and `ratio stac_vs_corpus` (target >= 0.7 on 2 cores);
- bytes read from storage: every tile read once more through the STAC source in this process, with its S3
  endpoint behind a byte-counting proxy, against the compressed bytes of the TIFF blocks the tiles' windows
  need (each block once), `ratio stac_bytes_read_vs_window_blocks` (target <= 1.5).

    python bench/stac_map.py [--cells 3] [--tile 64] [--patch 4] [--model random:nano]
Prints `NAME: VALUE UNIT` and `ratio NAME: VALUE` lines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import sys
import threading
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TQDM_DISABLE", "1")
START, END = "2021-06-01", "2021-06-30"  # one 30-day corpus period = one calendar month


def _make_corpus():
    """bench/serve.py's `make_corpus` (contiguous synthetic cells starting on one day)."""
    spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(ROOT, "bench", "serve.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_corpus


def write_catalog(storage, root: str, base: str, scenes: int = 1) -> str:
    """The corpus's Sentinel-2 pixels of its first timestep as STAC items -> catalog URI. Each cell is seen by
    `scenes` acquisitions of the month (items `<sid>` and `<sid>_<k>`), all holding the cell's pixels; with
    several, acquisition k's SCL is clear only on the k-th of `scenes` horizontal stripes (cloud elsewhere), so
    a composite needs every one of them and still equals the corpus's pixels. Items carry the projection
    extension's `proj:code`, `proj:bbox` and per asset `proj:shape` / `proj:transform`, as public catalogs do."""
    import pystac
    from affine import Affine
    from rasterio.warp import transform_bounds

    from olmoearth.modalities import BASE_GSD, MODALITIES
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.sample import read_sample
    from pipelines.imagery.geotiff import geotiff_bytes
    from pipelines.imagery.stac_io import storage_stac_io

    coll = pystac.Collection("sentinel-2-l2a", "bench", pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]),
                                                                      pystac.TemporalExtent([[None, None]])))  # fmt: skip
    fs = storage.fs(root)
    sids = sorted({os.path.basename(p).rsplit("_", 1)[0] for p in fs.ls(rl.join(root, "10_sentinel2_l2a_monthly"))})
    for sid in sids:
        epsg, col, row = rl.parse_sample_id(sid)
        x, _, _ = read_sample(root, sid, storage, modalities=["sentinel2_l2a"])
        left, bottom, right, top = rl.cell_bounds(col, row)
        img = x["sentinel2_l2a"][:, :, 0]  # (256, 256, 12) DN on 10 m, coarse bands repeated
        w, s_, e, n = transform_bounds(f"EPSG:{epsg}", "EPSG:4326", left, bottom, right, top)
        geom = {"type": "Polygon", "coordinates": [[[w, s_], [e, s_], [e, n], [w, n], [w, s_]]]}
        for k in range(scenes):
            item_id = sid if k == 0 else f"{sid}_{k}"
            item = pystac.Item(item_id, geom, [w, s_, e, n], dt.datetime.fromisoformat(START + f"T{10 + k:02d}:00:00"),
                               {"proj:code": f"EPSG:{epsg}", "proj:bbox": [left, bottom, right, top],
                                "eo:cloud_cover": 100.0 * (1 - 1 / scenes) + k / 100, "s2:processing_baseline": "03.01"})  # fmt: skip
            c = 0
            for bs in MODALITIES["sentinel2_l2a"].bandsets:
                f = int(round(bs.resolution / BASE_GSD))
                for band in bs.bands:
                    dn = np.nan_to_num(img[::f, ::f, c], nan=0).astype(np.uint16)  # undo the repetition: stored form
                    c += 1
                    uri = f"{base}/cogs/{item_id}/{band}.tif"
                    t = Affine(bs.resolution, 0, left, 0, -bs.resolution, top)
                    storage.write_bytes(uri, geotiff_bytes(dn[None], epsg, t, nodata=0, block=64))
                    item.add_asset(band, pystac.Asset(uri, extra_fields={"proj:shape": list(dn.shape),
                                                                        "proj:transform": list(t)[:6]}))  # fmt: skip
            scl = np.full((1, 128, 128), 4, np.uint8)  # 4: vegetation (clear)
            if scenes > 1:
                stripe = np.arange(128) * scenes // 128  # row -> stripe
                scl[0, stripe != k] = 9  # cloud, high probability
            uri = f"{base}/cogs/{item_id}/SCL.tif"
            t = Affine(20.0, 0, left, 0, -20.0, top)
            storage.write_bytes(uri, geotiff_bytes(scl, epsg, t, nodata=0, block=64))
            item.add_asset("SCL", pystac.Asset(uri, extra_fields={"proj:shape": [128, 128],
                                                                 "proj:transform": list(t)[:6]}))  # fmt: skip
            coll.add_item(item)
    coll.normalize_hrefs(f"{base}/stac")
    coll.save(pystac.CatalogType.SELF_CONTAINED, stac_io=storage_stac_io(storage))
    return f"{base}/stac/collection.json"


class CountingProxy:
    """An HTTP proxy in front of the S3 server counting the body bytes of GET responses (GDAL's reads)."""

    def __init__(self, upstream: str):
        self.bytes, self.requests = 0, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self, method: str):
                req = urllib.request.Request(upstream + self.path, method=method,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})  # fmt: skip
                try:
                    with urllib.request.urlopen(req) as r:
                        status, headers, body = r.status, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    status, headers, body = e.code, e.headers, e.read()
                if method == "GET":
                    proxy.bytes += len(body)
                    proxy.requests += 1
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.end_headers()
                if method == "GET":
                    self.wfile.write(body)

            def do_GET(self):
                self._forward("GET")

            def do_HEAD(self):
                self._forward("HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def window_block_bytes(source, grid, tiles) -> int:
    """Compressed bytes of the TIFF blocks that the tiles' windows need, each block counted once."""
    import rasterio
    from rasterio.warp import transform_bounds

    from pipelines.imagery.sources import gdal_env, source_window

    blocks = set()
    sizes = {}
    with rasterio.Env(**gdal_env(source.storage)):
        for rec in source.items:
            hrefs = [h for _, h in rec["assets"].values()] + ([rec["mask"][1]] if rec["mask"] else [])
            for href in hrefs:
                with rasterio.open(href) as ds:
                    bw, bh = ds.block_shapes[0][1], ds.block_shapes[0][0]
                    for t in tiles:
                        win = source_window(ds, transform_bounds(grid.crs, ds.crs, *t.bounds(grid), densify_pts=21))
                        if win is None:
                            continue
                        for by in range(int(win.row_off) // bh, (int(win.row_off + win.height) - 1) // bh + 1):
                            for bx in range(int(win.col_off) // bw, (int(win.col_off + win.width) - 1) // bw + 1):
                                key = (href, bx, by)
                                if key not in sizes:
                                    sizes[key] = int(ds.get_tag_item(f"BLOCK_SIZE_{bx}_{by}", "TIFF", bidx=1) or 0)
                                blocks.add(key)
    return sum(sizes[k] for k in blocks)


def run(args, storage) -> None:
    from pipelines.common.storage import Storage
    from pipelines.imagery.stac import StacSource
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.embed_area import embed_area
    from serve.mapping.plan import make_source, plan

    bucket = f"s3://bench-stac-{uuid.uuid4().hex[:8]}"
    info = _make_corpus()(storage, bucket + "/raw", args.cells, START)
    stac = write_catalog(storage, bucket + "/raw", bucket)
    common = dict(bbox=info["bbox"], bbox_crs="EPSG:32618", crs="EPSG:32618", time_start=START, time_end=END,
                  model_uri=args.model, patch_size=args.patch, tile_size=args.tile, overlap=args.overlap,
                  num_actors=1, batch_size=args.batch, formats=["cog"], preview=False, torch_threads=args.threads)  # fmt: skip
    corpus = EmbedAreaConfig(source=bucket + "/raw", modalities=["sentinel2_l2a"], **common)
    stac_cfg = EmbedAreaConfig(stac=stac, collections={"sentinel2_l2a": "sentinel-2-l2a"}, **common)
    grid, tiles = plan(corpus)
    # the two sources hand the encoder the same pixels
    a, b = make_source(corpus, storage, grid), make_source(stac_cfg, storage, grid)
    for t in tiles[:: max(1, len(tiles) // 4)]:
        xa, xb = a.read(t, grid)["sentinel2_l2a"], b.read(t, grid)["sentinel2_l2a"]
        assert np.array_equal(np.isnan(xa), np.isnan(xb)) and np.array_equal(xa[~np.isnan(xa)], xb[~np.isnan(xb)])
    rates = {"corpus": [], "stac": []}
    for name, cfg in (("corpus", corpus), ("stac", stac_cfg), ("corpus", corpus), ("stac", stac_cfg)):
        cfg.out = f"{bucket}/maps/{name}-{uuid.uuid4().hex[:6]}"
        report = embed_area(cfg)
        assert not report["failed"] and not report["empty"], (report["failed"], report["empty"])
        rates[name].append((report["area_km2"] / report["seconds"]["total"], report["km2_per_s_steady"] or 0.0,
                            report["seconds"]["worker_read"]))  # fmt: skip
    area = grid.area_km2
    print(f"area_km2: {area:.2f} km2")
    print(f"area_tiles: {len(tiles)} tiles")
    for name, vals in rates.items():
        e2e, steady, read = (np.mean([v[i] for v in vals]) for i in range(3))
        print(f"{name}_end_to_end_throughput: {e2e:.3f} km2/s (runs {', '.join(f'{v[0]:.3f}' for v in vals)})")
        print(f"{name}_steady_throughput: {steady:.3f} km2/s")
        print(f"{name}_worker_read_seconds: {read:.2f} s")
    e2e = {k: np.mean([v[0] for v in vals]) for k, vals in rates.items()}
    steady = {k: np.mean([v[1] for v in vals]) for k, vals in rates.items()}
    print(f"ratio stac_vs_corpus_end_to_end: {e2e['stac'] / e2e['corpus']:.3f}")
    if steady["corpus"]:
        print(f"ratio stac_vs_corpus_steady: {steady['stac'] / steady['corpus']:.3f}")
    # bytes: every tile once more through the STAC source, its S3 endpoint behind the counting proxy
    proxy = CountingProxy(storage.endpoint)
    try:
        counted = StacSource.from_spec(b.spec(), Storage(s3_endpoint=proxy.url))
        for t in tiles:
            counted.read(t, grid)
    finally:
        proxy.close()
    need = window_block_bytes(b, grid, tiles)
    print(f"stac_bytes_read: {proxy.bytes / area / 1e6:.3f} MB/km2 ({proxy.requests} GETs)")
    print(f"stac_window_block_bytes: {need / area / 1e6:.3f} MB/km2")
    print(f"ratio stac_bytes_read_vs_window_blocks: {proxy.bytes / max(need, 1):.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=3, help="area of cells x cells corpus cells (2560 m each)")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per encoder")
    ap.add_argument("--model", default="random:nano")
    args = ap.parse_args()

    from bench.lib.services import local_services

    with local_services(num_cpus=max(4, os.cpu_count() or 2)) as storage:
        run(args, storage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
