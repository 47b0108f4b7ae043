"""Turn the bytes of an /embed request into model input, or a `BadRequest` naming the field at fault.

Two ways in:
    .npz   arrays named by modality, each (B, H, W, T, C) raw units (NaN = missing), plus `months` (B, T) or (T,)
    GeoTIFF one multi-band GeoTIFF per modality (multipart field named by the modality): T*C bands, time-major
            (band index t*C + c, as the raw corpus stacks timesteps), on a 10 m grid; nodata / -99999 -> NaN.
            All fields must share one grid (CRS, transform, size); the response GeoTIFF reuses it.

Everything returned is validated: known encoder modality, band count, one T for all modalities, square tile of
at most `max_tile` px, H divisible by the patch size, months 0..11, not all-NaN. This is the request path's one
validation: the embedder and the encoder behind it take what comes out of here as valid.

Sizes are checked as declared, before the data they describe is decoded: a zip member's method and
uncompressed size and its .npy header's shape and dtype, a GeoTIFF's width, height and band count (read from
its header; only GeoTIFF is opened, see pipelines/imagery/geotiff.py), and the encoder tokens they make.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import re
import zipfile
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
    visible: np.ndarray | None = None  # int64 (B,): each sample's visible encoder tokens (set by with_visible)

    @property
    def batch(self) -> int:
        return next(iter(self.x.values())).shape[0]

    @property
    def shape_key(self) -> tuple:
        """Requests with equal keys can share one encoder forward (same modalities and (H, W, T))."""
        return tuple((m, a.shape[1:]) for m, a in sorted(self.x.items()))

    def tokens_per_sample(self, patch_size: int) -> int:
        return tokens({m: a.shape[:4] for m, a in self.x.items()}, patch_size)[0]

    def with_visible(self, patch_size: int) -> EmbedInput:
        """Count each sample's visible tokens as the encoder will (a (patch, timestep, bandset) whose pixels
        are all finite, olmoearth/inference.py `prepare`): the endpoint batches only samples of equal count, so
        no forward pads and an answer has the same bytes whatever shared its forward."""
        p, count = patch_size, 0
        for name, a in self.x.items():
            b, h, w, t, c = a.shape
            finite = np.isfinite(a).reshape(b, h // p, p, w // p, p, t, c).all(axis=(2, 4))  # (B, h, w, T, C)
            for sl in MODALITIES[name].bandset_slices():
                count = count + finite[..., sl].all(-1).sum(axis=(1, 2, 3))  # (B,)
        self.visible = np.asarray(count, dtype=np.int64)
        return self


@dataclass(frozen=True)
class Limits:
    """What one request may declare; each is checked before the data it bounds is decoded."""

    max_tile: int = 256  # px per side
    max_samples: int = 64  # samples per request
    max_tokens: int = 131072  # encoder tokens per request (all samples)
    max_tokens_per_sample: int = 16384  # encoder tokens of one sample (its attention length)
    max_decoded_mb: float = 512.0  # decoded arrays of one request, MB
    max_parts: int = 8  # .npz members / multipart parts per request


NPZ_TYPES = ("application/x-npz", "application/npz", "application/octet-stream", "application/zip")
TIFF_TYPES = ("image/tiff", "image/geotiff", "application/geotiff")
NPY_KINDS = "biuf"  # bool, integers, floats: what an array of pixel values can be
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what np.savez / savez_compressed write


def tokens(shapes: dict[str, tuple], patch_size: int) -> tuple[int, int]:
    """(tokens per sample, tokens of the request) for {modality: (B, H, W, T)}, as the encoder counts them:
    one token per (patch, timestep, bandset)."""
    per = sum((h // patch_size) * (w // patch_size) * t * len(MODALITIES[m].bandsets)
              for m, (_, h, w, t) in shapes.items())  # fmt: skip
    return per, per * max((s[0] for s in shapes.values()), default=0)


def check_tokens(shapes: dict[str, tuple], patch_size: int, limits: Limits) -> None:
    per, total = tokens(shapes, patch_size)
    hint = "use a larger patch_size, a smaller tile, fewer months or fewer samples"
    if per > limits.max_tokens_per_sample:
        raise BadRequest("body", f"{per} encoder tokens per sample (patches x timesteps x bandsets) exceed the "
                                 f"limit of {limits.max_tokens_per_sample}; {hint}", status=413)  # fmt: skip
    if total > limits.max_tokens:
        raise BadRequest("body", f"{total} encoder tokens in the request exceed the limit of {limits.max_tokens}; "
                                 f"{hint}", status=413)  # fmt: skip


def check_declared(name: str, shape: tuple, patch_size: int, limits: Limits) -> None:
    """The checks of one modality's (B, H, W, T, C) that need no pixel: done on declared shapes."""
    check_modality(name)
    mod = MODALITIES[name]
    if len(shape) != 5:
        raise BadRequest(name, f"expected an array (B, H, W, T, C), got {len(shape)} dimensions {shape}")
    b, h, w, t, c = shape
    if c != mod.num_bands:
        raise BadRequest(name, f"expected {mod.num_bands} bands ({', '.join(mod.bands)}), got {c}")
    if h != w:
        raise BadRequest(name, f"tiles must be square, got {h} x {w} px")
    if h > limits.max_tile:
        raise BadRequest(name, f"tile of {h} x {w} px exceeds the limit of {limits.max_tile} px per side",
                         status=413)  # fmt: skip
    if h == 0 or t == 0 or b == 0:
        raise BadRequest(name, f"empty array {shape}")
    if h % patch_size:
        raise BadRequest("patch_size", f"tile size {h} px is not a multiple of patch size {patch_size}")
    if t > MAX_TIMESTEPS:
        raise BadRequest(name, f"at most {MAX_TIMESTEPS} timesteps, got {t}")
    if b > limits.max_samples:
        raise BadRequest(name, f"at most {limits.max_samples} samples per request, got {b}", status=413)


