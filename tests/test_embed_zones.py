"""An area across two UTM zones (17 | 18 at 78 W): a grid per zone, one zarr group per zone with its own CRS and
transform, one COG and preview per zone, one STAC asset per zone COG, chips carrying their zone's CRS, tile
tokens equal to a direct encode of the same pixels on the zone's own grid, every tile reported, and a rerun that
redoes only the failed tiles of both zones. Plus the zone split of a bbox and predict's refusal."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

BBOX = [-78.01, 37.0, -77.99, 37.01]  # ~1.8 x 1.1 km, half in zone 17, half in zone 18
MOD = "sentinel1"


def test_zone_parts_split_at_meridians_and_equator():
    from pipelines.imagery.grid import utm_zone_parts

    assert utm_zone_parts([-77.5, 10, -77.0, 11]) == [("EPSG:32618", (-77.5, 10.0, -77.0, 11.0))]
    # an edge on a meridian touches the next zone only: one zone
    assert [c for c, _ in utm_zone_parts([-78.0, 10, -77.0, 11])] == ["EPSG:32618"]
    assert [c for c, _ in utm_zone_parts([-79.0, 10, -78.0, 11])] == ["EPSG:32617"]
    # three zones, cut at -78 and -72
    parts = utm_zone_parts([-79.0, 10, -71.0, 11])
    assert parts == [("EPSG:32617", (-79.0, 10.0, -78.0, 11.0)), ("EPSG:32618", (-78.0, 10.0, -72.0, 11.0)),
                     ("EPSG:32619", (-72.0, 10.0, -71.0, 11.0))]  # fmt: skip
    # across the equator: north and south halves of each zone; an edge on the equator stays on its side
    parts = utm_zone_parts([-78.5, -1.0, -77.5, 2.0])
    assert parts == [("EPSG:32617", (-78.5, 0.0, -78.0, 2.0)), ("EPSG:32717", (-78.5, -1.0, -78.0, 0.0)),
                     ("EPSG:32618", (-78.0, 0.0, -77.5, 2.0)), ("EPSG:32718", (-78.0, -1.0, -77.5, 0.0))]  # fmt: skip
    assert [c for c, _ in utm_zone_parts([-77.5, -1.0, -77.0, 0.0])] == ["EPSG:32718"]
    assert [c for c, _ in utm_zone_parts([-77.5, 0.0, -77.0, 1.0])] == ["EPSG:32618"]
    # the antimeridian's zones 60 and 1
    assert [c for c, _ in utm_zone_parts([179.0, 1, 180.0, 2])] == ["EPSG:32660"]
    assert [c for c, _ in utm_zone_parts([-180.0, 1, -179.0, 2])] == ["EPSG:32601"]
    with pytest.raises(ValueError, match="not a lon/lat box"):
        utm_zone_parts([500000, 4000000, 501000, 4001000])


def test_plan_zones_only_without_crs_and_across_zones():
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.plan import plan, plan_zones

    cfg = EmbedAreaConfig(bbox=BBOX, geotiffs={MOD: ["x.tif"]}, out="o", tile_size=64, overlap=16, patch_size=4)
    zones = plan_zones(cfg)
    assert [z.name for z in zones] == ["utm17", "utm18"]
    assert [z.grid.crs for z in zones] == ["EPSG:32617", "EPSG:32618"]
    for z in zones:  # corners snapped to whole tokens, tiles inside the zone's grid
        assert z.grid.x0 % 40 == 0 and z.grid.y0 % 40 == 0 and z.tiles
    assert plan_zones(EmbedAreaConfig(bbox=BBOX, crs="EPSG:32618", geotiffs={MOD: ["x.tif"]}, out="o")) is None
    one = EmbedAreaConfig(bbox=[-77.6, 37.0, -77.59, 37.01], geotiffs={MOD: ["x.tif"]}, out="o")
    assert plan_zones(one) is None and plan(one)[0].crs == "EPSG:32618"
    # a bbox given in a projected CRS is split by its lon/lat extent
    from pipelines.imagery.grid import bbox_to_crs

    utm = list(bbox_to_crs(BBOX, "EPSG:4326", "EPSG:32618"))
    assert [z.name for z in plan_zones(EmbedAreaConfig(bbox=utm, bbox_crs="EPSG:32618", geotiffs={MOD: ["x"]},
                                                       out="o"))] == ["utm17", "utm18"]  # fmt: skip


def test_predict_refuses_an_area_across_zones():
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.plan import refuse_zones

    cfg = EmbedAreaConfig(bbox=BBOX, geotiffs={MOD: ["x.tif"]}, out="o")
    with pytest.raises(ValueError, match=r"spans 2 UTM zones \(utm17, utm18\); olmoearth predict"):
        refuse_zones(cfg, "olmoearth predict")
    refuse_zones(EmbedAreaConfig(bbox=BBOX, crs="EPSG:32618", geotiffs={MOD: ["x.tif"]}, out="o"), "predict")


def write_zone_tifs(zones, folder, width: int | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """One Sentinel-1 GeoTIFF per zone on exactly that zone's grid (its west `width` px only, if given) ->
    {zone: (path, (H, W, 2) pixels)}."""
    import rasterio
    from affine import Affine

    out = {}
    for i, z in enumerate(zones):
        g = replace(z.grid, width=width or z.grid.width)
        px = np.random.default_rng(i).normal(-12, 3, (g.height, g.width, 2)).astype(np.float32)
        path = str(folder / f"s1_{z.name}.tif")
        with rasterio.open(path, "w", driver="GTiff", width=g.width, height=g.height, count=2, dtype="float32",
                           crs=g.crs, transform=Affine(10, 0, g.x0, 0, -10, g.y0)) as ds:  # fmt: skip
            ds.write(np.moveaxis(px, -1, 0))
        out[z.name] = (path, px)
    return out


def test_area_across_two_zones(ray_cluster, tmp_path, monkeypatch):
    import shutil

    import pyarrow.parquet as pq
    import rioxarray  # noqa: F401 - registers .rio
    import xarray as xr
    import zarr

    from pipelines.common.faults import FAULTS_ENV
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.embed_area import embed_area
    from serve.mapping.plan import plan_zones

    out = tmp_path / "map"
    cfg = EmbedAreaConfig(bbox=BBOX, months=[4], model_uri="random:nano:7", patch_size=4, tile_size=64, overlap=16,
                          num_actors=1, batch_size=4, out=str(out), formats=["cog", "zarr"], chips_parquet=True,
                          chip_tokens=4, block_tokens=16)  # fmt: skip
    zones = plan_zones(cfg)
    tifs = write_zone_tifs(zones, tmp_path)
    cfg.geotiffs = {MOD: [tifs["utm17"][0], tifs["utm18"][0]]}
    n = {z.name: len(z.tiles) for z in zones}
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"embed_tiles": ["r0001_c0001"]}))  # that id in both zones
    report = embed_area(cfg)
    assert report["crs"] == ["EPSG:32617", "EPSG:32618"] and report["tiles"] == sum(n.values())
    assert report["encoded"] == sum(n.values()) and report["skipped_finished"] == 0
    assert sorted(report["failed"]) == ["utm17/r0001_c0001", "utm18/r0001_c0001"]
    for z in zones:  # every tile of every zone accounted for, per zone
        zr = report["zones"][z.name]
        assert zr["tiles"] == n[z.name] and zr["grid"]["crs"] == z.grid.crs and list(zr["failed"]) == ["r0001_c0001"]
    assert json.loads((out / "report.json").read_text())["failed"] == report["failed"]
    shutil.copytree(out / "embeddings.zarr", tmp_path / "float.zarr")
    check_tiles_match_encode(cfg, zones, tifs)

    monkeypatch.delenv(FAULTS_ENV)
    cfg.int8 = True
    report2 = embed_area(cfg)
    assert report2["encoded"] == 2 and report2["skipped_finished"] == sum(n.values()) - 2 and not report2["failed"]
    assert {k: v["encoded"] for k, v in report2["zones"].items()} == {"utm17": 1, "utm18": 1}

    # the zarr: one group per zone, each with its zone's CRS, transform and coordinates; one int8 scale
    root = zarr.open_group(str(out / "embeddings.zarr"), mode="r")
    assert root.attrs["olmoearth:groups"] == ["utm17", "utm18"] and sorted(root.group_keys()) == ["utm17", "utm18"]
    scale = root.attrs["geoemb:quantization"]["scale"]["scale"]
    for z in zones:
        g = z.grid
        ds = xr.open_zarr(out / "embeddings.zarr", group=z.name)
        assert ds.rio.crs.to_epsg() == int(g.crs.split(":")[1])
        assert ds["embedding"].shape == (128, g.height // 4, g.width // 4)
        assert float(ds["x"][0]) == g.x0 + 20 and float(ds["y"][0]) == g.y0 - 20
        assert root[z.name].attrs["spatial:transform"] == [40.0, 0.0, g.x0, 0.0, -40.0, g.y0]
        assert float(ds["embedding"].encoding["scale_factor"]) == scale
        emb = ds["embedding"].values
        assert np.isfinite(emb).all()  # the rerun filled the failed tiles
        # the float map of run 1 agrees with the int8 map away from the tile that failed there (its overlaps
        # blended differently)
        f = xr.open_zarr(tmp_path / "float.zarr", group=z.name)["embedding"].values
        both = np.isfinite(f)
        bad = next(t for t in z.tiles if t.id == "r0001_c0001")
        both[:, bad.y // 4 : bad.y // 4 + 16, bad.x // 4 : bad.x // 4 + 16] = False
        assert both.mean() > 0.2 and np.abs(f[both] - emb[both]).max() <= 0.51 * scale + 1e-6
        cog = rioxarray.open_rasterio(out / f"embeddings_{z.name}.tif")
        assert cog.rio.crs == ds.rio.crs and cog.shape == emb.shape
        assert np.allclose(cog.rio.bounds(), (g.x0, g.y0 - g.height * 10, g.x0 + g.width * 10, g.y0))
        assert (out / f"preview_{z.name}.png").stat().st_size > 500
    assert not (out / "embeddings.tif").exists()

    item = json.loads((out / "item.json").read_text())
    assert {"embeddings_utm17", "embeddings_utm18", "embeddings_zarr"} <= set(item["assets"])
    assert item["assets"]["embeddings_utm17"]["href"] == "./embeddings_utm17.tif"
    assert item["assets"]["embeddings_utm18"]["proj:code"] == "EPSG:32618"
    assert item["bbox"][0] < BBOX[0] + 0.001 and item["bbox"][2] > BBOX[2] - 0.001  # both zones' footprint

    chips = pq.read_table(out / "chips.parquet").to_pydict()
    by_zone = {c.split("_")[0] for c in chips["chip"]}
    assert by_zone == {"utm17", "utm18"}
    for chip, crs in zip(chips["chip"], chips["grid_crs"], strict=True):
        assert crs == {"utm17": "EPSG:32617", "utm18": "EPSG:32618"}[chip.split("_")[0]]


def check_tiles_match_encode(cfg, zones, tifs) -> None:
    """Every ok tile's tokens (the tile store of its zone) equal a direct encode of the pixels of that tile on the
    zone's grid; a tile away from the meridian reads its own zone's file pixel for pixel; the map's top-left
    tokens (reached by tile r0000_c0000 alone) are that tile's."""
    import xarray as xr

    from pipelines.common.storage import Storage
    from pipelines.imagery.sources import GeoTiffSource
    from serve.embedder import Embedder
    from serve.mapping.tile_store import finished_tiles, load_tiles
    from serve.mapping.zones import zone_out

    storage, embedder = Storage(), Embedder("random:nano:7")
    source = GeoTiffSource(cfg.geotiffs, [4], storage)
    for z in zones:
        done = finished_tiles(storage, zone_out(cfg, z))
        got = load_tiles(storage, zone_out(cfg, z), [s["file"] for s in done.values() if s["status"] == "ok"])
        assert sorted(done) == sorted(t.id for t in z.tiles) and len(got) == len(z.tiles) - 1
        for t in z.tiles:
            if t.id not in got:
                continue
            x = source.read(t, z.grid)
            direct, _ = embedder.embed({MOD: x[MOD][None]}, np.array([[4]]), 4)
            np.testing.assert_allclose(got[t.id], direct[0], atol=1e-5, rtol=1e-5)
        # the westmost tile of zone 17 and the eastmost of zone 18 lie away from the other zone's file
        far = min(z.tiles, key=lambda t: t.x) if z.name == "utm17" else max(z.tiles, key=lambda t: t.x)
        px = tifs[z.name][1][far.y : far.y + 64, far.x : far.x + 64]
        np.testing.assert_array_equal(source.read(far, z.grid)[MOD][: px.shape[0], : px.shape[1], 0], px)
        first = next(t for t in z.tiles if t.id == "r0000_c0000")
        xs = sorted({t.x for t in z.tiles})[1] // 4
        ys = sorted({t.y for t in z.tiles})[1] // 4
        emb = xr.open_zarr(cfg.out + "/embeddings.zarr", group=z.name)["embedding"].values  # (D, h, w)
        np.testing.assert_allclose(np.moveaxis(emb[:, :ys, :xs], 0, -1), got[first.id][:ys, :xs], atol=1e-5)


