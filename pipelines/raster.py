"""Raster I/O of the raw corpus: read one GeoTIFF (validated), one whole sample onto its 10 m grid.

    arr, profile = read_geotiff("s3://raw/10_srtm/EPSG:32618_12_-170_10.tif", storage)   # (bands, H, W)
    x, months, meta = read_sample("s3://raw", "EPSG:32618_12_-170", storage)
        # x: {modality: float32 (256, 256, T, C)} NaN where missing; months: int64 (T,); meta: crs/transform/bounds

Every problem raises `RejectError` (a ValueError) carrying a short `reason` code, the offending file and
a human detail; the corpus build turns these into its rejects report. Reason codes: see REASONS.

Values come out in model units: nodata -> NaN, Sentinel-1 linear power -> dB. Bandsets are brought onto
the 10 m grid as the original does: coarser bandsets by pixel repetition (20 m x2, 40 m x4), OSM 2.5 m by
taking every 4th pixel.
"""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile

from olmoearth.modalities import BASE_GSD, MODALITIES, TILE_SIZE, get_modality
from pipelines import raw_layout as rl
from pipelines.storage import Storage, is_s3

REASONS = {
    "bad_name": "file name does not follow EPSG:<code>_<col>_<row>_<resolution>.tif",
    "corrupt": "not a readable GeoTIFF (corrupt or truncated)",
    "wrong_crs": "CRS differs from the EPSG code of the file name",
    "wrong_transform": "transform is not the cell's grid at the stored resolution",
    "wrong_size": "width/height differ from 2560 m / resolution",
    "wrong_dtype": "dtype differs from the modality's raw dtype",
    "missing_bands": "band count does not match the modality (x timesteps), or a bandset file is absent",
    "missing_timesteps": "a multi-temporal file has no rows in its modality's timestep CSV",
    "all_nodata": "every pixel of a file is nodata",
    "no_spacetime_modality": "the sample has no Sentinel-2, Sentinel-1 or Landsat data",
    "vanished": "a file listed when planning was gone when read",
}


class RejectError(ValueError):
    def __init__(self, reason: str, file: str, detail: str):
        assert reason in REASONS, reason
        self.reason, self.file, self.detail = reason, file, detail
        super().__init__(f"{file}: {reason}: {detail}")


# ----------------------------------------------------------------------------------------------------------
# One file


def read_geotiff(uri_or_bytes, storage: Storage | None = None, window=None, name: str | None = None
                 ) -> tuple[np.ndarray, dict]:  # fmt: skip
    """Read a GeoTIFF from a uri (s3:// or local) or from bytes -> (array (bands, H, W), profile).

    `window` (a rasterio Window) reads only that part; from a uri it is a ranged read (only the needed
    blocks travel). Raises RejectError("corrupt") naming the file (or `name`, for bytes) if it cannot be
    opened or decoded."""
    if name is None:
        name = "<bytes>" if isinstance(uri_or_bytes, (bytes, bytearray, memoryview)) else str(uri_or_bytes)
    try:
        if isinstance(uri_or_bytes, (bytes, bytearray, memoryview)):
            with MemoryFile(bytes(uri_or_bytes)) as mf, mf.open() as ds:
                return ds.read(window=window), _profile(ds)
        storage = storage or Storage()
        if is_s3(name):
            fs = storage.fs(name)
            with fs.open(name, "rb") as fh, rasterio.open(fh) as ds:
                return ds.read(window=window), _profile(ds)
        with rasterio.open(name) as ds:
            return ds.read(window=window), _profile(ds)
    except FileNotFoundError as e:
        raise RejectError("vanished", name, str(e)) from None
    except (RasterioError, OSError, ValueError) as e:
        raise RejectError("corrupt", name, f"cannot read GeoTIFF: {e}") from None


def _profile(ds) -> dict:
    p = dict(ds.profile)
    p["count"], p["width"], p["height"] = ds.count, ds.width, ds.height
    p["dtype"] = ds.dtypes[0] if ds.count else None
    return p


