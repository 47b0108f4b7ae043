"""The OpenStreetMap PBF reader: an extract split into Ray tasks by byte ranges of its blobs.

Public API (shared with the corpus materialisation, which rasterises the OSM modality from the same extract):

    index_blobs(uri, storage) -> [(offset, length), ...]     byte ranges of the extract's data blobs (OSMData)
    feature_dataset(uri, matches, blocks_per_task=8) -> ray.data.Dataset
        rows {"osm_type": "node" | "way" | "relation", "osm_id": int, "tags": str (JSON object),
              "wkb": bytes (shapely geometry in EPSG:4326: Point for a node, LineString for a way, Polygon for
              a closed way that is an area, Polygon / MultiPolygon for a multipolygon or boundary relation,
              MultiLineString for one whose outer members do not close)}
        only features whose tags (a dict) `matches` (None: every tagged feature)
    read_features(uri, matches) -> Iterator[dict]           the same rows in one process (small inputs, tests)

Why blobs: a PBF file is a sequence of frames (4-byte big-endian length, a BlobHeader protobuf naming the type
and the size of the Blob that follows). The first blob is the OSMHeader; each OSMData blob decodes on its own.
So a task's input is the header blob plus any run of data blobs, which is itself a valid PBF that pyosmium
decodes from memory (`osmium.io.FileBuffer`). The index reads only the frame headers (seeks past the blobs).

Why these stages (no step holds all features on one node): a way stores node ids, its coordinates live in the
node blocks, which other tasks read; a relation stores way ids. So
  0. per group of blobs: matching multipolygon / boundary relations -> their member way ids (relations.py);
     the driver keeps only that (way id, relation id, role) array and hands it to stages 1 and 3.
  1. per group of blobs (a Ray task): matching nodes become rows at once; every node's location goes to one of
     `buckets` partitions by node id; every matching (or relation member) way's node refs go out exploded as
     (node id, way id, position) by node-id bucket, plus the way's tags by way-id bucket.
  2. per node bucket: join the refs with the locations -> (way id, position, lon, lat) by way-id bucket.
  3. per way bucket: order each way's located refs, build its geometry; refs without a location (outside the
     extract) are dropped and counted; a way left with < 2 located nodes is counted and skipped. A member
     way's coordinates go on to its relations' buckets.
  4. per relation bucket: the relation's geometry from its members (relations.py).
Memory per task is one blob group or one bucket, whatever the extract's size. Other matching relations
(routes, sites, ...) are not assembled: they are counted (`relations_skipped`) and reported by the selection.
A closed way is an area (Polygon) when it has >= 4 nodes and is tagged like an area (`area=yes`, or a key of
AREA_KEYS, and not `area=no`); otherwise it is a LineString.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np

from pipelines.common.storage import Storage
from pipelines.selection import relations

Matcher = Callable[[dict], bool] | None
MAX_HEADER = 64 * 1024  # the PBF spec's limit for a BlobHeader
MAX_BLOB = 32 * 1024 * 1024  # ... and for a Blob
AREA_KEYS = frozenset(
    {"building", "landuse", "leisure", "natural", "amenity", "aeroway", "man_made", "power", "water",
     "waterway", "shop", "tourism", "place", "boundary", "military", "historic", "area"}
)  # a closed way with one of these keys is an area (the usual OSM convention, shortened)
NO_AREA_VALUES = {"waterway": {"river", "stream", "canal", "drain", "ditch"}, "natural": {"coastline", "tree_row"}}


class PbfError(ValueError):
    """An unreadable or truncated PBF; the message names the file and the byte offset."""


# ----------------------------------------------------------------------------------------------------------
# The blob index


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def _blob_header(buf: bytes) -> tuple[str, int]:
    """BlobHeader protobuf -> (type, datasize). Fields: 1 type (string), 2 indexdata (bytes), 3 datasize."""
    pos, kind, size = 0, None, None
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            if field == 3:
                size = value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if field == 1:
                kind = buf[pos:pos + n].decode("utf-8", "replace")
            pos += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
    if kind is None or size is None:
        raise ValueError("BlobHeader without type or datasize")
    return kind, size


def _frames(uri: str, storage: Storage) -> list[tuple[str, int, int]]:
    """Every frame of the file: (type, offset, length incl. the 4-byte prefix and the BlobHeader)."""
    frames = []
    with storage.fs(uri).open(uri, "rb") as f:
        total = f.size if hasattr(f, "size") else None
        offset = 0
        while True:
            prefix = f.read(4)
            if not prefix:
                break
            where = f"{uri}: byte {offset}"
            if len(prefix) < 4:
                raise PbfError(f"{where}: truncated frame length; not a complete .osm.pbf file")
            hlen = int.from_bytes(prefix, "big")
            if not 0 < hlen <= MAX_HEADER:
                raise PbfError(f"{where}: BlobHeader length {hlen} is not a PBF frame; not an .osm.pbf file")
            header = f.read(hlen)
            try:
                if len(header) < hlen:
                    raise ValueError("truncated BlobHeader")
                kind, size = _blob_header(header)
            except ValueError as e:
                raise PbfError(f"{where}: unreadable BlobHeader ({e}); not an .osm.pbf file") from None
            if size > MAX_BLOB or (total is not None and offset + 4 + hlen + size > total):
                raise PbfError(f"{where}: blob of {size} bytes runs past the end of the file (truncated PBF)")
            f.seek(size, 1)
            frames.append((kind, offset, 4 + hlen + size))
            offset += 4 + hlen + size
    if not frames or frames[0][0] != "OSMHeader":
        raise PbfError(f"{uri}: no OSMHeader blob at the start; not an .osm.pbf file")
    return frames


def index_blobs(uri: str, storage: Storage | None = None) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) of the extract's OSMData blobs, in file order."""
    return [(off, n) for kind, off, n in _frames(uri, storage or Storage()) if kind == "OSMData"]


