"""Fast checks of the serving parts that need no Ray: request parsing and validation, tiling and blend
weights, the UTM grid of an area, int8 quantisation and the GeoTIFF source's warping."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipelines.imagery.grid import Grid, make_tiles, starts
from serve.inputs import BadRequest, Limits, parse_months, parse_npz, validate


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_validate_accepts_good_input_and_maps_missing_to_nan():
    x = np.full((2, 8, 8, 3, 12), 1000.0, np.float32)
    x[0, 0, 0, 0, 0] = -99999.0
    out, months = validate({"sentinel2_l2a": x}, None, 4, Limits())
    assert np.isnan(out["sentinel2_l2a"][0, 0, 0, 0, 0]) and months.tolist() == [[0, 1, 2], [0, 1, 2]]
    inp = parse_npz(npz(sentinel2_l2a=x, months=np.array([4, 5, 6])), 4, Limits())
    assert inp.months.tolist() == [[4, 5, 6]] * 2 and inp.batch == 2


@pytest.mark.parametrize(
    "x, p, field",
    [
        ({"sentinel2_l2a": np.ones((1, 8, 8, 1, 11))}, 4, "sentinel2_l2a"),  # band count
        ({"landsat": np.ones((1, 8, 4, 1, 11))}, 4, "landsat"),  # not square
        ({"sentinel1": np.ones((1, 12, 12, 1, 2))}, 8, "patch_size"),  # 12 % 8
        ({"srtm": np.ones((1, 8, 8, 1, 1))}, 4, "srtm"),  # decode-only map
        ({"sentinel5": np.ones((1, 8, 8, 1, 1))}, 4, "sentinel5"),
        ({"sentinel1": np.full((1, 8, 8, 1, 2), np.nan)}, 4, "sentinel1"),  # nothing there
        ({"sentinel1": np.ones((1, 8, 8, 13, 2))}, 4, "sentinel1"),  # > 12 timesteps
        ({"sentinel1": np.ones((1, 8, 8, 1, 2)), "landsat": np.ones((1, 8, 8, 2, 11))}, 4, "sentinel1"),  # T differs
    ],
)
def test_validate_names_the_bad_field(x, p, field):
    with pytest.raises(BadRequest) as e:
        validate(x, None, p, Limits())
    assert e.value.field == field and e.value.status == 400


def test_oversize_is_413_and_months_are_checked():
    with pytest.raises(BadRequest) as e:
        validate({"sentinel1": np.ones((1, 64, 64, 1, 2))}, None, 4, Limits(max_tile=32))
    assert e.value.status == 413
    assert parse_months("3,4", 2, 1).tolist() == [[3, 4]]
    for bad in ("3", "1,x", "12,1"):
        with pytest.raises(BadRequest) as e:
            parse_months(bad, 2, 1)
        assert e.value.field == "months"


def test_multipart_parser_splits_files_and_fields():
    import requests

    from serve.app import parse_multipart

    req = requests.Request("POST", "http://x/embed", files={"sentinel1": ("a.tif", b"\x00\x01binary", "image/tiff")},
                           data={"months": "1,2"}).prepare()  # fmt: skip
    files, fields = parse_multipart(req.body, req.headers["Content-Type"])
    assert files == {"sentinel1": b"\x00\x01binary"} and fields == {"months": "1,2"}
    with pytest.raises(BadRequest) as e:
        parse_multipart(b"--x--", "multipart/form-data")
    assert e.value.field == "Content-Type"


def test_tiles_cover_the_grid_and_blending_is_exact_where_one_tile_reaches():
    from serve.mapping.blend import tile_weights

    grid = Grid("EPSG:32618", 0.0, 0.0, 200, 136)
    tiles = make_tiles(grid, 64, 16, 4)
    assert starts(200, 64, 48) == [0, 48, 96, 136] and starts(136, 64, 48) == [0, 48, 72]
    n_rows, n_cols = 3, 4
    acc = np.zeros((136 // 4, 200 // 4))
    covered = np.zeros_like(acc)
    for t in tiles:
        w = tile_weights(t, n_cols, n_rows, 4, 16)
        acc[t.y // 4 : t.y // 4 + 16, t.x // 4 : t.x // 4 + 16] += w
        covered[t.y // 4 : t.y // 4 + 16, t.x // 4 : t.x // 4 + 16] += 1
    assert (covered >= 1).all() and (acc > 0).all()
    # where only one tile reaches, its weight is exactly 1 (so the mosaic equals that tile)
    assert np.all(acc[covered == 1] == 1.0)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        make_tiles(grid, 62, 16, 4)


def test_area_grid_picks_the_utm_zone_and_snaps_outward():
    from pipelines.imagery.grid import area_grid, utm_epsg

    assert utm_epsg(-75.9, 37.1) == 32618 and utm_epsg(151.2, -33.9) == 32756
    crs, (x0, y0), w, h = area_grid((-75.98, 37.10, -75.88, 37.18), "EPSG:4326", None, 10.0, 40.0)
    assert crs == "EPSG:32618" and x0 % 40 == 0 and y0 % 40 == 0 and w % 4 == 0 and h % 4 == 0
    assert 8000 < w * 10 < 10000 and 8000 < h * 10 < 10000


def test_int8_quantisation_roundtrip():
    from serve.mapping.geo import dequantise_int8, quantise_int8

    e = np.random.default_rng(0).normal(size=(5, 5, 8)).astype(np.float32)
    e[0, 0] = np.nan
    scale = float(np.nanmax(np.abs(e))) / 127
    q = quantise_int8(e, scale)
    back = dequantise_int8(q, scale)
    assert q.dtype == np.int8 and (q[0, 0] == -128).all() and np.isnan(back[0, 0]).all()
    ok = np.isfinite(e)
    assert np.abs(back[ok] - e[ok]).max() <= scale / 2 + 1e-7


def test_geotiff_source_warps_onto_the_grid(tmp_path):
    import rasterio
    from affine import Affine

    from pipelines.common.storage import Storage
    from pipelines.imagery.grid import Tile
    from pipelines.imagery.sources import GeoTiffSource

    rng = np.random.default_rng(0)
    arr = rng.integers(1, 5000, (24, 50, 50)).astype(np.uint16)  # 2 timesteps x 12 bands
    path = str(tmp_path / "s2.tif")
    with rasterio.open(path, "w", driver="GTiff", width=50, height=50, count=24, dtype="uint16", crs="EPSG:32618",
                       transform=Affine(10, 0, 1000, 0, -10, 5000), nodata=0) as ds:  # fmt: skip
        ds.write(arr)
    src = GeoTiffSource({"sentinel2_l2a": [path]}, [6, 7], Storage())
    grid = Grid("EPSG:32618", 1100.0, 4900.0, 64, 64)  # 10 px right / down of the file's corner
    x = src.read(Tile(0, 0, 0, 0, 32), grid)["sentinel2_l2a"]  # (32, 32, 2, 12)
    want = np.moveaxis(arr[:, 10:42, 10:42], 0, -1).reshape(32, 32, 2, 12).astype(np.float32)
    np.testing.assert_array_equal(x, want)
    far = src.read(Tile(0, 1, 24, 24, 32), grid)["sentinel2_l2a"]  # half outside the file -> NaN there
    assert np.isnan(far[-5:, -5:]).all() and np.isfinite(far[:5, :5]).all()
    bad = str(tmp_path / "bad.tif")
    with rasterio.open(bad, "w", driver="GTiff", width=4, height=4, count=5, dtype="uint16", crs="EPSG:32618",
                       transform=Affine(10, 0, 0, 0, -10, 0)) as ds:  # fmt: skip
        ds.write(np.ones((5, 4, 4), np.uint16))
    with pytest.raises(ValueError, match="not a multiple of 12"):
        GeoTiffSource({"sentinel2_l2a": [bad]}, None, Storage())


def test_corpus_source_reads_the_same_pixels_as_read_sample(tmp_path):
    """Windowed reads of only the bands in range, on a grid offset by an odd number of 10 m pixels from the
    cells (so the 20 m / 40 m bandsets are cut mid-pixel), equal whole-sample reads placed on the area's
    timeline the documented way (slot middle day -> 30-day period, first image wins)."""
    import datetime as dt

    from pipelines.common.storage import Storage
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.sample import read_sample
    from pipelines.corpus.source import CorpusSource
    from pipelines.corpus.synth import SynthConfig, write_corpus

    storage = Storage()
    root = str(tmp_path / "raw")
    summary = write_corpus(SynthConfig(num_samples=4, seed=1, labelled=True), root, storage)  # 2 x 2 cells
    cells = {sid: rl.parse_sample_id(sid) for sid in summary["sample_ids"]}
    col0, row0 = min(c for _, c, _ in cells.values()), min(r for _, _, r in cells.values())
    table = rl.read_timesteps(root, storage, ["sentinel2_l2a"])["sentinel2_l2a"]
    first = min(p[0][1] for p in table.values())
    start, end = first + dt.timedelta(days=40), first + dt.timedelta(days=40 + 5 * 30 - 1)  # 5 periods
    left, top = col0 * 2560.0, -row0 * 2560.0
    grid = Grid("EPSG:32618", left + 30.0, top - 50.0, 500, 500)
    src = CorpusSource(root, ["sentinel2_l2a"], storage, start.isoformat(), end.isoformat(), grid=grid)
    again = CorpusSource(root, ["sentinel2_l2a"], storage, start.isoformat(), end.isoformat(),
                         _plan=src.spec()["plan"])  # a worker's copy: no listing  # fmt: skip
    assert len(src.months) == 5

    # expected: the 512 x 512 px block of whole samples on the area's timeline
    block = np.full((512, 512, 5, 12), np.nan, np.float32)
    for sid, (_, col, row) in cells.items():
        x, _, _ = read_sample(root, sid, storage, modalities=["sentinel2_l2a"])
        periods = table[sid]
        t0 = min(p[1] for p in periods)
        a = x["sentinel2_l2a"]
        r, c = (row - row0) * 256, (col - col0) * 256
        for t in range(a.shape[2]):
            mid = t0 + dt.timedelta(days=t * 30 + 15)
            k = (mid - start).days // 30
            if start <= mid <= end and 0 <= k < 5 and np.isnan(block[r : r + 256, c : c + 256, k]).all():
                block[r : r + 256, c : c + 256, k] = a[:, :, t]
    for tile in make_tiles(grid, 100, 20, 4):
        want = block[5 + tile.y : 5 + tile.y + 100, 3 + tile.x : 3 + tile.x + 100]
        got = again.read(tile, grid)["sentinel2_l2a"]
        np.testing.assert_array_equal(got, want)
    assert np.isfinite(block).any()
    # no time range: the 12 periods (from an image's start) holding the most images of the area
    default = CorpusSource(root, ["sentinel2_l2a"], storage, "", "", grid=grid)
    starts = sorted(p[1] for v in table.values() for p in v)
    a = dt.date.fromisoformat(default.time[0])
    in_window = sum(a <= b <= a + dt.timedelta(days=359) for b in starts)
    assert len(default.months) == 12 and a in starts
    assert all(in_window >= sum(s <= b <= s + dt.timedelta(days=359) for b in starts) for s in starts)


def test_serve_app_options_autoscaling_gpu_and_batching():
    import yaml

    from serve.app import ServeConfig, app_builder, build_app

    d = build_app(ServeConfig(num_gpus=1, min_replicas=1, max_replicas=3, target_ongoing_requests=8))._bound_deployment
    assert d.ray_actor_options["num_gpus"] == 1
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 8)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        build_app(ServeConfig(max_batch_size=16, max_ongoing_requests=8))
    args = yaml.safe_load(open("configs/serve.yaml"))["applications"][0]["args"]
    d = app_builder(args)._bound_deployment
    assert d._deployment_config.max_ongoing_requests >= args["max_batch_size"]
    assert "num_gpus" not in d.ray_actor_options  # num_gpus: 0 -> CPU replicas


def test_preview_leaves_out_the_tiling_component(tmp_path):
    """A position signal repeating every tile must not paint the preview; the land signal must."""
    from pipelines.imagery.grid import Grid
    from serve.mapping.mosaic import MosaicWriter

    rng = np.random.default_rng(0)
    size, n, dim = 8, 4, 16  # tiles of 8 x 8 tokens, a 4 x 4 lattice of them, 16-dim embeddings
    position = rng.normal(0, 3.0, (size, size, dim)).astype(np.float32)  # strong, same in every tile
    land = np.zeros((size * n, size * n, dim), np.float32)
    land[:, size * n // 2 :, 0] = 1.0  # the east half differs from the west half in one direction
    tiled = np.tile(position, (n, n, 1))
    mosaic = tiled + land

    def preview(detile: bool) -> np.ndarray:
        w = MosaicWriter(str(tmp_path), Grid("EPSG:32618", 0.0, 0.0, size * n * 4, size * n * 4), 4, dim, [],
                         None, True, block=16)  # fmt: skip
        for by in range(0, size * n, 16):  # blocks in any order: the PCA is fitted at the end
            for bx in (16, 0):
                sl = (slice(by, by + 16), slice(bx, bx + 16))
                w.write_block(by, bx, mosaic[sl], preview_minus=tiled[sl] if detile else None)
        return w.preview_rgba()[..., :3].astype(float)

    west, east = slice(0, size * n // 2), slice(size * n // 2, None)
    for img, lattice in ((preview(True), False), (preview(False), True)):
        spread = max(img[:, west].std(axis=(0, 1)).max(), img[:, east].std(axis=(0, 1)).max())
        contrast = np.abs(img[:, west].mean(axis=(0, 1)) - img[:, east].mean(axis=(0, 1))).max()
        if lattice:  # plain PCA: the tile lattice dominates each half
            assert spread > 20
        else:  # de-tiled: each half is flat, the halves differ
            assert spread < 2 and contrast > 100


def test_streaming_mosaic_writes_each_band_once_its_tiles_are_final_in_any_order(tmp_path):
    """serve/mapping/assemble.py: bands of block_tokens rows go out as soon as every overlapping tile has a final status;
    the mosaic does not depend on the order results arrive in."""
    import rasterio

    from pipelines.common.storage import Storage
    from pipelines.imagery.grid import Grid, make_tiles
    from serve.mapping.assemble import StreamingMosaic
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.tile_store import write_batch_results

    # 160 x 160 px at patch 4 = 40 x 40 tokens; tiles of 16 tokens stepping by 12: rows at tokens 0, 12, 24;
    # bands of 16 rows: band 0 needs tile rows 0-1, band 1 rows 1-2, band 2 row 2
    grid = Grid("EPSG:32618", 500000.0, 4000000.0, 160, 160)
    tiles = make_tiles(grid, 64, 16, 4)
    assert len(tiles) == 9
    rng = np.random.default_rng(0)
    emb = {t.id: rng.normal(size=(16, 16, 8)).astype(np.float32) for t in tiles}
    storage, failed = Storage(), "r0002_c0002"
    statuses = {}
    for t in tiles:  # one result file per tile, as the workers write them (one per encoder batch)
        ok = t.id != failed
        write_batch_results(storage, str(tmp_path / "out"), t.id, {t.id: emb[t.id]} if ok else {},
                            {t.id: {"status": "ok" if ok else "failed"}})  # fmt: skip
        statuses[t.id] = {"status": "ok" if ok else "failed", "file": f"{t.id}.npz", "max_abs": 4.0}

    def run(order, name):
        cfg = EmbedAreaConfig(bbox=[0, 0, 1, 1], source="unused", out=str(tmp_path / "out"), patch_size=4,
                              tile_size=64, overlap=16, block_tokens=16, formats=["cog"], preview=True)  # fmt: skip
        work = tmp_path / name
        work.mkdir()
        mosaic, written = StreamingMosaic(cfg, grid, tiles, storage, str(work)), []
        for t in order:
            mosaic.add(t.id, statuses[t.id])
            written.append(sorted(mosaic.written))
        outputs = mosaic.finish()  # uploaded into out/, read before the next run replaces it
        with rasterio.open(outputs["cog"]) as src:
            return np.moveaxis(src.read(), 0, -1), written, outputs

    forward, written, outputs = run(tiles, "forward")
    assert written[2] == [] and written[5] == [0] and written[8] == [0, 1, 2]  # rows 0-1 done -> band 0 out
    assert "preview" in outputs
    backward, written_back, _ = run(tiles[::-1], "backward")
    assert written_back[2] == [2] and written_back[5] == [1, 2]  # row 2 done: band 2; row 1: band 1
    np.testing.assert_allclose(forward, backward, atol=1e-6)
    # a token only one tile reaches is that tile's embedding; the failed tile's own tokens are nodata
    np.testing.assert_allclose(forward[2, 2], emb["r0000_c0000"][2, 2], atol=1e-6)
    assert np.isnan(forward[30:40, 30:40]).all()
    assert np.isfinite(forward[:20, :20]).all()


def test_npz_declared_sizes_are_checked_before_inflating():
    """Zip members' method and size and the .npy headers' shapes are refused before any array is read."""
    import zipfile

    def member(shape, dtype="<f4", method=zipfile.ZIP_DEFLATED, name="sentinel2_l2a.npy", data=b""):
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {"descr": dtype, "fortran_order": False, "shape": shape})
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=method) as zf:
            zf.writestr(name, head.getvalue() + data)
        return out.getvalue()

    lim = Limits(max_tile=64, max_tokens_per_sample=4096, max_decoded_mb=16)
    cases = [
        (member((1, 16, 16, 1, 12), method=zipfile.ZIP_BZIP2), 422, "sentinel2_l2a"),
        (member((1, 16, 16, 1, 12), method=zipfile.ZIP_LZMA), 422, "sentinel2_l2a"),
        (member((64, 4096, 4096, 12, 12)), 413, "sentinel2_l2a"),  # 9 GiB declared, none sent
        (member((1, 128, 128, 1, 12)), 413, "sentinel2_l2a"),  # over max_tile
        (member((1, 32, 32, 12, 12)), 413, "body"),  # at p=2: 16 * 16 * 12 * 3 = 9216 tokens > 4096
        (member((1, 16, 16, 1, 12), dtype="|O"), 400, "sentinel2_l2a"),
        (member((1, 16, 16, 1, 12), name="notes.txt"), 400, "notes.txt"),
        (member((1, 16, 16, 1, 12)), 400, "sentinel2_l2a"),  # header only: truncated data
    ]
    for i, (data, status, field) in enumerate(cases):
        with pytest.raises(BadRequest) as e:
            parse_npz(data, 2 if i == 4 else 4, lim)
        assert (e.value.status, e.value.field) == (status, field), (i, e.value.to_json())


def test_token_count_follows_the_encoder_and_months_overflow_is_a_400():
    from serve.inputs import tokens

    # S2 has 3 bandsets, S1 one: (24/1)^2 * 12 * 3 = 20736 tokens per sample
    assert tokens({"sentinel2_l2a": (2, 24, 24, 12)}, 1) == (20736, 41472)
    assert tokens({"sentinel2_l2a": (1, 32, 32, 2), "sentinel1": (1, 32, 32, 2)}, 4)[0] == 64 * 2 * 3 + 64 * 2
    for bad in ("9" * 20, "1," * 200, "-1"):
        with pytest.raises(BadRequest) as e:
            parse_months(bad, 1, 1)
        assert e.value.field == "months" and e.value.status == 400


def test_geotiff_header_is_checked_before_decoding():
    from affine import Affine
    from rasterio.io import MemoryFile

    from serve.inputs import parse_geotiffs

    with MemoryFile() as mf:
        with mf.open(driver="GTiff", width=20000, height=20000, count=12, dtype="uint16", crs="EPSG:32618",
                     transform=Affine(10, 0, 0, 0, -10, 0), tiled=True, sparse_ok=True, compress="deflate"):  # fmt: skip
            pass
        sparse = bytes(mf.read())
    assert len(sparse) < 2**20  # a few KB declaring 9.6 GB of pixels
    with pytest.raises(BadRequest) as e:
        parse_geotiffs({"sentinel2_l2a": sparse}, 4, Limits(), None)
    assert (e.value.status, e.value.field) == (413, "sentinel2_l2a") and "20000" in e.value.message
    with pytest.raises(BadRequest) as e:
        parse_geotiffs({"sentinel2_l2a": b"<VRTDataset>" + b" " * 100}, 4, Limits(), None)
    assert e.value.field == "sentinel2_l2a" and "/vsimem" not in e.value.message


def test_precision_field_is_checked_before_any_work():
    """An unknown precision is refused by the endpoint's and the area job's one validation, naming the field."""
    from serve.app import ServeConfig, build_app
    from serve.mapping.config import EmbedAreaConfig, check_config

    with pytest.raises(ValueError, match="precision must be one of"):
        build_app(ServeConfig(precision="fp16"))
    cfg = EmbedAreaConfig(bbox=[0, 0, 1, 1], geotiffs={"sentinel2_l2a": ["x.tif"]}, out="o", precision="half")
    with pytest.raises(ValueError, match="precision must be one of"):
        check_config(cfg)
