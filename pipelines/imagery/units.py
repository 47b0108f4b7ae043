"""Raw imagery values -> model units, and coarse bands onto the 10 m grid: one definition of each.

    vals = to_model_units("sentinel1", raw)       # float32: nodata -> NaN, linear power -> dB
    good = power_to_db(vals)                      # in place (the corpus build's path), -> valid mask
    up = repeat_pixels(band_20m, 2)               # (..., h, w) -> (..., 2h, 2w), each pixel repeated

The raw format of each modality (`RAW_FORMAT`: the GeoTIFF dtype and nodata value of the raw corpus, which
the synthetic generator writes and the build validates) is what these conversions need, so it lives here.
Sentinel-1 arrives as linear backscatter power and the model sees decibels; a pixel with no positive power
(nodata, zero, NaN) has no dB value and becomes NaN. Coarser bandsets meet the 10 m grid by pixel
repetition (20 m x2, 40 m x4), as the original's data; finer ones (OpenStreetMap at 2.5 m) by taking every
f-th pixel.
"""

from __future__ import annotations

import numpy as np

from olmoearth.modalities import BASE_GSD

# modality -> (numpy dtype of the raw GeoTIFF, nodata value); None: no nodata value (every value is data)
RAW_FORMAT: dict[str, tuple[str, float | None]] = {
    "sentinel2_l2a": ("uint16", 0),
    "sentinel1": ("float32", -32768.0),
    "landsat": ("uint16", 0),
    "worldcover": ("uint8", 0),
    "srtm": ("int16", -32768),
    "openstreetmap_raster": ("uint8", None),
    "wri_canopy_height_map": ("uint8", 255),
    "cdl": ("uint8", 0),
    "worldcereal": ("uint8", 255),
}
# 10 log10(x) = ln(x) * 10 / ln 10: numpy's natural log is the faster of the two on large arrays
_DB_PER_NEPER = np.float32(10.0 / np.log(10.0))


def power_to_db(vals: np.ndarray, fill=np.nan) -> np.ndarray:
    """In place: float linear power -> dB where it is > 0, `fill` elsewhere. Returns that valid mask."""
    good = vals > 0
    np.log(vals, out=vals, where=good)
    vals *= _DB_PER_NEPER
    np.copyto(vals, vals.dtype.type(fill), where=~good)
    return good


def db_to_power(vals: np.ndarray) -> np.ndarray:
    """The inverse of `power_to_db`: float dB -> float32 linear power 10^(dB / 10); NaN stays NaN."""
    return np.power(np.float32(10.0), np.asarray(vals, np.float32) / np.float32(10.0))


def nodata_to_nan(modality: str, arr: np.ndarray) -> np.ndarray:
    """A float32 copy of an integer raster with its modality's nodata value as NaN (float input: cast only)."""
    out = arr.astype(np.float32)
    nodata = RAW_FORMAT[modality][1]
    if arr.dtype.kind != "f" and nodata is not None:
        out[arr == nodata] = np.nan
    return out


def to_model_units(modality: str, raw: np.ndarray) -> np.ndarray:
    """Raw values -> float32 model units: nodata -> NaN, Sentinel-1 linear power -> dB."""
    out = nodata_to_nan(modality, raw)
    if modality == "sentinel1":
        power_to_db(out)  # its nodata (-32768) is not a positive power
    return out


def from_model_units(modality: str, vals: np.ndarray) -> np.ndarray:
    """The inverse of `to_model_units`: float model units (NaN = missing) -> the raw GeoTIFF dtype of
    `modality` with its nodata value; Sentinel-1 dB -> linear power. Integer modalities are rounded and
    clipped to their dtype's range; a valid value that would land on the nodata value (0 reflectance where
    0 is nodata) is moved one step off it, so that no observed pixel reads back as missing."""
    dtype, nodata = RAW_FORMAT[modality]
    missing = np.isnan(vals)
    if modality == "sentinel1":
        out = db_to_power(vals)
    else:
        info = np.iinfo(dtype)
        lo, hi = info.min, info.max
        if nodata is not None:  # keep valid values off the nodata value at either end of the range
            lo, hi = (lo + 1, hi) if nodata == info.min else (lo, hi - 1) if nodata == info.max else (lo, hi)
        out = np.clip(np.rint(np.where(missing, 0, vals)), lo, hi)
        if nodata is not None and lo <= nodata <= hi:
            out[out == nodata] = nodata + 1 if nodata + 1 <= hi else nodata - 1
    out = out.astype(dtype)
    if nodata is not None:
        out[missing] = nodata
    elif missing.any():
        raise ValueError(f"{modality}: has no nodata value in the raw format, but {int(missing.sum())} values are NaN")
    return out


