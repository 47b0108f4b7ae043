"""The reader of a vector file of OSM features (GeoParquet or GeoPackage) for the selection: the same rows as the
PBF reader (pipelines/selection/pbf.py, `feature_dataset`), so the selection downstream cannot tell them apart.

    plan(uri, features_per_task=100_000) -> TablePlan         what the file holds and how it is split; every
                                                              check of the file is here (the CLI calls it first)
    feature_dataset(uri, matches, features_per_task, stats) -> ray.data.Dataset
        rows {"osm_type": "node" | "way" | "relation" | None, "osm_id": int | None, "tags": str (JSON object),
              "wkb": bytes (the geometry in EPSG:4326, 2D)}, only rows whose tags `matches` (None: every row)
    read_features(uri, matches, stats) -> Iterator[dict]      the same rows in one process (small files, tests)

Files: `.parquet` / `.geoparquet` (GeoParquet: its `geo` metadata names the WKB geometry column and the CRS; a
plain Parquet file with a binary `geometry` or `wkb` column is read as EPSG:4326) and `.gpkg` (every layer with a
geometry, through pyogrio). Any URI of the project's Storage: a local path or s3:// (Parquet through pyarrow's
filesystem, GeoPackage through GDAL's /vsis3/ on Storage's endpoint).

Tags, per layer (the two layouts users have):
  (a) GDAL's OSM driver (`ogr2ogr out.gpkg extract.osm.pbf`, pyogrio on a .osm.pbf): one string column per
      common key (highway, building, ...) plus `other_tags`, the remaining tags as hstore text
      `"k"=>"v","k2"=>"v2"` (or `all_tags`, all of them). Every string column that is not an id or the
      geometry is a tag. osm_type comes from the layer (points: node; lines: way; multipolygons: way where
      `osm_way_id` is set, else relation; multilinestrings, other_relations: relation).
  (b) a `tags` column: a JSON object (text), a map or a struct. osm_type / osm_id from such columns if present.
A layer with neither a `tags`, `other_tags` or `all_tags` column nor a column named like a known OSM key
(categories.KNOWN_TAGS) is refused, with the file, the layer and its columns named.

Why tasks (no step holds all features on one node): a GeoParquet file splits into runs of whole row groups (the
footer says how many rows each has), a GeoPackage layer into feature ranges (pyogrio's skip_features /
max_features); each Ray task reads one part, keeps the matching rows and returns them as one Arrow block.
Geometries not in EPSG:4326 are reprojected in the task. Matching rows whose geometry is null, unreadable WKB
(GDAL's OSM driver writes rings of fewer than 4 points for some broken multipolygons) or empty cannot give
cells: they are left out of the rows and counted (`geometry_missing`, `geometry_invalid`, `geometry_empty`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.common.storage import Storage, is_s3
from pipelines.selection.categories import KNOWN_TAGS
from pipelines.selection.pbf import Matcher
from pipelines.selection.pbf import _table as rows_table  # the one row schema of the feature datasets

PARQUET_SUFFIXES = (".parquet", ".geoparquet")
GPKG_SUFFIXES = (".gpkg",)
ID_COLUMNS = ("osm_id", "osm_way_id", "osm_type", "fid", "ogc_fid")  # never tags
HSTORE_COLUMNS = ("all_tags", "other_tags")  # GDAL's OSM driver; all_tags (when configured) holds every tag
GDAL_LAYER_TYPES = {"points": "node", "lines": "way", "multilinestrings": "relation", "other_relations": "relation"}
OSM_TYPES = ("node", "way", "relation")
_HSTORE_PAIR = re.compile(r'"((?:[^"\\]|\\.)*)"\s*=>\s*(?:"((?:[^"\\]|\\.)*)"|NULL)')
_ESCAPED = re.compile(r"\\(.)")


class FeatureTableError(ValueError):
    """An unreadable GeoParquet / GeoPackage, or one without geometry or tags; the message names the file."""


@dataclass(frozen=True)
class LayerPlan:
    """How one layer (a GeoPackage layer, or the one table of a GeoParquet file) is read."""

    name: str | None  # the GeoPackage layer; None for GeoParquet
    geometry: str  # the geometry column (WKB)
    crs: str | None  # the file's CRS as pyproj reads it; None: none declared (read as lon/lat, checked)
    tags: str | None  # layout (b): the `tags` column
    key_columns: tuple[str, ...]  # layout (a): string columns holding one key each
    hstore: str | None  # layout (a): other_tags / all_tags
    id_columns: tuple[str, ...]  # those of ID_COLUMNS the layer has

    def columns(self) -> list[str]:
        """The attribute columns a task reads (the geometry apart)."""
        tags = [self.tags] if self.tags else [*self.key_columns, *([self.hstore] if self.hstore else [])]
        return [c for c in self.id_columns if c in ("osm_id", "osm_way_id", "osm_type")] + tags


@dataclass(frozen=True)
class TablePlan:
    uri: str
    kind: str  # "geoparquet" | "gpkg"
    layers: tuple[LayerPlan, ...]
    parts: tuple[tuple, ...]  # (layer index, row groups) for GeoParquet, (layer index, skip, count) for gpkg
    rows: int  # the file's rows (features) in all


def table_kind(uri: str) -> str | None:
    """"geoparquet" / "gpkg" from the file's suffix, None for anything else."""
    low = uri.lower()
    if low.endswith(PARQUET_SUFFIXES):
        return "geoparquet"
    if low.endswith(GPKG_SUFFIXES):
        return "gpkg"
    return None


