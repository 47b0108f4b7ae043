"""Multipolygon relations for the PBF reader (pipelines/selection/pbf.py): stage 0 and stage 4 of feature_dataset.

    stage 0  per blob group: the matching relations of type multipolygon or boundary -> their way members
             (way id, relation id, role) and their tags by relation-id bucket; other matching relations (routes,
             sites, ...) are counted as `relations_skipped`
    (the driver concatenates the member arrays, 24 bytes per member way, and hands them to stages 1 and 3:
     a member way's refs are joined like a matching way's, and its located coordinates go to its relations'
     buckets)
    stage 4  per relation bucket: outer members polygonised into the relation's (multi)polygon, inner
             members' polygons cut out. Where the outer members do not close (the relation is clipped by the
             extract's edge, or a member is missing) the relation's geometry is the MultiLineString of its
             located members, so its cells are still those its boundary touches; counted as
             `relations_unclosed`. A relation without a member of >= 2 located nodes: `relations_empty`.
"""

from __future__ import annotations

import json

import numpy as np

AREA_RELATIONS = ("multipolygon", "boundary")  # relation types assembled into areas
ROLE_OUTER, ROLE_INNER = 0, 1


def scan_relations(pbf: bytes, matches, buckets: int, bucket_of) -> tuple:
    """Stage 0 on one group's PBF bytes -> (members (n, 3) int64: way id, relation id, role; relations by
    bucket: [[(relation id, tags json)], ...]; {"relations": read, "relations_skipped": matching, not areas})."""
    import osmium

    members, rels, stats = [], [], {"relations": 0, "relations_skipped": 0}
    for obj in osmium.FileProcessor(osmium.io.FileBuffer(pbf, "pbf"), osmium.osm.RELATION):
        stats["relations"] += 1
        if not len(obj.tags):
            continue
        tags = dict(obj.tags)
        if matches is not None and not matches(tags):
            continue
        ways = [(m.ref, ROLE_INNER if m.role == "inner" else ROLE_OUTER) for m in obj.members if m.type == "w"]
        if tags.get("type") not in AREA_RELATIONS or not ways:
            stats["relations_skipped"] += 1
            continue
        members.extend((w, obj.id, role) for w, role in ways)
        rels.append((obj.id, json.dumps(tags, sort_keys=True)))
    members = np.asarray(members, dtype=np.int64).reshape(-1, 3)
    rb = bucket_of(np.asarray([r[0] for r in rels], dtype=np.int64), buckets)
    return members, [[r for r, b in zip(rels, rb, strict=True) if b == k] for k in range(buckets)], stats


def sort_members(parts: list[np.ndarray]) -> np.ndarray:
    members = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
    return members[np.argsort(members[:, 0], kind="stable")]


def is_member(members: np.ndarray, way_id: int) -> bool:
    at = np.searchsorted(members[:, 0], way_id)
    return bool(at < len(members) and members[at, 0] == way_id)


def member_pieces(members: np.ndarray, way_id: int, xy: np.ndarray, buckets: int, bucket_of, out: list) -> None:
    """Append (relation id, role, way id, coordinates) of a located member way to its relations' buckets."""
    lo, hi = np.searchsorted(members[:, 0], way_id), np.searchsorted(members[:, 0], way_id, side="right")
    for rel_id, role in members[lo:hi, 1:3].tolist():
        out[int(bucket_of(np.asarray([rel_id]), buckets)[0])].append((rel_id, role, way_id, xy))


def _polygons(lines: list):
    import shapely

    if not lines:
        return shapely.Polygon()
    return shapely.unary_union(list(shapely.get_parts(shapely.polygonize(lines))))


def relation_geometry(pieces: list[tuple]):
    """A relation's located member pieces -> (geometry, closed): the polygons of its outer members minus those
    of its inner ones, or the MultiLineString of all members where the outer ones do not close."""
    import shapely

    outer = [shapely.LineString(xy) for _, role, _, xy in pieces if role == ROLE_OUTER and len(xy) >= 2]
    inner = [shapely.LineString(xy) for _, role, _, xy in pieces if role == ROLE_INNER and len(xy) >= 2]
    area = _polygons(outer)
    if area.is_empty:
        return shapely.MultiLineString(outer + inner), False
    holes = _polygons(inner)
    return (area.difference(holes) if not holes.is_empty else area), True


def assemble(rels: list[list], pieces: list[list]) -> tuple[list[dict], dict]:
    """Stage 4 for one relation bucket -> (rows, {"relations_unclosed", "relations_empty"})."""
    import shapely

    by_rel: dict = {}
    for group in pieces:
        for piece in group:
            by_rel.setdefault(piece[0], []).append(piece)
    rows, stats = [], {"relations_unclosed": 0, "relations_empty": 0}
    for rel_id, tags in sorted(r for group in rels for r in group):
        mine = sorted(by_rel.get(rel_id, []), key=lambda p: (p[1], p[2]))  # role, way id: a stable order
        if not mine:
            stats["relations_empty"] += 1
            continue
        geom, closed = relation_geometry(mine)
        if geom.is_empty:  # no member with 2 located nodes
            stats["relations_empty"] += 1
            continue
        stats["relations_unclosed"] += not closed
        rows.append({"osm_type": "relation", "osm_id": int(rel_id), "tags": tags, "wkb": shapely.to_wkb(geom)})
    return rows, stats
