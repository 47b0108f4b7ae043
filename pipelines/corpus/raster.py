"""Raster I/O of the raw corpus: read one GeoTIFF (validated), one whole sample onto its 10 m grid.

    arr, profile = read_geotiff("s3://raw/10_srtm/EPSG:32618_12_-170_10.tif", storage)   # (bands, H, W)
    x, months, meta = read_sample("s3://raw", "EPSG:32618_12_-170", storage)
        # x: {modality: float32 (256, 256, T, C)} NaN where missing; months: int64 (T,); meta: crs/transform/bounds

Every problem raises `RejectError` (a ValueError) carrying a short `reason` code, the offending file and
a human detail; the corpus build turns these into its rejects report. Reason codes: see REASONS.

Values come out in model units: nodata -> NaN, Sentinel-1 linear power -> dB. Bandsets are brought onto
the 10 m grid as the original does: coarser bandsets by pixel repetition (20 m x2, 40 m x4), OSM 2.5 m by
taking every 4th pixel. The corpus build keeps bandsets in *stored* form instead (`load_bandsets`: raw dtype
at max(resolution, 10 m), S1 as float16 dB) and the training stream grids only the crops it cuts
(`grid_crop`), which gives the same values as gridding the whole sample first.
"""

from __future__ import annotations

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile

from olmoearth.modalities import BASE_GSD, MODALITIES, TILE_SIZE, get_modality
from pipelines.common.storage import Storage, is_s3
from pipelines.corpus import raw_layout as rl

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
F16_MAX = 65504.0  # largest float16


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


# How the build stores a bandset (pipelines/corpus/build.py, format 2): the raw dtype (lossless), except Sentinel-1,
# which is stored in dB as float16 (NaN = nodata); at max(stored resolution, 10 m) (OSM 2.5 m is strided to 10 m
# here, coarser bandsets keep their pixels and are repeated onto 10 m when read: `grid_crop`).


def stored_dtype(modality: str) -> np.dtype:
    return np.dtype(np.float16) if modality == "sentinel1" else np.dtype(rl.RAW_FORMAT[modality][0])


def stored_fill(modality: str):
    """The value a missing timestep holds in stored form (the nodata value; NaN for Sentinel-1)."""
    nodata = rl.RAW_FORMAT[modality][1]
    return np.nan if modality == "sentinel1" else (0 if nodata is None else nodata)


def stored_resolution(resolution: float) -> float:
    return max(float(resolution), BASE_GSD)


def stored_to_model(modality: str, a: np.ndarray) -> np.ndarray:
    """Stored values -> float32 model units (nodata -> NaN; Sentinel-1 is already dB with NaN)."""
    out = a.astype(np.float32)
    nodata = rl.RAW_FORMAT[modality][1]
    if a.dtype.kind != "f" and nodata is not None:
        out[a == nodata] = np.nan
    return out