# ----------------------------------------------------------------------------------------------------------
# The plan: metadata only (a Parquet footer, a GeoPackage's layer list and counts)


def plan(uri: str, features_per_task: int = 100_000, storage: Storage | None = None) -> TablePlan:
    """Every check of the file before any feature is read; a FeatureTableError naming the file otherwise
    (FileNotFoundError where it does not exist)."""
    if features_per_task < 1:
        raise ValueError(f"features_per_task must be >= 1, got {features_per_task}")
    storage = storage or Storage()
    kind = table_kind(uri)
    if kind == "geoparquet":
        return _plan_parquet(uri, features_per_task, storage)
    if kind == "gpkg":
        return _plan_gpkg(uri, features_per_task, storage)
    raise FeatureTableError(f"{uri}: not a GeoParquet (.parquet, .geoparquet) or GeoPackage (.gpkg) file")


def _layer_plan(uri: str, name: str | None, geometry: str, crs, columns: dict[str, bool]) -> LayerPlan:
    """columns: {name: holds strings} of the layer's attribute columns (the geometry apart)."""
    where = f"{uri}" + (f": layer {name!r}" if name else "")
    ids = tuple(c for c in ID_COLUMNS if c in columns)
    if "tags" in columns:
        return LayerPlan(name, geometry, crs, "tags", (), None, ids)
    hstore = next((c for c in HSTORE_COLUMNS if c in columns), None)
    keys = tuple(c for c, is_text in columns.items()
                 if is_text and c not in ID_COLUMNS and c not in HSTORE_COLUMNS and c != "tags")  # fmt: skip
    if hstore is None and not any(k in KNOWN_TAGS and k != "name" for k in keys):
        raise FeatureTableError(
            f"{where}: no tag column: expected `tags` (a JSON object or map), GDAL's `other_tags` / `all_tags`, or "
            f"columns named after OSM keys (highway, building, ...); the columns are {sorted(columns)}")
    if hstore == "all_tags":
        keys = ()  # all_tags repeats the key columns
    return LayerPlan(name, geometry, crs, None, keys, hstore, ids)


def _parquet_file(uri: str, storage: Storage):
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri)
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise FileNotFoundError(f"{uri}: no such file") from None
        raise FeatureTableError(f"{uri}: cannot read as Parquet ({e})") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid & co: all the same user error
        raise FeatureTableError(f"{uri}: not a Parquet file ({type(e).__name__}: {e})") from None


