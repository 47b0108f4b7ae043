"""The large-area job on a synthetic 4 x 4-cell area (10.24 x 10.24 km) in SeaweedFS: Ray Data actor pool,
COG + zarr + preview out, the area covered, no seams, interior embeddings equal to a direct `encode` of the
same pixels, a failing tile reported (not left silently empty) and a rerun that redoes only that tile."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import numpy as np
import pytest

TIME = ("2021-03-01", "2021-03-30")  # one 30-day period
MOD = "sentinel1"  # one bandset: a third of Sentinel-2's tokens, so the 81 tiles encode fast on 2 cores
CELL_M = 2560.0


@pytest.fixture(scope="module")
def area(s3_server):
    """A 4 x 4 block of contiguous corpus cells (EPSG:32618), all observed from the same day (the synthetic
    corpus gives each cell its own start date; the timestep CSVs are shifted so all start on TIME[0])."""
    from pipelines.common.storage import Storage
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.synth import SynthConfig, write_corpus

    storage = Storage()
    root = f"s3://area-{uuid.uuid4().hex[:8]}/raw"
    summary = write_corpus(SynthConfig(num_samples=16, seed=3, labelled=True, missing_timestep_rate=0.0,
                                       missing_modality_rate=0.0, cloud_rate=0.0), root, storage)  # fmt: skip
    start = dt.date.fromisoformat(TIME[0])
    for name in ("sentinel2_l2a", "sentinel1", "landsat"):
        uri = rl.csv_uri(root, name)
        table = rl.parse_timesteps_csv(storage.read_text(uri))
        rows = []
        for sid, periods in table.items():
            shift = start - periods[0][1]
            rows += [(sid, i, s + shift, e + shift) for i, s, e in periods]
        storage.write_text(uri, rl.write_timesteps_csv(rows))
    cells = [rl.parse_sample_id(s) for s in summary["sample_ids"]]
    cols, rows_ = sorted({c for _, c, _ in cells}), sorted({r for _, _, r in cells})
    assert len(cols) == 4 and len(rows_) == 4 and {e for e, _, _ in cells} == {32618}
    left, top = cols[0] * CELL_M, -rows_[0] * CELL_M
    return {"root": root, "storage": storage, "sids": summary["sample_ids"], "left": left, "top": top,
            "col0": cols[0], "row0": rows_[0]}  # fmt: skip


def block_pixels(area) -> tuple[np.ndarray, int]:
    """The 1024 x 1024 px mosaic of MOD over the 16 cells at the first timestep, read directly."""
    from olmoearth.modalities import MODALITIES
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.sample import read_sample

    out = np.full((1024, 1024, MODALITIES[MOD].num_bands), np.nan, np.float32)
    month = None
    for sid in area["sids"]:
        _, col, row = rl.parse_sample_id(sid)
        x, months, _ = read_sample(area["root"], sid, area["storage"], modalities=[MOD])
        r, c = (row - area["row0"]) * 256, (col - area["col0"]) * 256
        out[r : r + 256, c : c + 256] = x[MOD][:, :, 0]
        month = int(months[0])
    return out, month


def lonlat_bbox(area, inset: float = 100.0) -> list[float]:
    from rasterio.warp import transform_bounds

    l, t = area["left"], area["top"]
    return list(transform_bounds("EPSG:32618", "EPSG:4326", l + inset, t - 4 * CELL_M + inset,
                                 l + 4 * CELL_M - inset, t - inset))  # fmt: skip


def test_area_job_covers_blends_matches_encode_and_resumes(area, ray_cluster, tmp_path, monkeypatch):
    import rioxarray
    import xarray as xr

    from pipelines.common.faults import FAULTS_ENV
    from pipelines.imagery.grid import starts
    from serve.embedder import Embedder
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.embed_area import embed_area

    out = area["root"].rsplit("/", 1)[0] + "/embeddings"
    cfg = EmbedAreaConfig(bbox=lonlat_bbox(area), source=area["root"], modalities=[MOD], time_start=TIME[0], time_end=TIME[1],
                          model_uri="random:nano:7", patch_size=8, tile_size=128, overlap=16, num_actors=1,
                          batch_size=8, out=out, formats=["cog", "zarr"])  # fmt: skip
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"embed_tiles": ["r0002_c0003"]}))
    report = embed_area(cfg)
    grid = report["grid"]
    assert grid["crs"] == "EPSG:32618"  # the UTM zone of the lon/lat box
    n_tiles = len(starts(grid["width"], 128, 112)) * len(starts(grid["height"], 128, 112))
    assert report["tiles"] == n_tiles and report["encoded"] == n_tiles and report["skipped_finished"] == 0
    assert list(report["failed"]) == ["r0002_c0003"] and "made to fail" in report["failed"]["r0002_c0003"]
    assert report["seconds"]["assemble_streamed"] > 0  # the top band was blended while tiles were encoded
    storage = area["storage"]
    assert json.loads(storage.read_text(out + "/report.json"))["failed"] == report["failed"]

    # the failed tile's own part of the map is nodata, not zeros
    local = tmp_path / "run1"
    storage.fs(out).get(out + "/embeddings.zarr/", str(local / "embeddings.zarr"), recursive=True)
    z1 = xr.open_zarr(local / "embeddings.zarr", group="utm18")["embedding"].values  # (D, h, w)
    ty, tx = starts(grid["height"], 128, 112)[2] // 8, starts(grid["width"], 128, 112)[3] // 8
    assert np.isnan(z1[:, ty + 5 : ty + 11, tx + 5 : tx + 11]).all()

    # rerun: only the failed tile is encoded; now everything is there (int8 this time)
    monkeypatch.delenv(FAULTS_ENV)
    cfg.int8 = True
    report2 = embed_area(cfg)
    assert report2["encoded"] == 1 and report2["skipped_finished"] == n_tiles - 1 and not report2["failed"]

    local = tmp_path / "run2"
    storage.fs(out).get(out + "/", str(local), recursive=True)
    ds = xr.open_zarr(local / "embeddings.zarr", group="utm18")  # one group per UTM zone (geoemb: convention)
    emb = ds["embedding"].values  # int8 decoded by CF scale_factor / _FillValue -> float
    assert emb.dtype.kind == "f" and emb.shape == (128, grid["height"] // 8, grid["width"] // 8)
    cog = rioxarray.open_rasterio(local / "embeddings.tif")
    assert cog.rio.crs.to_epsg() == 32618 and cog.dtype == np.int8 and cog.shape == emb.shape
    assert np.allclose(cog.rio.bounds(), (grid["x0"], grid["y0"] - grid["height"] * 10, grid["x0"] + grid["width"] * 10,
                                          grid["y0"]))  # fmt: skip
    assert ds.rio.crs.to_epsg() == 32618
    assert ds["spatial_ref"].attrs["crs_wkt"] and float(ds["x"][1] - ds["x"][0]) == 80.0
    assert (local / "preview.png").stat().st_size > 1000
    check_geoemb_zarr(local / "embeddings.zarr", ds, grid)

    # int8 quantisation stays within half a step of the float result (away from the failed tile, whose
    # overlaps blended differently in run 1)
    step = float(cog.attrs["scale_factor"])
    assert step == float(ds["embedding"].encoding["scale_factor"])
    both = np.isfinite(z1) & np.isfinite(emb)
    both[:, ty : ty + 16, tx : tx + 16] = False
    assert both.mean() > 0.8 and np.abs(z1[both] - emb[both]).max() <= 0.51 * step + 1e-6

    # covers the area: the lon/lat box lies inside the 4 x 4 cells, so nearly every token has data
    # (the synthetic corpus cuts swath-edge wedges out of ~10% of acquisitions)
    valid = np.isfinite(emb).all(0)
    assert valid.mean() > 0.85, valid.mean()

    # no seams: across the blended overlaps neighbouring tokens differ no more than inside tiles
    e = np.moveaxis(emb, 0, -1)
    dx = np.linalg.norm(e[:, 1:] - e[:, :-1], axis=-1)  # (h, w-1)
    xs = starts(grid["width"], 128, 112)
    seam_cols = sorted({(x // 8) + k for x in xs[1:] for k in range(-1, 3)})  # ramp zones near tile edges
    inner = [c for c in range(dx.shape[1]) if c not in seam_cols]
    seam = np.nanmean(dx[:, [c for c in seam_cols if c < dx.shape[1]]])
    base = np.nanmean(dx[:, inner])
    assert seam < 1.5 * base, (seam, base)

    # interior tokens equal a direct encode of the same pixels (float zarr of run 1 is exact)
    pixels, month = block_pixels(area)
    embedder = Embedder("random:nano:7")
    ys_ = starts(grid["height"], 128, 112)
    ox, oy = int(round((grid["x0"] - area["left"]) / 10)), int(round((area["top"] - grid["y0"]) / 10))
    for r, c in [(1, 1), (3, 4)]:
        y0, x0 = ys_[r], xs[c]
        tile = pixels[oy + y0 : oy + y0 + 128, ox + x0 : ox + x0 + 128][None, :, :, None]
        direct, _ = embedder.embed({MOD: tile}, np.array([[month]]), 8)
        core = (slice(4, 12), slice(4, 12))  # tokens no neighbour reaches (the overlap is 2 tokens)
        got = np.moveaxis(z1[:, y0 // 8 + 4 : y0 // 8 + 12, x0 // 8 + 4 : x0 // 8 + 12], 0, -1)
        want = direct[0][core]
        ok = np.isfinite(want).all(-1)
        assert ok.mean() > 0.5
        np.testing.assert_allclose(got[ok], want[ok], atol=1e-5, rtol=1e-5)


def test_embed_cli_from_geotiffs_exits_1_on_a_failed_tile_then_0_on_rerun(ray_cluster, tmp_path, capsys, monkeypatch):
    import rasterio
    import yaml
    from affine import Affine

    from pipelines.common.faults import FAULTS_ENV
    from ray_jobs.cli import main

    rng = np.random.default_rng(0)
    tif = str(tmp_path / "s1.tif")
    with rasterio.open(tif, "w", driver="GTiff", width=96, height=96, count=2, dtype="float32", crs="EPSG:32618",
                       transform=Affine(10, 0, 500000, 0, -10, 4100000)) as ds:  # fmt: skip
        ds.write((rng.normal(-12, 3, (2, 96, 96))).astype(np.float32))
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(yaml.safe_dump({"bbox": [500000, 4099040, 500960, 4100000], "bbox_crs": "EPSG:32618",
                                   "geotiffs": {"sentinel1": [tif]}, "months": [4], "model_uri": "random:nano",
                                   "tile_size": 64, "overlap": 32, "patch_size": 4, "formats": ["cog"]}))  # fmt: skip
    out = str(tmp_path / "out")
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"embed_tiles": ["r0000_c0001"]}))
    assert main(["embed", "--config", str(cfg), "--out", out]) == 1
    monkeypatch.delenv(FAULTS_ENV)
    assert main(["embed", "--config", str(cfg), "--out", out]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tiles"] == 4 and report["encoded"] == 1 and report["skipped_finished"] == 3
    with rasterio.open(tmp_path / "out" / "embeddings.tif") as ds:
        assert ds.crs.to_epsg() == 32618 and (ds.width, ds.height, ds.count) == (24, 24, 128)
        assert np.isfinite(ds.read()).all()


def check_geoemb_zarr(path, ds, grid) -> None:
    """The geo-embeddings Zarr convention on an int8 map: root attrs, the zone group's proj: / spatial:, and
    nodata stored as -128, apart from every data value (-127..127)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    attrs = dict(root.attrs)
    assert attrs["olmoearth:groups"] == ["utm18"] and list(root.group_keys()) == ["utm18"]
    assert {c["name"] for c in attrs["zarr_conventions"]} == {"geoemb:", "proj:", "spatial:"}
    assert attrs["geoemb:type"] == "pixel" and attrs["geoemb:dimensions"] == 128 and attrs["geoemb:gsd"] == 80.0
    assert attrs["geoemb:model"] == "random:nano:7" and attrs["geoemb:data_type"] == "int8"
    assert attrs["geoemb:source_data"] and attrs["geoemb:spatial_layout"] == "utm_zones"
    q = attrs["geoemb:quantization"]
    assert q["method"] == "linear" and q["scale"]["type"] == "scalar"
    assert q["scale"]["scale"] == float(ds["embedding"].encoding["scale_factor"])
    zone = dict(root["utm18"].attrs)
    assert zone["proj:code"] == "EPSG:32618" and zone["spatial:shape"] == [grid["height"] // 8, grid["width"] // 8]
    assert zone["spatial:transform"] == [80.0, 0.0, grid["x0"], 0.0, -80.0, grid["y0"]]
    raw = root["utm18/embedding"][:]
    decoded = ds["embedding"].values
    assert raw.dtype == np.int8 and (raw == -128).any()
    np.testing.assert_array_equal(raw == -128, np.isnan(decoded))  # nodata is -128, and only nodata
    assert raw[raw != -128].min() >= -127
    np.testing.assert_allclose(decoded[raw != -128], raw[raw != -128] * q["scale"]["scale"], rtol=1e-6)


def test_zarr_zone_group_names():
    """The convention's `utm{NN}` group names; a southern zone and other CRSs stay apart."""
    from serve.mapping.mosaic import zone_group_name

    assert zone_group_name("EPSG:32618") == "utm18" and zone_group_name("EPSG:32601") == "utm01"
    assert zone_group_name("EPSG:32733") == "utm33s" and zone_group_name("EPSG:3857") == "epsg3857"
    with pytest.raises(ValueError, match="needs a CRS with an EPSG code"):
        zone_group_name('LOCAL_CS["arbitrary",UNIT["metre",1]]')
