"""The shard format (version 2): what the corpus build writes and the training stream reads, in one place.

    <out>/shards/part-NNNNNN.parquet    Parquet, zstd, one row group per sample, no dictionary/statistics
    <out>/manifest.json                 shards with row counts, totals, rejects by reason, format_version
    <out>/norm_stats.json               per-band statistics, {modality: {band: {"mean", "std"} | {"min", "max"}}}

Columns: sample_id string, epsg/col/row int32, months list<int8> (T,), and one binary column per bandset,
`<modality>@<r>m` (`bandset_columns()`): the bandset in stored form (pipelines/corpus/stored.py: the raw
dtype, Sentinel-1 float16 dB), C-order (T_m, C_bs, n, n) little-endian at r = max(stored resolution, 10 m)
(n = 2560 / r), missing timesteps holding the nodata value; null if the sample lacks the modality. Each
binary cell is one large tensor, which is why the writer keeps neither dictionaries nor min/max statistics.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from olmoearth.modalities import MODALITIES, NormStats
from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.stored import stored_dtype, stored_resolution

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
NORM_STATS_FILE = "norm_stats.json"


def shard_path(part: int) -> str:
    """A part's shard, relative to the build's output folder."""
    return f"shards/part-{part:06d}.parquet"


def bandset_columns() -> list[tuple[str, str, int]]:
    """[(column name, modality, bandset index)] of the shard's tensor columns, registry order."""
    return [(f"{m}@{stored_resolution(bs.resolution):g}m", m, i)
            for m, mod in MODALITIES.items() for i, bs in enumerate(mod.bandsets)]  # fmt: skip


def modality_columns(modality: str) -> list[str]:
    return [c for c, m, _ in bandset_columns() if m == modality]


def shard_schema() -> pa.Schema:
    fields = [("sample_id", pa.string()), ("epsg", pa.int32()), ("col", pa.int32()), ("row", pa.int32()),
              ("months", pa.list_(pa.int8()))]  # fmt: skip
    fields += [(c, pa.binary()) for c, _, _ in bandset_columns()]
    return pa.schema(fields, metadata={"olmoearth_shard_format": str(FORMAT_VERSION)})


def shard_writer(stream, compression_level: int) -> pq.ParquetWriter:
    """A writer of one shard to a binary output stream; write each sample with `write_sample`."""
    return pq.ParquetWriter(pa.PythonFile(stream, mode="w"), shard_schema(), compression="zstd",
                            use_dictionary=False, write_statistics=False,
                            compression_level=compression_level)  # fmt: skip


def write_sample(writer: pq.ParquetWriter, sid: str, bands: dict, months: np.ndarray) -> None:
    """Append one sample (its stored bandsets, see pipelines/corpus/validate.load_bandsets) as a row group."""
    writer.write_table(sample_table(sid, bands, months), row_group_size=1)


def sample_table(sid: str, bands: dict, months: np.ndarray) -> pa.Table:
    """One sample (stored bandsets {modality: [array per bandset]}) -> a one-row table of shard_schema()."""
    epsg, col, row = rl.parse_sample_id(sid)
    data = {"sample_id": [sid], "epsg": [epsg], "col": [col], "row": [row],
            "months": [months.astype(np.int8).tolist()]}  # fmt: skip
    for c, m, i in bandset_columns():
        data[c] = _binary_cell(bands[m][i] if m in bands else None)
    return pa.table(data, schema=shard_schema())


def _binary_cell(a: np.ndarray | None) -> pa.Array:
    """One binary cell holding `a`'s bytes without copying them (a null cell for None)."""
    if a is None:
        return pa.nulls(1, pa.binary())
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    offsets = pa.py_buffer(np.array([0, a.nbytes], np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(a.reshape(-1).view(np.uint8))])


def decode_bandset(buf, modality: str, bandset: int, T: int) -> np.ndarray:
    """One shard cell (bytes or a pyarrow Buffer) -> its stored array (T_m, C_bs, n, n), zero-copy."""
    mod = MODALITIES[modality]
    bs = mod.bandsets[bandset]
    n = rl.cell_size(stored_resolution(bs.resolution))
    t = T if mod.temporal else 1
    return np.frombuffer(buf, dtype=stored_dtype(modality).newbyteorder("<")).reshape(t, bs.num_bands, n, n)


def read_cell(parquet_file: pq.ParquetFile, row_group: int, modalities) -> tuple[np.ndarray, dict]:
    """One sample of a shard -> (months int64 (T,), {modality: [stored array per bandset] | None}),
    the arrays viewing Arrow's buffers (no copy)."""
    cols = [c for m in modalities for c in modality_columns(m)]
    t = parquet_file.read_row_group(row_group, columns=["months", *cols])
    months = np.asarray(t.column("months")[0].as_py(), np.int64)
    out = {}
    for m in modalities:
        cells = [t.column(c)[0] for c in modality_columns(m)]
        out[m] = None if not cells[0].is_valid else [
            decode_bandset(v.as_buffer(), m, i, len(months)) for i, v in enumerate(cells)]  # fmt: skip
    return months, out


def load_manifest(shards_uri: str, storage: Storage) -> dict:
    """The build's manifest.json; refuses a folder of another shard format."""
    uri = join(shards_uri, MANIFEST_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no manifest; run `olmoearth build-corpus` first")
    manifest = json.loads(storage.read_text(uri))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{uri}: shard format {manifest.get('format_version')}, this stream reads format "
                         f"{FORMAT_VERSION}; rebuild the corpus with `olmoearth build-corpus`")  # fmt: skip
    return manifest


def load_norm_stats(shards_uri: str, storage: Storage) -> NormStats:
    """The per-band statistics the corpus build wrote (norm_stats.json next to the shards)."""
    uri = join(shards_uri, NORM_STATS_FILE)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no normalisation statistics; run `olmoearth build-corpus` first")
    return NormStats.from_dict(json.loads(storage.read_text(uri)))