def _plan_parquet(uri: str, features_per_task: int, storage: Storage) -> TablePlan:
    import pyarrow as pa

    pf = _parquet_file(uri, storage)
    schema = pf.schema_arrow
    geo = json.loads((schema.metadata or {}).get(b"geo", b"null") or "null")
    if geo:
        geometry = geo.get("primary_column", "geometry")
        meta = geo.get("columns", {}).get(geometry, {})
        if meta.get("encoding", "WKB").upper() != "WKB":
            raise FeatureTableError(f"{uri}: geometry column {geometry!r} is encoded as {meta['encoding']!r}; "
                                    f"only WKB is read (geopandas' default, to_parquet(geometry_encoding='WKB'))")
        crs = meta.get("crs", "OGC:CRS84")  # GeoParquet: no `crs` means lon/lat, null means unknown
        crs = json.dumps(crs) if isinstance(crs, dict) else crs
    else:  # a plain Parquet table of WKB, e.g. the PBF reader's rows written by Ray Data
        geometry = next((c for c in ("geometry", "wkb") if c in schema.names), None)
        crs = None
    kind = schema.field(geometry).type if geometry in schema.names else None
    if kind is None or not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise FeatureTableError(f"{uri}: no WKB geometry column (GeoParquet `geo` metadata, or a binary `geometry` / "
                                f"`wkb` column); the columns are {schema.names}")
    columns = {f.name: pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
               for f in schema if f.name != geometry}  # fmt: skip
    layer = _layer_plan(uri, None, geometry, crs, columns)
    parts, run, size = [], [], 0
    for i in range(pf.metadata.num_row_groups):  # runs of whole row groups of about features_per_task rows
        n = pf.metadata.row_group(i).num_rows
        if run and size + n > features_per_task:
            parts.append((0, tuple(run)))
            run, size = [], 0
        run.append(i)
        size += n
    if run:
        parts.append((0, tuple(run)))
    return TablePlan(uri, "geoparquet", (layer,), tuple(parts), pf.metadata.num_rows)


def gdal_path(uri: str, storage: Storage) -> str:
    """The path GDAL (pyogrio) opens for `uri`, with GDAL's S3 settings for Storage's endpoint set."""
    if not is_s3(uri):
        return uri
    import pyogrio

    from pipelines.imagery.sources import gdal_env

    pyogrio.set_gdal_config_options(gdal_env(storage))  # process-wide; the same in every task of this storage
    return "/vsis3/" + uri[len("s3://"):]


def _plan_gpkg(uri: str, features_per_task: int, storage: Storage) -> TablePlan:
    import pyogrio
    from pyogrio.errors import DataSourceError

    if not is_s3(uri) and not os.path.exists(uri):
        raise FileNotFoundError(f"{uri}: no such file")
    path = gdal_path(uri, storage)
    try:
        listed = pyogrio.list_layers(path)
    except DataSourceError as e:
        if is_s3(uri) and not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: no such file") from None
        raise FeatureTableError(f"{uri}: cannot read as a GeoPackage ({e})") from None
    layers, parts, rows = [], [], 0
    for name, geometry_type in listed:
        if geometry_type is None:
            continue  # an attribute-only table (no features to place on cells)
        info = pyogrio.read_info(path, layer=name, force_feature_count=True)
        text = {f: t == "OFTString" for f, t in zip(info["fields"], info["ogr_types"], strict=True)}
        layers.append(_layer_plan(uri, name, info["geometry_name"] or "wkb_geometry", info["crs"], text))
        n = int(info["features"])
        parts.extend((len(layers) - 1, skip, min(features_per_task, n - skip)) for skip in range(0, n, features_per_task))
        rows += n
    if not layers:
        raise FeatureTableError(f"{uri}: no layer with a geometry (layers: {[str(n) for n, _ in listed]})")
    return TablePlan(uri, "gpkg", tuple(layers), tuple(parts), rows)


# ----------------------------------------------------------------------------------------------------------
# One part: read, tags, ids, geometry in EPSG:4326


def parse_hstore(text: str | None) -> dict:
    """GDAL's `other_tags` text `"k"=>"v","k2"=>"v2"` (backslash escapes `\\"` and `\\\\`) -> {k: v}."""
    if not text:
        return {}
    pairs = (m.groups() for m in _HSTORE_PAIR.finditer(text))
    return {_ESCAPED.sub(r"\1", k): _ESCAPED.sub(r"\1", v) for k, v in pairs if v is not None}  # NULL: no tag