def check_file(arr: np.ndarray, profile: dict, uri: str, modality: str, epsg: int, col: int, row: int,
               resolution: float, n_images: int | None) -> None:  # fmt: skip
    """Validate one raw file against the layout; raise RejectError naming it."""
    mod = get_modality(modality)
    crs = profile.get("crs")
    if crs is None or crs.to_epsg() != epsg:
        raise RejectError("wrong_crs", uri, f"CRS {crs} but the name says EPSG:{epsg}")
    n = rl.cell_size(resolution)
    if (profile["height"], profile["width"]) != (n, n):
        raise RejectError("wrong_size", uri, f"{profile['height']}x{profile['width']} px, expected {n}x{n}")
    want, got = rl.cell_transform(col, row, resolution), profile.get("transform")
    if got is None or not got.almost_equals(want, precision=1e-6):
        raise RejectError(
            "wrong_transform", uri, f"transform {tuple(got or ())[:6]} != grid {tuple(want)[:6]}"
        )
    dtype, _ = rl.RAW_FORMAT[modality]
    if str(arr.dtype) != dtype:
        raise RejectError("wrong_dtype", uri, f"dtype {arr.dtype}, expected {dtype}")
    c = mod.bandsets[rl.bandset_index(modality, resolution)].num_bands
    if mod.temporal:
        if not n_images:
            raise RejectError("missing_timesteps", uri, f"no rows for this sample in {mod.raw_folder}.csv")
        if arr.shape[0] != n_images * c:
            raise RejectError(
                "missing_bands", uri, f"{arr.shape[0]} bands, expected {n_images} timesteps x {c}"
            )
    elif arr.shape[0] != c:
        raise RejectError("missing_bands", uri, f"{arr.shape[0]} bands, expected {c}")


def to_model_units(modality: str, arr: np.ndarray) -> np.ndarray:
    """Raw values -> float32 model units: nodata -> NaN, Sentinel-1 linear power -> dB."""
    _, nodata = rl.RAW_FORMAT[modality]
    out = arr.astype(np.float32)
    if nodata is not None:
        out[arr == nodata] = np.nan
    if modality == "sentinel1":
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(out > 0, 10.0 * np.log10(out), np.nan).astype(np.float32)
    return out


def to_10m(arr: np.ndarray, resolution: float) -> np.ndarray:
    """(..., H_r, W_r) at `resolution` -> (..., 256, 256): repeat coarser pixels, stride finer ones."""
    if resolution > BASE_GSD:
        f = int(round(resolution / BASE_GSD))
        arr = np.repeat(np.repeat(arr, f, axis=-2), f, axis=-1)
    elif resolution < BASE_GSD:
        f = int(round(BASE_GSD / resolution))
        arr = arr[..., ::f, ::f]
    assert arr.shape[-2:] == (TILE_SIZE, TILE_SIZE), arr.shape
    return arr


# ----------------------------------------------------------------------------------------------------------
# One sample


def sample_files(root_uri: str, sid: str) -> dict[str, list[str]]:
    """The uris where every bandset file of sample `sid` would be (whether or not they exist)."""
    epsg, col, row = rl.parse_sample_id(sid)
    return {
        name: [
            rl.join(root_uri, m.raw_folder, rl.file_name(epsg, col, row, bs.resolution)) for bs in m.bandsets
        ]
        for name, m in MODALITIES.items()
    }