def header_range(uri: str, storage: Storage) -> tuple[int, int]:
    kind, off, n = _frames(uri, storage)[0]
    return off, n


def read_ranges(uri: str, storage: Storage, ranges: list[tuple[int, int]]) -> bytes:
    with storage.fs(uri).open(uri, "rb") as f:
        parts = []
        for off, n in ranges:
            f.seek(off)
            parts.append(f.read(n))
    return b"".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Decoding one group of blobs


def is_area(tags: dict, refs: list[int]) -> bool:
    if len(refs) < 4 or refs[0] != refs[-1] or tags.get("area") == "no":
        return False
    if tags.get("area") == "yes":
        return True
    return any(k in AREA_KEYS and v not in NO_AREA_VALUES.get(k, ()) for k, v in tags.items())


def _processor(pbf: bytes, entities):
    import osmium

    return osmium.FileProcessor(osmium.io.FileBuffer(pbf, "pbf"), entities)


def bucket_of(ids: np.ndarray, buckets: int) -> np.ndarray:
    """A stable bucket per OSM id (a multiplicative hash, so neighbouring ids spread out)."""
    mixed = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return (mixed % np.uint64(buckets)).astype(np.int64)


def scan_group(uri: str, header: tuple[int, int], ranges: list[tuple[int, int]], matches: Matcher,
               buckets: int, storage: Storage, members: np.ndarray | None = None) -> dict:
    """Stage 1 for one group of blobs. Returns {"nodes": [rows], "locs": [B arrays (id, lon, lat)],
    "refs": [B arrays (node id, way id, pos)], "ways": [B lists (way id, tags json or None for a relation
    member that does not match itself, area)], "stats": {...}}."""
    import osmium

    pbf = read_ranges(uri, storage, [header] + list(ranges))
    node_rows, loc_ids, loc_xy, ref_rows, ways = [], [], [], [], []
    stats = {"nodes": 0, "ways": 0}
    try:
        for obj in _processor(pbf, osmium.osm.NODE | osmium.osm.WAY):
            if obj.is_node():
                stats["nodes"] += 1
                if not obj.location.valid():
                    continue
                lon, lat = obj.location.lon, obj.location.lat
                loc_ids.append(obj.id)
                loc_xy.append((lon, lat))
                if len(obj.tags) and _matched(obj.tags, matches):
                    node_rows.append(_node_row(obj.id, dict(obj.tags), lon, lat))
                continue
            stats["ways"] += 1
            matched = bool(len(obj.tags)) and _matched(obj.tags, matches)
            if matched or (members is not None and len(members) and relations.is_member(members, obj.id)):
                tags, refs = dict(obj.tags), [n.ref for n in obj.nodes]
                ways.append((obj.id, json.dumps(tags, sort_keys=True) if matched else None, is_area(tags, refs)))
                ref_rows.extend((r, obj.id, i) for i, r in enumerate(refs))
    except RuntimeError as e:
        raise PbfError(f"{uri}: blobs at bytes {ranges[0][0]}..{sum(ranges[-1])}: undecodable PBF data ({e})") from None
    return {"nodes": node_rows, "stats": stats, **_partition(loc_ids, loc_xy, ref_rows, ways, buckets)}


def _matched(tags, matches: Matcher) -> bool:
    return True if matches is None else bool(matches(dict(tags)))


