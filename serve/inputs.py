"""Turn the bytes of an /embed request into model input, or a `BadRequest` naming the field at fault.

Two ways in:
    .npz   arrays named by modality, each (B, H, W, T, C) raw units (NaN = missing), plus `months` (B, T) or (T,)
    GeoTIFF one multi-band GeoTIFF per modality (multipart field named by the modality): T*C bands, time-major
            (band index t*C + c, as the raw corpus stacks timesteps), on a 10 m grid; nodata / -99999 -> NaN.
            All fields must share one grid (CRS, transform, size); the response GeoTIFF reuses it.

Everything returned is validated: known encoder modality, band count, one T for all modalities, square tile of
at most `max_tile` px, H divisible by the patch size, months 0..11, not all-NaN. This is the request path's one
validation: the embedder and the encoder behind it take what comes out of here as valid.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from olmoearth.modalities import ENCODER_MODALITIES, MAX_PATCH_SIZE, MAX_TIMESTEPS, MISSING_VALUE, MODALITIES


class BadRequest(ValueError):
    """A client error: HTTP `status` with a JSON body {"error": message, "field": field}."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status

    def to_json(self) -> dict:
        return {"error": self.message, "field": self.field}


@dataclass
class Georef:
    """Where a GeoTIFF request lies: rasterio CRS (as WKT) and affine transform of its 10 m pixels."""

    crs_wkt: str
    transform: tuple  # affine (a, b, c, d, e, f)
    width: int
    height: int


@dataclass
class EmbedInput:
    x: dict[str, np.ndarray]  # modality -> float32 (B, H, W, T, C)
    months: np.ndarray  # int64 (B, T)
    georef: Georef | None = None
    fields: list[str] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return next(iter(self.x.values())).shape[0]

    @property
    def shape_key(self) -> tuple:
        """Requests with equal keys can share one encoder forward (same modalities and (H, W, T))."""
        return tuple((m, a.shape[1:]) for m, a in sorted(self.x.items()))


@dataclass(frozen=True)
class Limits:
    max_tile: int = 256  # px per side
    max_samples: int = 64  # samples per request


def parse_patch_size(text: str | int | None, default: int) -> int:
    if text is None or text == "":
        return default
    try:
        p = int(text)
    except (TypeError, ValueError):
        raise BadRequest("patch_size", f"must be an integer 1..{MAX_PATCH_SIZE}, got {text!r}") from None
    if not 1 <= p <= MAX_PATCH_SIZE:
        raise BadRequest("patch_size", f"must be 1..{MAX_PATCH_SIZE}, got {p}")
    return p