def npz_members(zf: zipfile.ZipFile, limits: Limits) -> dict[str, tuple[zipfile.ZipInfo, tuple, np.dtype]]:
    """{array name: (zip entry, shape, dtype)} from each member's .npy header, before any array is inflated:
    the zip's declared sizes and methods and the headers' shapes and dtypes are checked against `limits`."""
    infos = zf.infolist()
    if len(infos) > limits.max_parts:
        raise BadRequest("body", f"{len(infos)} arrays in the .npz, at most {limits.max_parts}", status=413)
    out, budget = {}, limits.max_decoded_mb * 2**20
    for info in infos:
        name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if not info.filename.endswith(".npy") or name in out:
            raise BadRequest(name, "every .npz member must be one .npy array, each name once")
        if info.compress_type not in ZIP_METHODS:
            raise BadRequest(name, "compressed with a method other than stored / deflate (np.savez, "
                                   "np.savez_compressed)", status=422)  # fmt: skip
        if info.file_size > budget:
            raise BadRequest(name, f"declares {info.file_size / 2**20:.1f} MB uncompressed, over the limit of "
                                   f"{limits.max_decoded_mb:g} MB", status=413)  # fmt: skip
        shape, dtype = npy_header(zf, info, name)
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes > budget:
            raise BadRequest(name, f"declares {nbytes / 2**20:.1f} MB of array data, over the limit of "
                                   f"{limits.max_decoded_mb:g} MB per request", status=413)  # fmt: skip
        budget -= nbytes
        out[name] = (info, shape, dtype)
    return out


def npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from a member's .npy header (its first bytes only)."""
    fmt = np.lib.format
    try:
        with zf.open(info) as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ValueError(f"npy format version {version}")
    except (ValueError, zipfile.BadZipFile, EOFError, OSError, SyntaxError):
        raise BadRequest(name, "not a readable .npy array") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in NPY_KINDS:
        raise BadRequest(name, f"expected numbers, got dtype {dtype}")
    return tuple(shape), dtype