def _tag_value(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value if isinstance(value, str) else str(value)


def _tags_of(value, where: str) -> dict:
    """Layout (b): one `tags` cell (JSON text, a map as [(k, v)], a struct as a dict, or null) -> {k: v}."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise FeatureTableError(f"{where}: `tags` is not JSON ({e}): {value[:80]!r}") from None
        if not isinstance(value, dict):
            raise FeatureTableError(f"{where}: `tags` is not a JSON object: {str(value)[:80]!r}")
    pairs = value.items() if isinstance(value, dict) else value
    return {str(k): v for k, v in ((k, _tag_value(v)) for k, v in pairs) if v is not None}


def _osm_id(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _ids(layer: LayerPlan, cols: dict, i: int) -> tuple[str | None, int | None]:
    """(osm_type, osm_id) of row i: the `osm_type` column, else the GDAL OSM layer's rule (module docstring)."""
    osm_id = _osm_id(cols["osm_id"][i]) if "osm_id" in cols else None
    if "osm_type" in cols:
        kind = cols["osm_type"][i]
        return (kind if kind in OSM_TYPES else None), osm_id
    if layer.name == "multipolygons" and "osm_way_id" in cols:
        way = _osm_id(cols["osm_way_id"][i])
        return ("way", way) if way is not None else ("relation", osm_id)
    return GDAL_LAYER_TYPES.get(layer.name or ""), osm_id


def _to_lonlat(geoms: np.ndarray, crs: str | None, where: str) -> np.ndarray:
    """Non-empty shapely geometries in `crs` -> 2D in EPSG:4326; a file without a CRS must be lon/lat already."""
    import shapely
    from pyproj import CRS, Transformer

    geoms = shapely.force_2d(geoms)
    if crs is not None:
        src = CRS.from_user_input(json.loads(crs) if crs.startswith("{") else crs)
        if not src.equals(CRS.from_epsg(4326), ignore_axis_order=True):
            t = Transformer.from_crs(src, "EPSG:4326", always_xy=True)
            geoms = shapely.transform(geoms, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))
    box = _bounds(geoms)
    if box is not None and not (-180.5 <= box[0] and box[2] <= 180.5 and -90.5 <= box[1] and box[3] <= 90.5):
        said = "has no CRS" if crs is None else "is reprojected to EPSG:4326"
        raise FeatureTableError(f"{where}: coordinates {box} are not lon/lat although the file {said}: is its CRS "
                                f"right?")
    return geoms


def read_part(tp: TablePlan, part: tuple, matches: Matcher, storage: Storage | None = None) -> tuple[list[dict], dict]:
    """One part of the plan -> (rows of the matching features, stats: rows read per osm type; matching rows
    without a geometry, with unreadable WKB, with an empty one; the lon/lat bounds of the rows)."""
    import shapely

    storage = storage or Storage()
    layer = tp.layers[part[0]]
    table, where = _read_arrow(tp, layer, part, storage)
    cols = {c: table.column(c).to_pylist() for c in layer.columns()}
    wkb = table.column(layer.geometry).to_pylist()
    stats = {"nodes": 0, "ways": 0, "relations": 0, "untyped": 0}
    kept = []  # (tags, osm_type, osm_id, wkb) of the matching rows
    for i in range(table.num_rows):
        kind, osm_id = _ids(layer, cols, i)
        stats[{"node": "nodes", "way": "ways", "relation": "relations"}.get(kind, "untyped")] += 1
        if layer.tags:
            tags = _tags_of(cols[layer.tags][i], f"{where}, row {i}")
        else:
            tags = parse_hstore(cols[layer.hstore][i]) if layer.hstore else {}
            tags.update((k, cols[k][i]) for k in layer.key_columns if cols[k][i] is not None)
        if tags and (matches is None or matches(tags)):
            kept.append((tags, kind, osm_id, wkb[i]))
    data = np.asarray([k[3] for k in kept], dtype=object)
    missing = np.asarray([w is None for w in data], dtype=bool)
    # unreadable WKB -> None: GDAL's OSM driver writes rings of < 4 points for some broken multipolygons
    geoms = shapely.from_wkb(np.where(missing, None, data), on_invalid="ignore") if len(data) else np.zeros(0, object)
    invalid = shapely.is_missing(geoms) & ~missing
    empty = ~shapely.is_missing(geoms) & shapely.is_empty(geoms)
    good = ~(missing | invalid | empty)
    stats.update(geometry_missing=int(missing.sum()), geometry_invalid=int(invalid.sum()),
                 geometry_empty=int(empty.sum()))  # fmt: skip
    geoms = _to_lonlat(geoms[good], layer.crs, where)
    rows = [{"osm_type": kind, "osm_id": osm_id, "tags": json.dumps(tags, sort_keys=True), "wkb": shapely.to_wkb(g)}
            for g, (tags, kind, osm_id, _) in zip(geoms, (k for k, ok in zip(kept, good, strict=True) if ok),
                                                  strict=True)]  # fmt: skip
    stats["bounds"] = _bounds(geoms)
    return rows, stats


