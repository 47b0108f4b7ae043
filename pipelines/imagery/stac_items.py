"""STAC items -> the small, picklable records the workers read from (`item_record`), and the boxes they cover
(`native_footprint`, `item_bounds`): which asset holds each registry band, the cloud mask, the item's month
on the job's timeline, its radiometric rule (`pipelines.imagery.units`) and its footprint, exact from the
projection extension when the item has it. `pipelines.imagery.stac` searches the items and reads them."""

from __future__ import annotations

import datetime as dt

import numpy as np
from affine import Affine

from olmoearth.modalities import MODALITIES
from pipelines.imagery import units
from pipelines.imagery.grid import bbox_to_crs
from pipelines.imagery.sources import as_crs

# registry band -> asset keys tried in order: Planetary Computer / Copernicus names, Earth Search names
ASSET_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "sentinel2_l2a": {"B01": ("B01", "coastal"), "B02": ("B02", "blue"), "B03": ("B03", "green"),
                      "B04": ("B04", "red"), "B05": ("B05", "rededge1"), "B06": ("B06", "rededge2"),
                      "B07": ("B07", "rededge3"), "B08": ("B08", "nir"), "B8A": ("B8A", "nir08"),
                      "B09": ("B09", "nir09"), "B11": ("B11", "swir16"), "B12": ("B12", "swir22")},
    "sentinel1": {"vv": ("vv", "VV"), "vh": ("vh", "VH")},
    "landsat": {"B1": ("B1", "coastal"), "B2": ("B2", "blue"), "B3": ("B3", "green"), "B4": ("B4", "red"),
                "B5": ("B5", "nir08"), "B6": ("B6", "swir16"), "B7": ("B7", "swir22"), "B8": ("B8", "pan"),
                "B9": ("B9", "cirrus"), "B10": ("B10", "lwir11", "lwir"), "B11": ("B11", "lwir12")},
}  # fmt: skip
MASK_KEYS = {"sentinel2_l2a": ("SCL", "scl"), "landsat": ("qa_pixel", "QA_PIXEL")}  # cloud mask asset


def item_month(when: str, first: tuple[int, int]) -> int:
    """Index on the timeline of an item's acquisition time (ISO, UTC)."""
    d = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
    return (d.year - first[0]) * 12 + d.month - first[1]


def asset_keys(modality: str, overrides: dict | None) -> dict[str, tuple[str, ...]]:
    """Registry band -> asset keys to try; `overrides` {band: key} (from the job's `assets`) comes first."""
    keys = {b: ASSET_KEYS[modality][b] for b in MODALITIES[modality].bands}
    for band, key in (overrides or {}).items():
        if band not in keys and band != "mask":
            raise ValueError(f"assets.{modality}: {band!r} is not a band of {modality} {list(keys)}")
        keys[band] = (key,)
    return keys


def item_record(d: dict, modality: str, first: tuple[int, int], overrides: dict | None) -> dict:
    """The small, picklable record of one item that the workers read from; a ValueError naming the item (and
    collection) when it lacks a band, says a CRS that cannot be used, or holds the wrong product."""
    props, assets = d.get("properties", {}), d.get("assets", {})
    name = f"item {d.get('id')!r} of collection {d.get('collection')!r}"
    keys = asset_keys(modality, overrides)
    mask_keys = keys.pop("mask", None) or MASK_KEYS.get(modality, ())
    hrefs, missing = {}, []
    for band, cands in keys.items():
        key = next((k for k in cands if k in assets), None)
        if key is None:
            missing.append(band)
        else:
            hrefs[band] = (key, assets[key]["href"])
    if missing:
        raise ValueError(f"stac: {name} has no asset for {modality} band(s) {missing} (its assets: "
                         f"{sorted(assets)}); map them with assets: {{{modality}: {{band: asset key}}}}")  # fmt: skip
    if modality == "landsat" and units.landsat_level2(props, str(d.get("collection", ""))):
        raise ValueError(f"stac: {name} is Landsat Collection 2 Level-2 (surface reflectance); the model takes "
                         "Level-1 DNs (docs/input_conventions.md): use a Level-1 collection")  # fmt: skip
    _check_crs(props, name)
    mask_key = next((k for k in mask_keys if k in assets), None)
    when = props.get("datetime") or props.get("start_datetime")
    first_band = assets[hrefs[MODALITIES[modality].bands[0]][0]]
    self_href = next((link.get("href") for link in d.get("links", []) if link.get("rel") == "self"), None)
    rec = {"id": d.get("id"), "collection": d.get("collection"), "href": self_href, "modality": modality, "datetime": when,
           "k": item_month(when, first), "cloud": float(props.get("eo:cloud_cover", 0.0) or 0.0),
           "bbox": d.get("bbox"), "footprint": native_footprint(d), "assets": hrefs,
           "mask": (mask_key, assets[mask_key]["href"]) if mask_key else None, "offset": 0.0, "db": False}  # fmt: skip
    if modality == "sentinel2_l2a":
        rec["offset"] = units.s2_dn_offset(props, first_band.get("raster:bands"))
    elif modality == "sentinel1":
        rec["db"] = units.s1_needs_db(first_band.get("raster:bands"))
    return rec