def load_sample(sid: str, files: dict[str, list[str]], periods: dict[str, list], storage: Storage,
                read=None, dtype=np.float32, with_stats: bool = False) -> tuple[dict, np.ndarray, dict]:  # fmt: skip
    """Read, validate and grid one sample.

    files: {modality: [uri of each bandset file present]}; periods: {modality: [(image_idx, start, end)]}
    (temporal modalities); read(uri) -> bytes (default storage.read_bytes). Returns (x, months, meta) as
    `read_sample` with x in `dtype`; meta also has "bytes" (raw bytes read), "nan_share" per modality and,
    if with_stats, "stats": {modality: float64 (5, C) rows count, mean, M2, min, max over valid pixels}
    (computed at the stored resolution: pixel repetition does not change them). Raises RejectError.
    """
    epsg, col, row = rl.parse_sample_id(sid)
    read = read or storage.read_bytes
    temporal = [m for m in files if m in MODALITIES and MODALITIES[m].temporal]
    if not temporal:
        some = next((u for us in files.values() for u in us), sid)
        raise RejectError("no_spacetime_modality", some, f"sample {sid} has only {sorted(files)}")
    slots, months = rl.sample_timeline({m: periods.get(m, []) for m in temporal})
    T = len(months)
    x, nbytes, nan_share, stats = {}, 0, {}, {}
    for name in MODALITIES:
        if name not in files:
            continue
        mod = MODALITIES[name]
        by_res = {rl.parse_sample_name(u)[3]: u for u in files[name]}
        n_img = len(periods.get(name, [])) if mod.temporal else None
        out = np.full((TILE_SIZE, TILE_SIZE, T if mod.temporal else 1, mod.num_bands), np.nan, dtype)
        st = np.zeros((5, mod.num_bands))
        n_valid = 0  # values written (at 10 m), to count the NaN share without another pass
        for bs, sl in zip(mod.bandsets, mod.bandset_slices(), strict=True):
            uri = by_res.get(bs.resolution)
            if uri is None:
                raise RejectError(
                    "missing_bands", files[name][0], f"{name} lacks its {bs.resolution:g} m bandset file"
                )
            try:
                data = read(uri)
            except FileNotFoundError as e:
                raise RejectError("vanished", uri, str(e)) from None
            nbytes += len(data)
            arr, profile = read_geotiff(data, name=uri)
            check_file(arr, profile, uri, name, epsg, col, row, bs.resolution, n_img)
            res, c = bs.resolution, bs.num_bands
            if res < BASE_GSD:
                arr, res = to_10m(arr, res), BASE_GSD  # OSM: stride first, everything after is on 10 m
            vals, st_b, nv = _convert(name, arr, c, dtype, with_stats, uri)  # (n_img*C | C, h, w) in dtype
            if with_stats:
                st[:, sl] = st_b
            n_valid += nv * int(round(res / BASE_GSD)) ** 2
            _place(out, vals, res, c, slots[name] if mod.temporal else None, sl)
        x[name] = out
        stats[name] = st
        if mod.temporal and len(np.unique(slots[name])) != len(slots[name]):  # images share a slot
            nan_share[name] = float(np.count_nonzero(np.isnan(out)) / out.size)
        else:  # every valid value landed in its own cell
            nan_share[name] = float((out.size - n_valid) / out.size)
    meta = {
        "crs": f"EPSG:{epsg}",
        "transform": tuple(rl.cell_transform(col, row))[:6],
        "bounds": rl.cell_bounds(col, row),
        "bytes": nbytes,
        "nan_share": nan_share,
    }
    if with_stats:
        meta["stats"] = stats
    return x, months, meta


F16_MAX = 65504.0


