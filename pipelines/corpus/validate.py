"""Validation of the raw corpus: one file against the layout, one sample read into stored form.

    bands, months, meta = load_bandsets(sid, files, periods, storage, with_stats=True)

Every problem with the data raises `RejectError` (a ValueError) carrying a short `reason` code, the
offending file and a human detail; the corpus build turns these into its rejects report. Reason codes:
see REASONS. A file's header (CRS, size, transform, dtype, band count) is checked before its pixels are
decoded, so a wrong-sized file costs no more memory than a right one. Anything else that goes wrong is a
bug, not a property of the sample, and is left to propagate (the corpus build retries read errors itself
and files those that persist as `unreadable`).
"""

from __future__ import annotations

import numpy as np

from olmoearth.modalities import BASE_GSD, MODALITIES, get_modality
from pipelines.common.storage import Storage
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.stored import stored_fill
from pipelines.imagery.geotiff import GeoTiffError, GeoTiffVanished, read_geotiff
from pipelines.imagery.units import RAW_FORMAT, power_to_db, to_10m

REASONS = {
    "bad_name": "file name does not follow EPSG:<code>_<col>_<row>_<resolution>.tif",
    "corrupt": "not a readable GeoTIFF (corrupt or truncated)",
    "wrong_crs": "CRS differs from the EPSG code of the file name",
    "wrong_transform": "transform is not the cell's grid at the stored resolution",
    "wrong_size": "width/height differ from 2560 m / resolution",
    "wrong_dtype": "dtype differs from the modality's raw dtype",
    "missing_bands": "band count does not match the modality (x timesteps), or a bandset file is absent",
    "missing_timesteps": "a multi-temporal file has no rows in its modality's timestep CSV",
    "timeline": "the sample's timestep CSV rows span more than 12 periods of 30 days",
    "all_nodata": "every pixel of a file is nodata",
    "no_spacetime_modality": "the sample has no Sentinel-2, Sentinel-1 or Landsat data",
    "vanished": "a file listed when planning was gone when read",
    "unreadable": "reading a file failed on every retry (an I/O error, not the data); every rerun retries it",
    "duplicate_file": "a second spelling of a file already listed (`_10.0.tif` beside `_10.tif`); not read",
}
F16_MAX = 65504.0  # largest float16


class RejectError(ValueError):
    def __init__(self, reason: str, file: str, detail: str):
        assert reason in REASONS, reason
        self.reason, self.file, self.detail = reason, file, detail
        super().__init__(f"{file}: {reason}: {detail}")


# ----------------------------------------------------------------------------------------------------------
# One file


def read_raw(uri_or_bytes, storage: Storage | None = None, name: str | None = None, check=None
             ) -> tuple[np.ndarray, dict]:  # fmt: skip
    """`read_geotiff` for a raw corpus file: its failures as RejectError("vanished" | "corrupt"). check(profile):
    called on the header before any pixel is decoded; its RejectError propagates."""
    try:
        return read_geotiff(uri_or_bytes, storage, name=name, check=check)
    except GeoTiffVanished as e:
        raise RejectError("vanished", e.file, e.detail) from None
    except GeoTiffError as e:
        raise RejectError("corrupt", e.file, e.detail) from None


def check_file(profile: dict, uri: str, modality: str, epsg: int, col: int, row: int, resolution: float,
               n_images: int | None) -> None:  # fmt: skip
    """Validate one raw file's header (`profile` of pipelines/imagery/geotiff.py) against the layout; raise
    RejectError naming it."""
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
    dtype, _ = RAW_FORMAT[modality]
    if str(profile["dtype"]) != dtype:
        raise RejectError("wrong_dtype", uri, f"dtype {profile['dtype']}, expected {dtype}")
    c = mod.bandsets[rl.bandset_index(modality, resolution)].num_bands
    if mod.temporal:
        if not n_images:
            raise RejectError("missing_timesteps", uri, f"no rows for this sample in {mod.raw_folder}.csv")
        if profile["count"] != n_images * c:
            raise RejectError(
                "missing_bands", uri, f"{profile['count']} bands, expected {n_images} timesteps x {c}"
            )
    elif profile["count"] != c:
        raise RejectError("missing_bands", uri, f"{profile['count']} bands, expected {c}")


# ----------------------------------------------------------------------------------------------------------
# One sample


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
    sample = _Sample(sid, epsg, col, row, read or storage.read_bytes, with_stats, float_dtype)
    slots, months = _timeline(sid, files, periods)
    bands, stats = {}, {}
    for name in MODALITIES:
        if name in files:
            n_img = len(periods.get(name, [])) if MODALITIES[name].temporal else None
            bands[name], stats[name] = sample.modality(name, files[name], n_img, slots.get(name), len(months))
    meta = {
        "crs": f"EPSG:{epsg}",
        "transform": tuple(rl.cell_transform(col, row))[:6],
        "bounds": rl.cell_bounds(col, row),
        "bytes": sample.nbytes,
    }
    if with_stats:
        meta["stats"] = stats
    return bands, months, meta