def native_footprint(d: dict) -> list | None:
    """[crs, left, bottom, right, top] of an item's rasters in their own CRS, from the projection extension:
    the item's `proj:bbox`, else the union of its assets' (or the item's) `proj:transform` + `proj:shape`.
    None when the item does not say (its lon/lat bbox is used instead). The exact extent matters: the lon/lat
    bbox taken into a UTM grid is larger, so the scenes next to a cell would be opened for it."""
    props = d.get("properties", {})

    def crs_of(fields: dict) -> str | None:
        return fields.get("proj:code") or (f"EPSG:{fields['proj:epsg']}" if fields.get("proj:epsg") else None)

    crs = crs_of(props)
    if crs and len(props.get("proj:bbox") or ()) == 4:
        return [crs, *map(float, props["proj:bbox"])]
    boxes = []
    for fields in [a for a in d.get("assets", {}).values() if "proj:shape" in a] or [props]:
        t, shape, c = fields.get("proj:transform"), fields.get("proj:shape"), crs_of(fields) or crs
        if not (t and shape and c and len(t) >= 6 and len(shape) == 2):
            return None
        if boxes and c != boxes[0][0]:
            return None  # assets in several CRSs: no one box
        a = Affine(*map(float, t[:6]))
        xs, ys = zip(*(a @ (col, row) for col in (0, shape[1]) for row in (0, shape[0])), strict=True)
        boxes.append((c, min(xs), min(ys), max(xs), max(ys)))
    if not boxes:
        return None
    return [boxes[0][0], min(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes),
            max(b[4] for b in boxes)]


def item_bounds(rec: dict, crs: str) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) in `crs` of an item record: its native footprint (exact when it is in `crs`),
    else its lon/lat bbox taken into `crs`, else unbounded."""
    fp = rec.get("footprint")
    if fp:
        return tuple(fp[1:]) if as_crs(fp[0]) == as_crs(crs) else bbox_to_crs(tuple(fp[1:]), fp[0], crs)
    b = rec.get("bbox")
    if not b:
        return (-np.inf, -np.inf, np.inf, np.inf)
    b = b if len(b) == 4 else [b[i] for i in (0, 1, 3, 4)]
    return bbox_to_crs(tuple(b), "EPSG:4326", crs)


def _check_crs(props: dict, name: str) -> None:
    """An item's projection (`proj:epsg` / `proj:code` / `proj:wkt2`), if it says one, must be a projected CRS
    the area grid can be warped from."""
    from rasterio.crs import CRS

    given = props.get("proj:code") or (f"EPSG:{props['proj:epsg']}" if props.get("proj:epsg") else None)
    given = given or props.get("proj:wkt2")
    if not given:
        return  # the COG's own CRS is used (and checked on read)
    try:
        crs = CRS.from_user_input(given)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"stac: {name} has a CRS the grid cannot use ({given!r}): {e}") from None
    if not crs.is_projected:
        raise ValueError(f"stac: {name} has a CRS the grid cannot use ({given!r}): not a projected CRS")