def _stats(flat: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """flat (n, c, p) float32 with NaN -> float64 (5, c): count, mean, M2, min, max per band."""
    v = np.where(ok, flat, 0).transpose(1, 0, 2).reshape(flat.shape[1], -1)  # (c, n*p)
    okc = ok.transpose(1, 0, 2).reshape(flat.shape[1], -1)
    n = okc.sum(1).astype(np.float64)
    s = v.sum(1, dtype=np.float64)
    mean = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
    m2 = np.maximum((v * v).sum(1, dtype=np.float64) - n * mean * mean, 0)
    lo = np.where(okc, v, np.inf).min(1).astype(np.float64)
    hi = np.where(okc, v, -np.inf).max(1).astype(np.float64)
    return np.stack([n, mean, m2, lo, hi])


def _convert(name: str, arr: np.ndarray, c: int, dtype, with_stats: bool, uri: str):
    """Raw (n_img*C | C, h, w) -> (values in model units as `dtype`, NaN where missing; stats (5, c) or None;
    number of valid values).
    One pass per step: integer rasters go straight to `dtype` (exact for float32; for float16 the same
    rounding as via float32, values clipped to the float16 range) and their statistics come from exact
    per-band histograms; float rasters (Sentinel-1) go through float32 model units as before.
    Raises RejectError("all_nodata")."""
    _, nodata = rl.RAW_FORMAT[name]
    if arr.dtype.kind == "f":
        vals = to_model_units(name, arr)
        flat = vals.reshape(-1, c, vals.shape[-2] * vals.shape[-1])  # (n_img | 1, c, h*w)
        ok = np.isfinite(flat)
        if not ok.any():
            raise RejectError("all_nodata", uri, "every pixel is nodata")
        st = _stats(flat, ok) if with_stats else None
        if dtype != np.float32:
            vals = np.clip(vals, -F16_MAX, F16_MAX, out=vals).astype(dtype)
        return vals, st, int(np.count_nonzero(ok))
    flat = arr.reshape(-1, c, arr.shape[-2] * arr.shape[-1])  # (n_img | 1, c, h*w)
    lo_v = int(np.iinfo(arr.dtype).min)
    hists = [np.bincount((flat[:, b].ravel().astype(np.int64) - lo_v) if lo_v else flat[:, b].ravel(),
                         minlength=int(np.iinfo(arr.dtype).max) - lo_v + 1) for b in range(c)]  # fmt: skip
    n_valid = flat.size
    if nodata is not None:
        k = int(nodata) - lo_v
        n_valid -= sum(int(h[k]) for h in hists)
        if n_valid == 0:
            raise RejectError("all_nodata", uri, "every pixel is nodata")
    st = None
    if with_stats:
        st = np.zeros((5, c))
        for b, h in enumerate(hists):
            h = h.astype(np.float64)
            if nodata is not None:
                h[int(nodata) - lo_v] = 0
            v = np.arange(len(h), dtype=np.float64) + lo_v
            n = h.sum()
            if n > 0:
                mean = (h * v).sum() / n
                nz = np.flatnonzero(h)
                st[:, b] = [n, mean, max(((h * v * v).sum()) - n * mean * mean, 0), v[nz[0]], v[nz[-1]]]
            else:
                st[:, b] = [0, 0, 0, np.inf, -np.inf]
    src = arr
    if dtype == np.float16 and arr.dtype.itemsize >= 2 and int(arr.max()) > F16_MAX:
        src = np.minimum(arr, np.asarray(F16_MAX, arr.dtype))
    vals = src.astype(dtype)
    if nodata is not None:
        np.copyto(vals, np.nan, where=arr == nodata)
    return vals, st, n_valid


def _place(out: np.ndarray, vals: np.ndarray, res: float, c: int, slots, sl: slice) -> None:
    """Write one bandset (n_img*C | C, h, w) into out (256, 256, T, C_mod) at timesteps `slots` (None:
    static, timestep 0) and bands `sl`, repeating coarser pixels by broadcasting (no repeated copy)."""
    h, w = vals.shape[-2:]
    f = int(round(res / BASE_GSD)) if res > BASE_GSD else 1
    assert (h * f, w * f) == (TILE_SIZE, TILE_SIZE), (vals.shape, res)
    src = vals.reshape(-1, c, h, w).transpose(2, 3, 0, 1)[:, None, :, None]  # (h, 1, w, 1, n, c)
    o6 = out.reshape(h, f, w, f, out.shape[2], out.shape[3])  # a view
    if slots is None:
        o6[:, :, :, :, 0:1, sl] = src
    elif len(slots) and np.array_equal(slots, np.arange(slots[0], slots[0] + len(slots))):
        o6[:, :, :, :, int(slots[0]) : int(slots[0]) + len(slots), sl] = src
    else:
        o6[:, :, :, :, slots, sl] = src


_CSV_CACHE: dict = {}


def read_sample(root_uri: str, sample_id: str, storage: Storage, modalities=None,
                files: dict[str, list[str]] | None = None) -> tuple[dict, np.ndarray, dict]:  # fmt: skip
    """One sample of the raw corpus on its 10 m grid.

    -> (x: {modality: float32 (256, 256, T, C)} NaN where missing (static maps T = 1),
        months: int64 (T,) month 0..11 of each timestep,
        meta: {"crs": "EPSG:....", "transform": 6-tuple, "bounds": (left, bottom, right, top), ...})
    Modalities whose files are absent are left out of x. Raises RejectError (ValueError) naming the file."""
    if files is None:
        files = {}
        for name, uris in sample_files(root_uri, sample_id).items():
            found = [u for u in uris if storage.exists(u)]
            if found:
                files[name] = found
    files = {m: u for m, u in files.items() if m in MODALITIES and (modalities is None or m in modalities)}
    key = (root_uri, storage.endpoint)
    if key not in _CSV_CACHE:
        _CSV_CACHE.clear()
        _CSV_CACHE[key] = rl.read_timesteps(root_uri, storage)
    table = _CSV_CACHE[key]
    periods = {m: table.get(m, {}).get(sample_id, []) for m in files if MODALITIES[m].temporal}
    return load_sample(sample_id, files, periods, storage)


def geotiff_bytes(arr: np.ndarray, epsg: int, transform, nodata=None, compress: str = "zstd") -> bytes:
    """Encode (bands, H, W) as a tiled, compressed GeoTIFF in memory."""
    bands, h, w = arr.shape
    profile = dict(driver="GTiff", width=w, height=h, count=bands, dtype=str(arr.dtype), crs=f"EPSG:{epsg}",
                   transform=transform, nodata=nodata, compress=compress, tiled=w >= 256 and h >= 256,
                   interleave="band")  # fmt: skip
    if profile["tiled"]:
        profile.update(blockxsize=256, blockysize=256)
    if compress == "zstd":
        profile["zstd_level"] = 1
    with MemoryFile() as mf:
        with mf.open(**profile) as ds:
            ds.write(arr)
        return bytes(mf.read())