def parse_patch_size(text: str | int | None, default: int) -> int:
    if text is None or text == "":
        return default
    try:
        if len(str(text)) > 3:
            raise ValueError("too long")
        p = int(text)
    except (TypeError, ValueError):
        raise BadRequest("patch_size", f"must be an integer 1..{MAX_PATCH_SIZE}, got {str(text)[:20]!r}") from None
    if not 1 <= p <= MAX_PATCH_SIZE:
        raise BadRequest("patch_size", f"must be 1..{MAX_PATCH_SIZE}, got {p}")
    return p


def parse_months(value, t: int, b: int, field_name: str = "months") -> np.ndarray:
    """months: None (-> 0..T-1), a comma-separated string, or an array (T,) / (B, T); returns int64 (B, T)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return np.tile(np.arange(t, dtype=np.int64) % 12, (b, 1))
    try:
        if isinstance(value, str) and len(value) > 4 * MAX_TIMESTEPS:
            raise ValueError("too long")
        if isinstance(value, str):
            arr = np.asarray([int(v) for v in value.replace(" ", "").split(",") if v != ""], dtype=np.int64)
        else:
            arr = np.asarray(value)
            if not np.issubdtype(arr.dtype, np.number) or np.any(arr != np.round(arr)):
                raise ValueError("not integers")
            arr = arr.astype(np.int64)
    except (ValueError, OverflowError, TypeError):
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
        check_declared(name, a.shape, patch_size, limits)
        if not np.issubdtype(a.dtype, np.number):
            raise BadRequest(name, f"expected numbers, got dtype {a.dtype}")
        shapes[name] = a.shape[:4]
    if len(set(shapes.values())) > 1:
        raise BadRequest(next(iter(shapes)), f"all modalities must share (B, H, W, T); got {shapes}")
    check_tokens(shapes, patch_size, limits)
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
    """An .npz body -> validated input. Every member's declared size is checked (npz_members, then the
    shapes against the limits and the token budget) before any array is inflated."""
    if not data.startswith(b"PK"):
        raise BadRequest("body", "not an .npz file (expected a zip archive of .npy arrays)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError):
        raise BadRequest("body", "not a readable .npz file (expected a zip archive of .npy arrays)") from None
    with zf:
        members = npz_members(zf, limits)
        months_entry = members.pop("months", None)
        shapes = {}
        for name, (_, shape, _) in members.items():
            check_declared(name, shape, patch_size, limits)
            shapes[name] = shape[:4]
        if len(set(shapes.values())) > 1:
            raise BadRequest(next(iter(shapes)), f"all modalities must share (B, H, W, T); got {shapes}")
        check_tokens(shapes, patch_size, limits)
        arrays = {name: read_member(zf, info, name) for name, (info, _, _) in members.items()}
        months = read_member(zf, months_entry[0], "months") if months_entry else months_param
    x, months = validate(arrays, months, patch_size, limits)
    return EmbedInput(x, months, fields=sorted(x))


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> np.ndarray:
    """One .npz member whose header was checked; zipfile stops inflating at its declared size."""
    try:
        with zf.open(info) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, EOFError, OSError):
        raise BadRequest(name, "truncated or corrupt array in the .npz") from None


def geotiff_check(name: str, patch_size: int, limits: Limits):
    """The check `read_geotiff` runs on a field's header, before decoding: size, band count, dtype, tokens."""
    c = MODALITIES[name].num_bands

    def check(prof: dict) -> None:
        w, h, n = prof["width"], prof["height"], prof["count"]
        if max(w, h) > limits.max_tile:
            raise BadRequest(name, f"GeoTIFF of {w} x {h} px exceeds the limit of {limits.max_tile} px per side",
                             status=413)  # fmt: skip
        if n == 0 or n % c or n // c > MAX_TIMESTEPS:
            raise BadRequest(name, f"expected a multiple of {c} bands ({', '.join(MODALITIES[name].bands)}) per "
                                   f"timestep, at most {MAX_TIMESTEPS} timesteps; got {n} bands")  # fmt: skip
        dtype = np.dtype(prof["dtype"])
        if dtype.kind not in NPY_KINDS:
            raise BadRequest(name, f"expected integer or float bands, got {dtype}")
        if w * h * n * max(dtype.itemsize, 4) > limits.max_decoded_mb * 2**20:
            raise BadRequest(name, f"decodes to over {limits.max_decoded_mb:g} MB", status=413)
        check_tokens({name: (1, h, w, n // c)}, patch_size, limits)

    return check


def read_geotiff_field(name: str, data: bytes, check=None) -> tuple[np.ndarray, Georef]:
    """One multipart GeoTIFF field -> (H, W, T*C) float32 with NaN for nodata, and its grid. `check(profile)`
    runs on the header before any pixel is decoded."""
    from pipelines.imagery.geotiff import GeoTiffError, read_geotiff

    try:
        arr, prof = read_geotiff(data, name=name, check=check)
    except GeoTiffError:  # the reader's detail (GDAL's text) stays in the server's logs
        raise BadRequest(name, "not a readable GeoTIFF (GeoTIFF / COG only)") from None
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
    if len(files) > limits.max_parts:
        raise BadRequest("body", f"{len(files)} GeoTIFF fields, at most {limits.max_parts}", status=413)
    x, grid = {}, None
    for name, data in files.items():
        check_modality(name)
        arr, geo = read_geotiff_field(name, data, geotiff_check(name, patch_size, limits))
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


def parse_multipart(body: bytes, content_type: str, max_parts: int = 8) -> tuple[dict[str, bytes], dict[str, str]]:
    """multipart/form-data -> (files {field: bytes}, text fields {field: str}) with the stdlib MIME parser;
    the parts are counted (one C-level scan) before any is parsed."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise BadRequest("Content-Type", "multipart/form-data without a boundary")
    parts = body.count(b"--" + m.group(1).encode("latin-1")) - 1
    if parts > max_parts:
        raise BadRequest("body", f"{parts} multipart parts, at most {max_parts}", status=413)
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise BadRequest("body", "malformed multipart/form-data body")
    files, fields = {}, {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise BadRequest("body", "multipart part without a field name")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None or part.get_content_type() in TIFF_TYPES + NPZ_TYPES:
            if name in files:
                raise BadRequest(name, "given twice")
            files[name] = data
        else:
            fields[name] = data.decode(errors="replace")
    return files, fields


async def read_body(request, limit: int, total_s: float, idle_s: float) -> bytes:
    """The request body, read as it streams in: 413 as soon as it passes `limit` bytes (declared or sent),
    408 if it takes over `total_s` or pauses over `idle_s` (a slow sender frees its request slot).
    `request`: a Starlette / FastAPI Request."""
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length")
    mb = f"{limit / 2**20:g} MB"
    if length is not None and (not length.isdigit() or len(length) > 15):
        raise BadRequest("Content-Length", "must be a number of bytes")
    if length is not None and int(length) > limit:
        raise BadRequest("body", f"request body over {mb}", status=413)
    loop = asyncio.get_running_loop()
    end, chunks, n = loop.time() + total_s, [], 0
    stream = request.stream().__aiter__()
    while True:
        wait = min(idle_s, end - loop.time())
        try:
            if wait <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise BadRequest("body", f"not received in time (body_timeout_s {total_s:g}, body_idle_s {idle_s:g})",
                             status=408) from None  # fmt: skip
        except ClientDisconnect:
            raise BadRequest("body", "client disconnected before the body ended") from None
        n += len(chunk)
        if n > limit:
            raise BadRequest("body", f"request body over {mb}", status=413)
        chunks.append(chunk)
    return b"".join(chunks)