def _timeline(sid: str, files: dict[str, list[str]], periods: dict[str, list]):
    """The sample's timeline from its temporal modalities' periods (rl.sample_timeline) -> (slots, months)."""
    temporal = [m for m in files if m in MODALITIES and MODALITIES[m].temporal]
    if not temporal:
        some = next((u for us in files.values() for u in us), sid)
        raise RejectError("no_spacetime_modality", some, f"sample {sid} has only {sorted(files)}")
    try:
        return rl.sample_timeline({m: periods.get(m, []) for m in temporal})
    except ValueError as e:  # the timestep CSV puts the images too far apart
        raise RejectError("timeline", files[temporal[0]][0], f"sample {sid}: {e}") from None


class _Sample:
    """One sample's reading state: where it is, how to read a file, and the raw bytes read so far."""

    def __init__(self, sid, epsg, col, row, read, with_stats, float_dtype):
        self.sid, self.epsg, self.col, self.row = sid, epsg, col, row
        self.read, self.with_stats, self.float_dtype = read, with_stats, float_dtype
        self.nbytes = 0

    def modality(self, name: str, uris: list[str], n_img, slots, T: int) -> tuple[list, np.ndarray]:
        """Every bandset of one modality in stored form, on the timeline -> (arrays, stats (5, C))."""
        mod = MODALITIES[name]
        by_res = {rl.parse_sample_name(u)[3]: u for u in uris}
        st = np.zeros((5, mod.num_bands))
        arrays = []
        for bs, sl in zip(mod.bandsets, mod.bandset_slices(), strict=True):
            uri = by_res.get(bs.resolution)
            if uri is None:
                raise RejectError(
                    "missing_bands", uris[0], f"{name} lacks its {bs.resolution:g} m bandset file"
                )
            vals, st_b = self.bandset(name, uri, bs.resolution, bs.num_bands, n_img)
            if self.with_stats:
                st[:, sl] = st_b
            if mod.temporal and not np.array_equal(slots, np.arange(T)):
                on_timeline = np.full((T, *vals.shape[1:]), stored_fill(name), vals.dtype)
                on_timeline[slots] = vals
                vals = on_timeline
            arrays.append(vals)
        return arrays, st

    def bandset(self, name: str, uri: str, resolution: float, c: int, n_img):
        """One file: read, validate, to stored form -> (values (n_img | 1, c, n, n), stats (5, c) or None)."""
        try:
            data = self.read(uri)
        except FileNotFoundError as e:
            raise RejectError("vanished", uri, str(e)) from None
        self.nbytes += len(data)
        arr, _ = read_raw(data, name=uri, check=lambda profile: check_file(
            profile, uri, name, self.epsg, self.col, self.row, resolution, n_img))  # fmt: skip
        if resolution < BASE_GSD:  # OSM 2.5 m: every 4th pixel, as the original
            arr = np.ascontiguousarray(to_10m(arr, resolution))
        if arr.dtype.kind == "f":
            return _s1_to_stored(arr, c, self.with_stats, uri, self.float_dtype)
        return _int_to_stored(name, arr, c, self.with_stats, uri)


def _s1_to_stored(arr: np.ndarray, c: int, with_stats: bool, uri: str, float_dtype=np.float16):
    """Sentinel-1 linear power (n_img*C, n, n) -> (dB (n_img, C, n, n) in float_dtype, NaN = nodata; stats).
    Converted in place on the freshly decoded array. Raises RejectError("all_nodata")."""
    vals = arr.reshape(-1, c, *arr.shape[-2:])
    good = power_to_db(vals, fill=0)  # nodata (-32768), zero and NaN power have no dB value
    if not good.any():
        raise RejectError("all_nodata", uri, "every pixel is nodata")
    st = _float_stats(vals, good) if with_stats else None
    np.copyto(vals, np.float32(np.nan), where=~good)
    if float_dtype == np.float16:
        np.clip(vals, -F16_MAX, F16_MAX, out=vals)
    return vals.astype(float_dtype, copy=False), st


def _int_to_stored(name: str, arr: np.ndarray, c: int, with_stats: bool, uri: str):
    """An integer raster (n_img*C | C, n, n) -> (the same values as (n_img | 1, C, n, n), no copy; stats).
    Statistics are exact (integer sums) and take a few reductions, no histogram or sort.
    Raises RejectError("all_nodata")."""
    _, nodata = RAW_FORMAT[name]
    vals = arr.reshape(-1, c, *arr.shape[-2:])
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