def repeat_pixels(arr: np.ndarray, factor: int) -> np.ndarray:
    """(..., h, w) -> (..., h * factor, w * factor): each pixel repeated factor x factor times."""
    if factor == 1:
        return arr
    return np.repeat(np.repeat(arr, factor, axis=-2), factor, axis=-1)


def to_10m(arr: np.ndarray, resolution: float) -> np.ndarray:
    """(..., h, w) at `resolution` metres per pixel -> the 10 m grid: coarser pixels repeated, finer strided."""
    if resolution > BASE_GSD:
        return repeat_pixels(arr, int(round(resolution / BASE_GSD)))
    if resolution < BASE_GSD:
        f = int(round(BASE_GSD / resolution))
        return arr[..., ::f, ::f]
    return arr


# ----------------------------------------------------------------------------------------------------------
# Radiometric harmonisation of delivered products (a STAC item's assets) onto the corpus's units
# (docs/input_conventions.md, "Radiometry of STAC inputs", has each rule with its formula)

S2_OFFSET_BASELINE = "04.00"  # Sentinel-2 L2A products of this processing baseline on carry BOA_ADD_OFFSET
S2_BOA_ADD_OFFSET = -1000.0  # DN; reflectance = (DN + offset) / 10000
S2_OFFSET_SINCE = "2022-01-25"  # first day of baseline 04.00 products, for items that do not say their baseline


def s2_dn_offset(properties: dict, raster_bands: list | None = None) -> float:
    """The DN offset to add to a Sentinel-2 L2A item's band so that its values are on the pre-2022 scale the
    model was trained on (0 or -1000), from what the item records, in this order:
    1. `earthsearch:boa_offset_applied: true`: the provider already applied it -> 0 (never twice);
    2. the asset's `raster:bands` offset / scale (reflectance units): offset / scale DN (e.g. -0.1 / 1e-4);
    3. `s2:processing_baseline` >= 04.00 -> -1000, below -> 0;
    4. none of these: acquired on or after 2022-01-25 -> -1000 (the per-collection rule of sentinel-2-l2a)."""
    if properties.get("earthsearch:boa_offset_applied") is True:
        return 0.0
    for rb in raster_bands or []:
        if rb.get("offset") and rb.get("scale"):
            return float(round(rb["offset"] / rb["scale"]))
    baseline = properties.get("s2:processing_baseline")
    if baseline:
        return S2_BOA_ADD_OFFSET if _baseline_key(baseline) >= _baseline_key(S2_OFFSET_BASELINE) else 0.0
    when = str(properties.get("datetime") or properties.get("start_datetime") or "")[:10]
    return S2_BOA_ADD_OFFSET if when and when >= S2_OFFSET_SINCE else 0.0


def _baseline_key(baseline: str) -> tuple[int, int]:
    """"04.00" or "N0400" -> (4, 0)."""
    s = str(baseline).strip().upper().lstrip("N")
    major, minor = s.split(".")[:2] if "." in s else (s[:2], s[2:4] or "0")
    return int(major), int(minor)


def harmonise_s2(vals: np.ndarray, offset: float) -> np.ndarray:
    """In place: float32 DN (NaN = nodata) + offset, floored at 0 (DN below -offset have no reflectance
    left), as the pre-2022 products. offset 0 leaves the values untouched."""
    if offset:
        np.add(vals, np.float32(offset), out=vals)
        np.maximum(vals, 0, out=vals)  # NaN stays NaN
    return vals


def s1_needs_db(raster_bands: list | None) -> bool:
    """Whether a Sentinel-1 asset holds linear power (GRD / RTC as delivered: convert with `power_to_db`) or
    says it is already in decibels (`raster:bands` unit "dB")."""
    return not any(str(rb.get("unit", "")).lower() == "db" for rb in raster_bands or [])


def landsat_level2(properties: dict, collection: str) -> bool:
    """Whether a Landsat item is Collection 2 Level-2 (surface reflectance / temperature), which has no exact
    way back to the Level-1 DNs the model was trained on."""
    corr = str(properties.get("landsat:correction", "")).upper()
    return corr.startswith("L2") or "-l2" in collection.lower()
