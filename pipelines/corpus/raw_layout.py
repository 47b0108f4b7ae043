"""The raw corpus layout (the original's public release), in one place.

    <root>/<raw_folder>/EPSG:<code>_<col>_<row>_<resolution>.tif    one GeoTIFF per sample and bandset
    <root>/<raw_folder>.csv                                          per temporal modality: timestep times
        columns crs, col, row, image_idx, start_time, end_time      (ISO dates; one row per band group t)

A sample is one 2560 m cell of a UTM grid: its 10 m pixel grid has the upper-left corner at
(x, y) = (col * 2560, -row * 2560) metres in EPSG:<code> (rows grow southwards, so northern cells have
negative rows), 256 x 256 pixels. A bandset stored at resolution r covers the same cell with 2560 / r pixels
per side. A multi-temporal file holds T x C bands in time-major order (band t * C + c is band c of
timestep t); the CSV row with image_idx t gives that timestep's period. Static maps hold C bands.

Raw dtypes and nodata values per modality: pipelines/imagery/units.py RAW_FORMAT (Sentinel-1 is stored
as linear power and converted to dB on read). The labelled variant adds `10_labels/` (per-pixel class of
CLASSES, uint8, 10 m) and `labels.csv` (sample_id, label, label_name).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from olmoearth.modalities import BASE_GSD, MAX_TIMESTEPS, MODALITIES, TILE_METRES, TILE_SIZE, get_modality
from pipelines.common.storage import Storage, is_s3, join

LABELS_FOLDER = "10_labels"  # labelled synthetic corpus only: per-pixel class, uint8, 10 m
# the labelled corpus's classes: label i of labels.csv and of the 10_labels maps is CLASSES[i]
CLASSES = ("tree_cover", "shrubland", "grassland", "cropland", "built_up", "bare", "water", "wetland")
TIMESTEP_FIELDS = ("crs", "col", "row", "image_idx", "start_time", "end_time")  # the timestep CSV's columns
FOLDER_TO_MODALITY = {m.raw_folder: name for name, m in MODALITIES.items()}
PERIOD_DAYS = 30  # one monthly mosaic

_NAME = re.compile(r"^EPSG:(\d+)_(-?\d+)_(-?\d+)_(\d+(?:\.\d+)?)\.tiff?$")


def parse_sample_name(filename: str) -> tuple[int, int, int, float]:
    """'EPSG:32618_123_-456_10.tif' (any folder prefix) -> (32618, 123, -456, 10.0)."""
    base = filename.rstrip("/").rsplit("/", 1)[-1]
    m = _NAME.match(base)
    if not m:
        raise ValueError(
            f"{filename}: not a raw corpus file name; expected EPSG:<code>_<col>_<row>_<resolution>.tif"
        )
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4))


def sample_id(epsg: int, col: int, row: int) -> str:
    return f"EPSG:{epsg}_{col}_{row}"


def parse_sample_id(sid: str) -> tuple[int, int, int]:
    m = re.match(r"^EPSG:(\d+)_(-?\d+)_(-?\d+)$", sid)
    if not m:
        raise ValueError(f"not a sample id: {sid!r}; expected EPSG:<code>_<col>_<row>")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def file_name(epsg: int, col: int, row: int, resolution: float) -> str:
    res = f"{resolution:g}"
    return f"EPSG:{epsg}_{col}_{row}_{res}.tif"


def cell_transform(col: int, row: int, resolution: float = BASE_GSD):
    """The affine transform of the cell's grid at `resolution` metres per pixel."""
    from affine import Affine

    return Affine(resolution, 0.0, col * TILE_METRES, 0.0, -resolution, -row * TILE_METRES)


def cell_bounds(col: int, row: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) in metres of the cell's UTM CRS."""
    left, top = col * TILE_METRES, -row * TILE_METRES
    return left, top - TILE_METRES, left + TILE_METRES, top


def cell_size(resolution: float) -> int:
    """Pixels per side of a cell at `resolution` metres per pixel (256 at 10 m, 1024 at 2.5 m)."""
    n = TILE_METRES / resolution
    if abs(n - round(n)) > 1e-6:
        raise ValueError(f"resolution {resolution} m does not divide the {TILE_METRES:g} m cell")
    return int(round(n))


def bandset_index(modality: str, resolution: float) -> int:
    """Which bandset of `modality` is stored at `resolution` (the file name's suffix)."""
    mod = get_modality(modality)
    for i, bs in enumerate(mod.bandsets):
        if abs(bs.resolution - resolution) < 1e-6:
            return i
    known = ", ".join(f"{bs.resolution:g}" for bs in mod.bandsets)
    raise ValueError(f"{modality} has no bandset stored at {resolution:g} m (known: {known})")