def test_a_zone_without_data_is_reported_and_left_out(ray_cluster, tmp_path):
    """Input for the west of zone 17 only (no zone 18 tile reaches it): zone 18's tiles are all reported empty,
    the map holds the utm17 group and COG only."""
    import zarr

    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.embed_area import embed_area
    from serve.mapping.plan import plan_zones

    out = tmp_path / "map"
    cfg = EmbedAreaConfig(bbox=BBOX, months=[4], model_uri="random:nano:7", patch_size=4, tile_size=64, overlap=16,
                          out=str(out), formats=["cog", "zarr"], preview=False)  # fmt: skip
    zones = plan_zones(cfg)
    cfg.geotiffs = {MOD: [write_zone_tifs(zones[:1], tmp_path, width=40)["utm17"][0]]}
    report = embed_area(cfg)
    z17, z18 = report["zones"]["utm17"], report["zones"]["utm18"]
    assert z18["empty"] == sorted(t.id for t in zones[1].tiles) and not report["failed"]
    west = {t.id for t in zones[0].tiles if t.x < 40}  # zone 17 tiles reaching the file
    assert set(z17["empty"]) == {t.id for t in zones[0].tiles} - west and z17["encoded"] == len(zones[0].tiles)
    assert sorted(report["empty"]) == sorted([f"utm17/{i}" for i in z17["empty"]] + [f"utm18/{i}" for i in z18["empty"]])
    assert zarr.open_group(str(out / "embeddings.zarr"), mode="r").attrs["olmoearth:groups"] == ["utm17"]
    assert (out / "embeddings_utm17.tif").exists() and not (out / "embeddings_utm18.tif").exists()
    assert set(json.loads((out / "item.json").read_text())["assets"]) == {"embeddings_utm17", "embeddings_zarr"}