def parse_months(value, t: int, b: int, field_name: str = "months") -> np.ndarray:
    """months: None (-> 0..T-1), a comma-separated string, or an array (T,) / (B, T); returns int64 (B, T)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return np.tile(np.arange(t, dtype=np.int64) % 12, (b, 1))
    try:
        if isinstance(value, str):
            arr = np.asarray([int(v) for v in value.replace(" ", "").split(",") if v != ""], dtype=np.int64)
        else:
            arr = np.asarray(value)
            if not np.issubdtype(arr.dtype, np.number) or np.any(arr != np.round(arr)):
                raise ValueError("not integers")
            arr = arr.astype(np.int64)
    except ValueError:
        raise BadRequest(field_name, "must be integers 0..11 (month of each timestep, January = 0)") from None
    if arr.ndim == 1:
        arr = np.tile(arr, (b, 1))
    if arr.shape != (b, t):
        raise BadRequest(field_name, f"expected {t} months (one per timestep) per sample, got shape {arr.shape}")
    if arr.min() < 0 or arr.max() > 11:
        raise BadRequest(field_name, f"months must be 0..11 (January = 0), got {arr.min()}..{arr.max()}")
    return arr


def check_modality(name: str) -> None:
    if name not in MODALITIES:
        raise BadRequest(name, f"unknown modality {name!r}; encoder inputs are {', '.join(ENCODER_MODALITIES)}")
    if name not in ENCODER_MODALITIES:
        raise BadRequest(
            name, f"{name!r} is a decode-only map, not an encoder input; use {', '.join(ENCODER_MODALITIES)}"
        )


def validate(x: dict[str, np.ndarray], months, patch_size: int, limits: Limits) -> tuple[dict, np.ndarray]:
    """Check shapes and values of x {modality: (B, H, W, T, C)}; returns (x float32, months int64 (B, T))."""
    if not x:
        raise BadRequest("body", f"no modality given; send at least one of {', '.join(ENCODER_MODALITIES)}")
    shapes = {}
    for name, a in x.items():
        check_modality(name)
        mod = MODALITIES[name]
        if a.ndim != 5:
            raise BadRequest(name, f"expected an array (B, H, W, T, C), got {a.ndim} dimensions {a.shape}")
        b, h, w, t, c = a.shape
        if c != mod.num_bands:
            raise BadRequest(name, f"expected {mod.num_bands} bands ({', '.join(mod.bands)}), got {c}")
        if h != w:
            raise BadRequest(name, f"tiles must be square, got {h} x {w} px")
        if h > limits.max_tile:
            raise BadRequest(name, f"tile of {h} x {w} px exceeds the limit of {limits.max_tile} px per side",
                             status=413)  # fmt: skip
        if h == 0 or t == 0 or b == 0:
            raise BadRequest(name, f"empty array {a.shape}")
        if h % patch_size:
            raise BadRequest("patch_size", f"tile size {h} px is not a multiple of patch size {patch_size}")
        if t > MAX_TIMESTEPS:
            raise BadRequest(name, f"at most {MAX_TIMESTEPS} timesteps, got {t}")
        if b > limits.max_samples:
            raise BadRequest(name, f"at most {limits.max_samples} samples per request, got {b}", status=413)
        if not np.issubdtype(a.dtype, np.number):
            raise BadRequest(name, f"expected numbers, got dtype {a.dtype}")
        shapes[name] = (b, h, w, t)
    if len(set(shapes.values())) > 1:
        raise BadRequest(next(iter(shapes)), f"all modalities must share (B, H, W, T); got {shapes}")
    b, _, _, t = next(iter(shapes.values()))
    out = {}
    for name, a in x.items():
        a = a.astype(np.float32, copy=False)
        a = np.where(a == MISSING_VALUE, np.float32(np.nan), a)
        if not np.isfinite(a).any():
            raise BadRequest(name, "all values are missing (NaN / nodata); nothing to embed")
        if np.isinf(a).any():
            raise BadRequest(name, "contains infinite values")
        out[name] = a
    return out, parse_months(months, t, b)


def parse_npz(data: bytes, patch_size: int, limits: Limits, months_param: str | None = None) -> EmbedInput:
    if not data.startswith(b"PK"):
        raise BadRequest("body", "not an .npz file (expected a zip archive of .npy arrays)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise BadRequest("body", f"not a readable .npz file ({type(e).__name__}: {e})") from None
    months = arrays.pop("months", None)
    if months is None:
        months = months_param
    x, months = validate(arrays, months, patch_size, limits)
    return EmbedInput(x, months, fields=sorted(x))


def read_geotiff_field(name: str, data: bytes) -> tuple[np.ndarray, Georef]:
    """One multipart GeoTIFF field -> (H, W, T*C) float32 with NaN for nodata, and its grid."""
    from pipelines.imagery.geotiff import GeoTiffError, read_geotiff

    try:
        arr, prof = read_geotiff(data, name=name)
    except GeoTiffError as e:
        raise BadRequest(name, f"not a readable GeoTIFF ({e.detail})") from None
    if prof.get("crs") is None:
        raise BadRequest(name, "GeoTIFF has no CRS; georeferenced input is required")
    geo = Georef(prof["crs"].to_wkt(), tuple(prof["transform"])[:6], prof["width"], prof["height"])
    arr = arr.astype(np.float32)  # (bands, H, W)
    nodata = prof.get("nodata")
    if nodata is not None and not np.isnan(nodata):
        arr[arr == nodata] = np.nan
    return np.moveaxis(arr, 0, -1), geo


def parse_geotiffs(files: dict[str, bytes], patch_size: int, limits: Limits, months: str | None) -> EmbedInput:
    """files: modality -> GeoTIFF bytes (T*C bands each, time-major)."""
    if not files:
        raise BadRequest("body", f"no GeoTIFF field given; name fields by modality ({', '.join(ENCODER_MODALITIES)})")
    x, grid = {}, None
    for name, data in files.items():
        check_modality(name)
        arr, geo = read_geotiff_field(name, data)
        c = MODALITIES[name].num_bands
        n = arr.shape[-1]
        if n % c:
            raise BadRequest(name, f"expected a multiple of {c} bands ({', '.join(MODALITIES[name].bands)}) per "
                                   f"timestep, got {n} bands")  # fmt: skip
        if grid is not None and (geo.crs_wkt != grid.crs_wkt or geo.transform != grid.transform
                                 or (geo.width, geo.height) != (grid.width, grid.height)):  # fmt: skip
            raise BadRequest(name, "all GeoTIFF fields must share one grid (CRS, transform and size)")
        grid = geo
        h, w = arr.shape[:2]
        x[name] = arr.reshape(h, w, n // c, c)[None]  # (1, H, W, T, C)
    x, months = validate(x, months, patch_size, limits)
    return EmbedInput(x, months, georef=grid, fields=sorted(x))