def _bounds(geoms: np.ndarray) -> list[float] | None:
    import shapely

    if not len(geoms):
        return None
    b = shapely.bounds(geoms)
    return [float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())]


def _read_arrow(tp: TablePlan, layer: LayerPlan, part: tuple, storage: Storage):
    """The part's columns as an Arrow table, and how to name the part in an error."""
    if tp.kind == "geoparquet":
        groups = list(part[1])
        where = f"{tp.uri}: row groups {groups[0]}..{groups[-1]}"
        try:
            return _parquet_file(tp.uri, storage).read_row_groups(groups, columns=[*layer.columns(), layer.geometry]), where
        except (OSError, ValueError) as e:
            raise FeatureTableError(f"{where}: unreadable ({e})") from None
    import pyogrio
    from pyogrio.errors import DataLayerError, DataSourceError

    _, skip, count = part
    where = f"{tp.uri}: layer {layer.name!r}, features {skip}..{skip + count - 1}"
    try:
        meta, table = pyogrio.read_arrow(gdal_path(tp.uri, storage), layer=layer.name, columns=layer.columns(),
                                         skip_features=skip, max_features=count)  # fmt: skip
    except (DataSourceError, DataLayerError) as e:
        raise FeatureTableError(f"{where}: unreadable ({e})") from None
    return table.rename_columns([layer.geometry if c == meta["geometry_name"] else c for c in table.schema.names]), where


# ----------------------------------------------------------------------------------------------------------
# Entry points


def add_stats(stats: dict | None, parts: list[dict]) -> None:
    """Sum the parts' counts into `stats` and merge their bounds (`bounds`: lon/lat box of every row, or None)."""
    if stats is None:
        return
    for part in parts:
        for k, v in part.items():
            if k == "bounds":
                old = stats.get("bounds")
                stats["bounds"] = v if old is None else (old if v is None else
                                                         [min(old[0], v[0]), min(old[1], v[1]),
                                                          max(old[2], v[2]), max(old[3], v[3])])  # fmt: skip
            else:
                stats[k] = stats.get(k, 0) + v
    stats.setdefault("bounds", None)


def read_features(uri: str, matches: Matcher = None, stats: dict | None = None,
                  features_per_task: int = 100_000) -> Iterator[dict]:  # fmt: skip
    """The rows of feature_dataset in this process, part by part."""
    storage = Storage()
    tp = plan(uri, features_per_task, storage)
    for part in tp.parts:
        rows, part_stats = read_part(tp, part, matches, storage)
        add_stats(stats, [part_stats])
        yield from rows


def _part_task(tp: TablePlan, part: tuple, matches: Matcher):
    rows, stats = read_part(tp, part, matches)
    return rows_table(rows), stats, len(rows)


def feature_dataset(uri: str, matches: Matcher = None, features_per_task: int = 100_000, stats: dict | None = None):
    """The file's matching features as a Ray Dataset of the PBF reader's rows, one block per part with rows
    (module docstring). With `stats` given, it is filled with the rows read per osm type (nodes, ways,
    relations, untyped), the matching rows without a geometry / with unreadable WKB / with an empty one, and
    `bounds` (lon/lat) of the rows."""
    import ray

    tp = plan(uri, features_per_task)
    task = ray.remote(_part_task).options(num_returns=3)
    tp_ref = ray.put(tp)
    outs = [task.remote(tp_ref, part, matches) for part in tp.parts]
    if stats is not None:
        add_stats(stats, ray.get([o[1] for o in outs]))
    # only the blocks with rows travel on (a part whose rows all lack a matching tag leaves an empty one)
    sizes = ray.get([o[2] for o in outs])
    blocks = [o[0] for o, n in zip(outs, sizes, strict=True) if n]
    return ray.data.from_arrow_refs(blocks) if blocks else ray.data.from_arrow(rows_table([]))