def grid_crop(modality: str, arrays: list[np.ndarray], y0: int = 0, x0: int = 0, side: int = TILE_SIZE
              ) -> np.ndarray:  # fmt: skip
    """Stored bandsets [(T_m, C_bs, n, n) per bandset] -> float32 (side, side, T_m, C) model units of the 10 m
    crop at rows y0.., columns x0..; coarser bandsets are repeated onto 10 m (only the crop's pixels)."""
    mod = MODALITIES[modality]
    t = arrays[0].shape[0]
    out = np.empty((side, side, t, mod.num_bands), np.float32)
    for bs, sl, a in zip(mod.bandsets, mod.bandset_slices(), arrays, strict=True):
        f = int(round(stored_resolution(bs.resolution) / BASE_GSD))
        if f == 1:
            c = a[:, :, y0 : y0 + side, x0 : x0 + side]
        else:  # the coarse pixels under the crop, repeated, then cut to the crop
            cy, cx = y0 // f, x0 // f
            c = a[:, :, cy : (y0 + side - 1) // f + 1, cx : (x0 + side - 1) // f + 1]
            c = np.repeat(np.repeat(c, f, axis=2), f, axis=3)
            c = c[:, :, y0 - cy * f : y0 - cy * f + side, x0 - cx * f : x0 - cx * f + side]
        out[..., sl] = stored_to_model(modality, c).transpose(2, 3, 0, 1)
    return out


COARSEST = 4  # the largest 10 m pixels per stored pixel of any bandset (Sentinel-2 at 40 m)


def cut_stored(modality: str, arrays: list[np.ndarray], y0: int, x0: int, side: int
               ) -> tuple[list[np.ndarray], int, int]:  # fmt: skip
    """The stored pixels under a 10 m crop (copies, all timesteps), cut on a COARSEST-aligned frame so that
    every bandset starts at the same 10 m offset -> (arrays, dy, dx): `grid_crop(modality, arrays, dy, dx,
    side)` then gives the crop."""
    mod = MODALITIES[modality]
    y_a, x_a = y0 - y0 % COARSEST, x0 - x0 % COARSEST
    y_b, x_b = -(-(y0 + side) // COARSEST) * COARSEST, -(-(x0 + side) // COARSEST) * COARSEST
    out = []
    for bs, a in zip(mod.bandsets, arrays, strict=True):
        f = int(round(stored_resolution(bs.resolution) / BASE_GSD))
        out.append(a[:, :, y_a // f : y_b // f, x_a // f : x_b // f].copy())
    return out, y0 - y_a, x0 - x_a


def load_sample(sid: str, files: dict[str, list[str]], periods: dict[str, list], storage: Storage,
                read=None, dtype=np.float32) -> tuple[dict, np.ndarray, dict]:  # fmt: skip
    """Read, validate and grid one sample: `load_bandsets`, then every modality onto 10 m in model units.
    Returns (x: {modality: (256, 256, T, C) in `dtype`, NaN where missing}, months, meta) as `read_sample`."""
    bands, months, meta = load_bandsets(sid, files, periods, storage, read=read, float_dtype=np.float32)
    x = {m: grid_crop(m, arrays).astype(dtype, copy=False) for m, arrays in bands.items()}
    return x, months, meta


def load_bandsets(sid: str, files: dict[str, list[str]], periods: dict[str, list], storage: Storage,
                  read=None, with_stats: bool = False, float_dtype=np.float16) -> tuple[dict, np.ndarray, dict]:  # fmt: skip
    """Read and validate one sample's files; keep every bandset in stored form (what the build writes).

    files: {modality: [uri of each bandset file present]}; periods: {modality: [(image_idx, start, end)]}
    (temporal modalities); read(uri) -> bytes (default storage.read_bytes); float_dtype: the dtype of the
    Sentinel-1 dB values (float16 is the stored form).
    Returns (bands: {modality: [stored array (T_m, C_bs, n, n) per bandset, see stored_dtype]}, months
    int64 (T,), meta {"crs", "transform", "bounds", "bytes" (raw bytes read)} plus, if with_stats,
    "stats": {modality: float64 (5, C) rows count, mean, M2, min, max over valid pixels in model units}).
    Images are placed on the sample's timeline of T slots; missing slots hold `stored_fill`.
    Raises RejectError naming the file."""
    epsg, col, row = rl.parse_sample_id(sid)
    read = read or storage.read_bytes
    temporal = [m for m in files if m in MODALITIES and MODALITIES[m].temporal]
    if not temporal:
        some = next((u for us in files.values() for u in us), sid)
        raise RejectError("no_spacetime_modality", some, f"sample {sid} has only {sorted(files)}")
    slots, months = rl.sample_timeline({m: periods.get(m, []) for m in temporal})
    T = len(months)
    bands, nbytes, stats = {}, 0, {}
    for name in MODALITIES:
        if name not in files:
            continue
        mod = MODALITIES[name]
        by_res = {rl.parse_sample_name(u)[3]: u for u in files[name]}
        n_img = len(periods.get(name, [])) if mod.temporal else None
        st = np.zeros((5, mod.num_bands))
        arrays = []
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
            if bs.resolution < BASE_GSD:  # OSM 2.5 m: every 4th pixel, as the original
                arr = np.ascontiguousarray(to_10m(arr, bs.resolution))
            c = bs.num_bands
            vals, st_b = _to_stored(name, arr, c, with_stats, uri, float_dtype)  # (n_img | 1, c, n, n)
            if with_stats:
                st[:, sl] = st_b
            if mod.temporal and not np.array_equal(slots[name], np.arange(T)):
                on_timeline = np.full((T, *vals.shape[1:]), stored_fill(name), vals.dtype)
                on_timeline[slots[name]] = vals
                vals = on_timeline
            arrays.append(vals)
        bands[name] = arrays
        stats[name] = st
    meta = {
        "crs": f"EPSG:{epsg}",
        "transform": tuple(rl.cell_transform(col, row))[:6],
        "bounds": rl.cell_bounds(col, row),
        "bytes": nbytes,
    }
    if with_stats:
        meta["stats"] = stats
    return bands, months, meta


def _to_stored(name: str, arr: np.ndarray, c: int, with_stats: bool, uri: str, float_dtype=np.float16):
    """Raw (n_img*C | C, n, n) -> (stored values (n_img | 1, C, n, n), stats (5, C) or None).
    Integer rasters are stored as they are (no copy); Sentinel-1 goes to dB (NaN = nodata) in float_dtype.
    Statistics are exact (integer sums) and take a few reductions, no histogram or sort.
    Raises RejectError("all_nodata")."""
    _, nodata = rl.RAW_FORMAT[name]
    n_side = arr.shape[-1]
    if arr.dtype.kind == "f":  # Sentinel-1 linear power -> dB, in place on the freshly decoded array
        vals = arr.reshape(-1, c, n_side, n_side)
        good = vals > 0  # nodata (-32768), zero and NaN power have no dB value
        if not good.any():
            raise RejectError("all_nodata", uri, "every pixel is nodata")
        np.log(vals, out=vals, where=good)  # natural log (vectorised) times 10 / ln 10 = 10 log10
        vals *= np.float32(10.0 / np.log(10.0))
        np.copyto(vals, np.float32(0), where=~good)
        st = _float_stats(vals, good) if with_stats else None
        np.copyto(vals, np.float32(np.nan), where=~good)
        if float_dtype == np.float16:
            np.clip(vals, -F16_MAX, F16_MAX, out=vals)
        return vals.astype(float_dtype, copy=False), st
    vals = arr.reshape(-1, c, n_side, n_side)
    flat = vals.reshape(vals.shape[0], c, -1)
    valid = None if nodata is None or nodata == 0 else flat != nodata
    if nodata is None:
        n = np.full(c, flat.shape[0] * flat.shape[2], np.int64)
    else:
        src = flat if valid is None else valid
        n = np.array([np.count_nonzero(src[:, b]) for b in range(c)], np.int64)
    if not n.any():
        raise RejectError("all_nodata", uri, "every pixel is nodata")
    if not with_stats:
        return vals, None
    return vals, _int_stats(flat, n, nodata, valid)


def _int_stats(flat: np.ndarray, n: np.ndarray, nodata, valid) -> np.ndarray:
    """flat (k, c, p) integers, n valid values per band, valid mask (None: every value but a nodata of 0
    counts) -> float64 (5, c) count, mean, M2, min, max. Sums and sums of squares are exact integers (a
    nodata of 0 adds nothing to them, so the big rasters need no mask)."""
    info = np.iinfo(flat.dtype)
    z = flat if valid is None else np.where(valid, flat, 0)
    s = z.sum(axis=(0, 2), dtype=np.int64)
    sq_dtype = np.uint32 if info.min == 0 and info.bits <= 16 else np.int64  # squares of uint16 fit uint32
    sq_v = z.astype(sq_dtype)
    np.multiply(sq_v, sq_v, out=sq_v)
    sq = sq_v.sum(axis=(0, 2), dtype=np.uint64 if sq_dtype == np.uint32 else np.int64)
    if valid is not None:
        lo = np.where(valid, flat, info.max).min(axis=(0, 2))
        hi = np.where(valid, flat, info.min).max(axis=(0, 2))
    elif nodata == 0 and info.min == 0:  # unsigned, nodata 0: x - 1 wraps 0 to the top
        lo = (flat - flat.dtype.type(1)).min(axis=(0, 2)).astype(np.int64) + 1
        hi = flat.max(axis=(0, 2))
    else:
        lo, hi = flat.min(axis=(0, 2)), flat.max(axis=(0, 2))
    out = np.zeros((5, len(n)))
    for b in range(len(n)):
        nb, sb, qb = int(n[b]), int(s[b]), int(sq[b])
        if nb == 0:
            out[:, b] = [0, 0, 0, np.inf, -np.inf]
        else:  # M2 = sum(x^2) - sum(x)^2 / n, in exact integers
            out[:, b] = [nb, sb / nb, (qb * nb - sb * sb) / nb, float(lo[b]), float(hi[b])]
    return out


def _float_stats(z: np.ndarray, good: np.ndarray) -> np.ndarray:
    """z (k, c, h, w) float32 holding 0 where not good -> float64 (5, c) count, mean, M2, min, max of the
    good values."""
    c = z.shape[1]
    v, g = z.reshape(z.shape[0], c, -1), good.reshape(z.shape[0], c, -1)
    n = np.array([np.count_nonzero(g[:, b]) for b in range(c)], np.float64)
    s = v.sum(axis=(0, 2), dtype=np.float64)
    mean = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
    zc = v - mean.astype(np.float32)[None, :, None]  # centred: no cancellation
    np.copyto(zc, np.float32(0), where=~g)
    m2 = np.einsum("kcp,kcp->c", zc, zc, dtype=np.float64)
    lo = np.where(g, v, np.float32(np.inf)).min(axis=(0, 2)).astype(np.float64)
    hi = np.where(g, v, np.float32(-np.inf)).max(axis=(0, 2)).astype(np.float64)
    out = np.stack([n, mean, m2, lo, hi])
    out[3:, n == 0] = [[np.inf], [-np.inf]]
    return out


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