def _node_row(osm_id: int, tags: dict, lon: float, lat: float) -> dict:
    import shapely

    return {"osm_type": "node", "osm_id": int(osm_id), "tags": json.dumps(tags, sort_keys=True),
            "wkb": shapely.to_wkb(shapely.Point(lon, lat))}


def _partition(loc_ids, loc_xy, ref_rows, ways, buckets: int) -> dict:
    ids = np.asarray(loc_ids, dtype=np.int64)
    xy = np.asarray(loc_xy, dtype=np.float64).reshape(-1, 2)
    refs = np.asarray(ref_rows, dtype=np.int64).reshape(-1, 3)  # (node id, way id, position)
    lb, rb = bucket_of(ids, buckets), bucket_of(refs[:, 0], buckets)
    way_b = bucket_of(np.asarray([w[0] for w in ways], dtype=np.int64), buckets)
    return {
        "locs": [(ids[lb == b], xy[lb == b]) for b in range(buckets)],
        "refs": [refs[rb == b] for b in range(buckets)],
        "ways": [[w for w, wb in zip(ways, way_b, strict=True) if wb == b] for b in range(buckets)],
    }


# ----------------------------------------------------------------------------------------------------------
# Joins (stages 2 and 3): plain functions on arrays, run as Ray tasks by feature_dataset


def join_locations(locs: list[tuple[np.ndarray, np.ndarray]], refs: list[np.ndarray], buckets: int) -> list:
    """Stage 2 for one node bucket: refs (node, way, pos) + locations -> per way bucket arrays
    (way id, pos, lon, lat) of the located refs, and the count of refs without a location."""
    ids = np.concatenate([a for a, _ in locs]) if locs else np.zeros(0, np.int64)
    xy = np.concatenate([b for _, b in locs]) if locs else np.zeros((0, 2))
    ref = np.concatenate(refs) if refs else np.zeros((0, 3), np.int64)
    order = np.argsort(ids, kind="stable")
    ids, xy = ids[order], xy[order]
    at = np.searchsorted(ids, ref[:, 0]).clip(0, max(len(ids) - 1, 0))
    found = (len(ids) > 0) & (ids[at] == ref[:, 0]) if len(ids) else np.zeros(len(ref), bool)
    ref, loc = ref[found], xy[at[found]] if len(ids) else np.zeros((0, 2))
    wb = bucket_of(ref[:, 1], buckets)
    parts = [np.column_stack([ref[wb == b, 1:3].astype(np.float64), loc[wb == b]]) for b in range(buckets)]
    return [parts, int((~found).sum())]


def build_ways(ways: list[list], located: list[np.ndarray], members: np.ndarray | None = None,
               buckets: int = 1) -> tuple[list[dict], int, list[list]]:
    """Stage 3 for one way bucket: (way id, tags json, area) + located refs (way, pos, lon, lat) -> rows of the
    matching ways, the number skipped for lack of located nodes, and the relation members' located
    coordinates by relation bucket (relations.member_pieces)."""
    import shapely

    pts = np.concatenate(located) if located else np.zeros((0, 4))
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    way_ids = pts[:, 0].astype(np.int64)
    rows, skipped, pieces = [], 0, [[] for _ in range(buckets)]
    for way_id, tags, area in sorted((w for group in ways for w in group), key=lambda w: w[0]):
        lo, hi = np.searchsorted(way_ids, way_id), np.searchsorted(way_ids, way_id, side="right")
        xy = pts[lo:hi, 2:4]
        if members is not None and len(members) and relations.is_member(members, way_id):
            relations.member_pieces(members, way_id, xy, buckets, bucket_of, pieces)
        if tags is None:
            continue
        if len(xy) < 2:
            skipped += 1
            continue
        closed = area and len(xy) >= 4 and (xy[0] == xy[-1]).all()
        geom = shapely.Polygon(xy) if closed else shapely.LineString(xy)
        rows.append({"osm_type": "way", "osm_id": int(way_id), "tags": tags, "wkb": shapely.to_wkb(geom)})
    return rows, skipped, pieces


# ----------------------------------------------------------------------------------------------------------
# Entry points


def _table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema([("osm_type", pa.string()), ("osm_id", pa.int64()), ("tags", pa.string()), ("wkb", pa.binary())])
    return pa.Table.from_pylist(rows, schema=schema)


def _groups(uri: str, storage: Storage, blocks_per_task: int):
    if blocks_per_task < 1:
        raise ValueError(f"blocks_per_task must be >= 1, got {blocks_per_task}")
    frames = _frames(uri, storage)
    data = [(off, n) for kind, off, n in frames if kind == "OSMData"]
    return frames[0][1:], [data[i:i + blocks_per_task] for i in range(0, len(data), blocks_per_task)]