def csv_uri(root_uri: str, modality: str) -> str:
    return join(root_uri, get_modality(modality).raw_folder + ".csv")


# ----------------------------------------------------------------------------------------------------------
# Listing


def list_files(root_uri: str, storage: Storage) -> dict[str, list[str]]:
    """raw_folder -> every .tif uri under it (one listing per folder; scales with the number of files)."""
    fs = storage.fs(root_uri)
    out = {}
    for folder in [m.raw_folder for m in MODALITIES.values()] + [LABELS_FOLDER]:
        uri = join(root_uri, folder)
        try:
            if is_s3(uri):  # an emptied folder's own marker (`folder/`, SeaweedFS) is not a file of it
                names = [n for n in fs.ls(uri, detail=False) if not n.endswith("/")]
            else:  # fsspec's local ls normalises every path it returns: 40% of a large listing's time
                names = [os.path.join(uri, n) for n in os.listdir(uri)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        prefix = "s3://" if root_uri.startswith("s3://") else ""
        out[folder] = sorted(prefix + n if prefix and not n.startswith(prefix) else n for n in names)
    return out


def list_samples(root_uri: str, storage: Storage) -> dict[str, dict[str, list[str]]]:
    """sample_id -> {modality: [uri of each bandset file]} for every sample found under root_uri.

    File names that are not of the layout, and second spellings of one file, raise ValueError naming the
    file (use `list_raw` to collect them instead)."""
    listing = list_raw(root_uri, storage)
    for uri, reason in listing.bad_names:
        raise ValueError(f"{uri}: {reason}")
    for _, uri, kept in listing.duplicates:
        raise ValueError(f"{uri}: the same sample and bandset as {kept}")
    return listing.samples


def list_samples_lenient(root_uri: str, storage: Storage):
    """Like list_samples, plus [(uri, reason)] for files whose names do not parse (never dropped silently);
    a second spelling of a file is left out here (see `list_raw`)."""
    listing = list_raw(root_uri, storage)
    return listing.samples, listing.bad_names


@dataclass
class RawListing:
    """What one listing of a raw corpus found; every file listed is in exactly one of the three."""

    samples: dict[str, dict[str, list[str]]]  # sample_id -> {modality: [uri of each bandset file]}
    bad_names: list[tuple[str, str]]  # (uri, why its name does not parse)
    duplicates: list[tuple[str, str, str]]  # (sample_id, uri, the uri kept for that sample and bandset)
    files_found: int  # every .tif listed

    @property
    def files_used(self) -> int:
        return sum(len(us) for d in self.samples.values() for us in d.values())


def list_raw(root_uri: str, storage: Storage) -> RawListing:
    """List the raw corpus once: samples, files whose names do not parse, and second spellings of one file
    (`_10.0.tif` beside `_10.tif`, `_0903_` beside `_903_`, `.tiff` beside `.tif`): of those the canonical
    spelling (`file_name`) is kept, else the first in sorted order; the others are reported, never dropped
    silently and never read."""
    samples: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    bad, dups, found = [], [], 0
    for folder, uris in list_files(root_uri, storage).items():
        modality = FOLDER_TO_MODALITY.get(folder, "labels")
        known = {bs.resolution for bs in MODALITIES[modality].bandsets} if modality != "labels" else None
        found += len(uris)
        kept: dict[tuple[str, float], str] = {}  # (sample id, resolution) -> uri, one folder at a time
        others: dict[tuple[str, float], list[str]] = {}  # its other spellings
        for uri in uris:
            try:
                epsg, col, row, res = parse_sample_name(uri)
                if known is not None and res not in known:
                    bandset_index(modality, res)  # raises, saying which resolutions there are
            except ValueError as e:
                bad.append((uri, str(e)))
                continue
            key = (sample_id(epsg, col, row), res)
            old = kept.setdefault(key, uri)
            if old is not uri:
                others.setdefault(key, []).append(uri)
        for key, more in others.items():  # the canonical spelling wins, else the first
            spellings = [kept[key], *more]
            epsg, col, row = parse_sample_id(key[0])
            canonical = file_name(epsg, col, row, key[1])
            kept[key] = next((u for u in spellings if u.rsplit("/", 1)[-1] == canonical), spellings[0])
            dups += [(key[0], u, kept[key]) for u in spellings if u is not kept[key]]
        for (sid, _), uri in kept.items():
            samples[sid][modality].append(uri)
    out = {k: {m: sorted(v) for m, v in d.items()} for k, d in sorted(samples.items())}
    return RawListing(out, bad, dups, found)


# ----------------------------------------------------------------------------------------------------------
# Timesteps


def read_timesteps(root_uri: str, storage: Storage, modalities=None) -> dict[str, dict[str, list]]:
    """modality -> sample_id -> [(image_idx, start date, end date)] sorted by image_idx, for temporal
    modalities that have a CSV. A malformed CSV raises ValueError naming the file and line."""
    out = {}
    for name, mod in MODALITIES.items():
        if not mod.temporal or (modalities is not None and name not in modalities):
            continue
        uri = csv_uri(root_uri, name)
        if not storage.exists(uri):
            continue
        out[name] = parse_timesteps_csv(storage.read_text(uri), uri)
    return out


def parse_timesteps_csv(text: str, uri: str = "<csv>") -> dict[str, list]:
    """A whole timestep CSV -> sample_id -> [(image_idx, start date, end date)] sorted by image_idx."""
    rows: dict[str, list] = defaultdict(list)
    reader = csv.reader(io.StringIO(text))
    col = timestep_columns(next(reader, []), uri)
    for r in reader:
        if not r:
            continue
        try:
            sid, item = parse_timestep_row(r, col)
        except ValueError as e:
            raise ValueError(f"{uri}: line {reader.line_num}: {e}") from None
        rows[sid].append(item)
    return {k: sorted(v) for k, v in rows.items()}


def timestep_columns(header: list[str], uri: str = "<csv>") -> dict[str, int]:
    """A timestep CSV's header -> {field: column index}; ValueError naming the file if a field is missing."""
    if not set(TIMESTEP_FIELDS) <= set(header):
        raise ValueError(f"{uri}: header must have columns {list(TIMESTEP_FIELDS)}, got {header}")
    return {name: header.index(name) for name in TIMESTEP_FIELDS}


def parse_timestep_row(r: list[str], col: dict[str, int]) -> tuple[str, tuple[int, dt.date, dt.date]]:
    """One CSV row (fields, `timestep_columns` order) -> (sample_id, (image_idx, start, end)).
    Raises ValueError saying what is wrong with it."""
    try:
        epsg = int(str(r[col["crs"]]).replace("EPSG:", ""))
        sid = sample_id(epsg, int(r[col["col"]]), int(r[col["row"]]))
        return sid, (int(r[col["image_idx"]]), dt.date.fromisoformat(r[col["start_time"]][:10]),
                     dt.date.fromisoformat(r[col["end_time"]][:10]))  # fmt: skip
    except (TypeError, IndexError) as e:
        raise ValueError(str(e)) from None


def write_timesteps_csv(rows: list[tuple[str, int, dt.date, dt.date]]) -> str:
    """[(sample_id, image_idx, start, end)] -> CSV text in the layout above."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["crs", "col", "row", "image_idx", "start_time", "end_time"])
    for sid, idx, start, end in rows:
        epsg, col, row = parse_sample_id(sid)
        w.writerow([f"EPSG:{epsg}", col, row, idx, start.isoformat(), end.isoformat()])
    return out.getvalue()


def sample_timeline(periods: dict[str, list]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """periods: {modality: [(image_idx, start, end)]} of one sample ->
    ({modality: int64 (n_images,) slot t of each image}, months int64 (T,) 0..11).

    Slots are 30-day periods counted from the earliest image of any modality; the timeline is cut to the
    slots between the first and the last image (at most 12), as the original crops its timestamps."""
    starts = [p[1] for v in periods.values() for p in v]
    if not starts:
        return {}, np.zeros(0, dtype=np.int64)
    t0 = min(starts)
    slots = {m: np.asarray([round((p[1] - t0).days / PERIOD_DAYS) for p in v], dtype=np.int64)
             for m, v in periods.items()}  # fmt: skip
    T = int(max(s.max() for s in slots.values() if len(s))) + 1
    if T > MAX_TIMESTEPS:
        raise ValueError(f"timesteps span {T} periods of {PERIOD_DAYS} days; at most {MAX_TIMESTEPS}")
    return slots, np.asarray(period_months(t0, T), dtype=np.int64)


def period_months(t0: dt.date, n: int) -> list[int]:
    """The month (0..11) of each of n consecutive periods from t0: the month of the period's middle day."""
    return [(t0 + dt.timedelta(days=t * PERIOD_DAYS + PERIOD_DAYS // 2)).month - 1 for t in range(n)]


__all__ = [
    "LABELS_FOLDER", "CLASSES", "TIMESTEP_FIELDS", "TILE_SIZE", "parse_sample_name", "sample_id", "parse_sample_id", "file_name",
    "cell_transform", "cell_bounds", "cell_size", "bandset_index", "list_samples", "list_samples_lenient", "list_raw", "RawListing",
    "read_timesteps", "parse_timesteps_csv", "timestep_columns", "parse_timestep_row", "write_timesteps_csv",
    "sample_timeline", "period_months",
]  # fmt: skip
