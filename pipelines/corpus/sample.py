"""One sample of the raw corpus, read whole: validated and on its 10 m grid in model units.

    x, months, meta = read_sample("s3://raw", "EPSG:32618_12_-170", storage)
        # x: {modality: float32 (256, 256, T, C)} NaN where missing; months: int64 (T,); meta: crs/transform/bounds

Values come out in model units (nodata -> NaN, Sentinel-1 linear power -> dB; pipelines/imagery/units.py).
Bandsets are brought onto the 10 m grid as the original does: coarser bandsets by pixel repetition (20 m x2,
40 m x4), OSM 2.5 m by taking every 4th pixel. This is the stored form (pipelines/corpus/stored.py), gridded:
the shards hold exactly these values.
"""

from __future__ import annotations

import numpy as np

from olmoearth.modalities import MODALITIES
from pipelines.common.storage import Storage
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.stored import grid_crop
from pipelines.corpus.validate import load_bandsets


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
                read=None, dtype=np.float32) -> tuple[dict, np.ndarray, dict]:  # fmt: skip
    """Read, validate and grid one sample: `load_bandsets`, then every modality onto 10 m in model units.
    Returns (x: {modality: (256, 256, T, C) in `dtype`, NaN where missing}, months, meta) as `read_sample`."""
    bands, months, meta = load_bandsets(sid, files, periods, storage, read=read, float_dtype=np.float32)
    x = {m: grid_crop(m, arrays).astype(dtype, copy=False) for m, arrays in bands.items()}
    return x, months, meta


_CSV_CACHE: dict = {}  # the last corpus's timestep table: callers read many samples of one corpus


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