def scan_group_relations(uri: str, header, ranges, matches: Matcher, buckets: int, storage: Storage) -> tuple:
    """Stage 0 for one group of blobs (relations.scan_relations), undecodable data named like stage 1."""
    try:
        return relations.scan_relations(read_ranges(uri, storage, [header] + list(ranges)), matches, buckets, bucket_of)
    except RuntimeError as e:
        raise PbfError(f"{uri}: blobs at bytes {ranges[0][0]}..{sum(ranges[-1])}: undecodable PBF data ({e})") from None


def _add(stats: dict | None, *parts: dict) -> None:
    for part in parts if stats is not None else ():
        for k, v in part.items():
            stats[k] = stats.get(k, 0) + v


def read_features(uri: str, matches: Matcher = None, stats: dict | None = None) -> Iterator[dict]:
    """The rows of feature_dataset in this process (one bucket): for small extracts and tests."""
    storage = Storage()
    header, groups = _groups(uri, storage, 1 << 30)
    ranges = groups[0] if groups else []
    members, rels, rel_stats = scan_group_relations(uri, header, ranges, matches, 1, storage)
    members = relations.sort_members([members])
    scanned = scan_group(uri, header, ranges, matches, 1, storage, members)
    located, missing = join_locations(scanned["locs"], scanned["refs"], 1)
    rows, skipped, pieces = build_ways(scanned["ways"], located, members, 1)
    rel_rows, assembled = relations.assemble(rels, pieces)
    _add(stats, rel_stats, scanned["stats"], {"refs_missing": missing, "ways_skipped": skipped}, assembled)
    yield from scanned["nodes"]
    yield from rows
    yield from rel_rows


def _rel_task(uri, header, ranges, matches, buckets):
    members, rels, stats = scan_group_relations(uri, header, ranges, matches, buckets, Storage())
    return (members, stats, *rels)


def _scan_task(uri, header, ranges, matches, buckets, members):
    out = scan_group(uri, header, ranges, matches, buckets, Storage(), members)
    return (_table(out["nodes"]), out["stats"], *out["locs"], *out["refs"], *out["ways"])


def _join_task(buckets, n_groups, *args):
    located, missing = join_locations(list(args[:n_groups]), list(args[n_groups:]), buckets)
    return (*located, missing)


def _build_task(n_groups, buckets, members, *args):
    rows, skipped, pieces = build_ways(list(args[:n_groups]), list(args[n_groups:]), members, buckets)
    return (_table(rows), skipped, *pieces)


def _assemble_task(n_groups, *args):
    rows, stats = relations.assemble(list(args[:n_groups]), list(args[n_groups:]))
    return _table(rows), stats


def feature_dataset(uri: str, matches: Matcher = None, blocks_per_task: int = 8, buckets: int | None = None,
                    stats: dict | None = None):
    """The extract's matching features as a Ray Dataset (see the module docstring); `buckets` node / way /
    relation partitions (default: one per blob group). With `stats` given, it is filled with the counts of
    features read per kind, relations skipped / unclosed / empty, refs without a location and ways skipped."""
    import ray

    storage = Storage()
    header, groups = _groups(uri, storage, blocks_per_task)
    b, g = buckets or max(1, len(groups)), len(groups)
    rel = ray.remote(_rel_task).options(num_returns=2 + b)
    rels = [rel.remote(uri, header, grp, matches, b) for grp in groups]
    members = ray.put(relations.sort_members(ray.get([r[0] for r in rels])))
    scan = ray.remote(_scan_task).options(num_returns=2 + 3 * b)
    scans = [scan.remote(uri, header, grp, matches, b, members) for grp in groups]
    join = ray.remote(_join_task).options(num_returns=b + 1)
    joins = [join.remote(b, g, *[s[2 + i] for s in scans], *[s[2 + b + i] for s in scans]) for i in range(b)]
    build = ray.remote(_build_task).options(num_returns=2 + b)
    builds = [build.remote(g, b, members, *[s[2 + 2 * b + w] for s in scans], *[j[w] for j in joins])
              for w in range(b)]
    assemble = ray.remote(_assemble_task).options(num_returns=2)
    assembled = [assemble.remote(g, *[r[2 + k] for r in rels], *[w[2 + k] for w in builds]) for k in range(b)]
    if stats is not None:
        _add(stats, *ray.get([r[1] for r in rels]), *ray.get([s[1] for s in scans]), *ray.get([a[1] for a in assembled]))
        stats["refs_missing"] = sum(ray.get([j[b] for j in joins]))
        stats["ways_skipped"] = sum(ray.get([w[1] for w in builds]))
    return ray.data.from_arrow_refs([s[0] for s in scans] + [w[0] for w in builds] + [a[0] for a in assembled])
