"""`select-cells` from a GeoParquet or GeoPackage of OSM features (pipelines/selection/features_table.py).

Data: the real Helsinki extract and its 40 x stretched copy (fixtures of test_select_cells.py), turned into
  - GeoPackages in GDAL's OSM driver layout: every layer of pyogrio on the .osm.pbf, written unchanged with
    pyogrio.write_arrow (so GDAL's own output is kept byte for byte, its few unreadable rings included);
  - GeoParquet files with a JSON `tags` column, from the PBF reader's rows (pbf.read_features).
Checked against an independent count over the same file in this test (geopandas reads it, tags from its
columns / JSON / `other_tags` parsed here as JSON, the category table's matcher, cells.feature_cells):
candidates and cells per category, rows read per kind, the geometries left out; the JSON GeoParquet gives
exactly the PBF path's cells; same cells whatever the task count; a cell once; reprojection and a map-typed
`tags` column; on S3; and the errors for an unknown suffix, no tag column and unusable files."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import pytest
import yaml
from test_select_cells import TABLE_YAML, helsinki, stretched, table_uri  # noqa: F401  fixtures of that file

from pipelines.selection import categories as cat
from pipelines.selection import cells as cellmath
from pipelines.selection import features_table as ft
from pipelines.selection import pbf

GDAL_LAYERS = ("points", "lines", "multilinestrings", "multipolygons", "other_relations")
NOT_TAGS = {"osm_id", "osm_way_id", "z_order", "other_tags", "geometry"}
TABLE = cat.parse_table(yaml.safe_load(TABLE_YAML), "test table")


def gdal_gpkg(pbf_path: str, out: str) -> str:
    """GDAL's OSM driver's layers of `pbf_path`, written as they are into one GeoPackage."""
    import warnings

    import pyogrio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # GDAL's notes on the extract's unclosed rings
        for layer in GDAL_LAYERS:
            meta, table = pyogrio.read_arrow(pbf_path, layer=layer)
            pyogrio.write_arrow(table, out, layer=layer, driver="GPKG", geometry_name=meta["geometry_name"],
                                geometry_type=meta["geometry_type"], crs=meta["crs"])  # fmt: skip
    return out


def json_geoparquet(pbf_path: str, out: str, crs: str = "EPSG:4326", row_group_size: int = 3000) -> str:
    """The PBF reader's rows as GeoParquet (geopandas): osm_type, osm_id, tags (JSON text), geometry."""
    import geopandas as gpd
    import shapely

    rows = list(pbf.read_features(pbf_path))
    frame = gpd.GeoDataFrame({"osm_type": [r["osm_type"] for r in rows], "osm_id": [r["osm_id"] for r in rows],
                              "tags": [r["tags"] for r in rows]},
                             geometry=shapely.from_wkb([r["wkb"] for r in rows]), crs="EPSG:4326")  # fmt: skip
    frame.to_crs(crs).to_parquet(out, row_group_size=row_group_size)
    return out


@pytest.fixture(scope="module")
def gpkg(helsinki, tmp_path_factory):  # noqa: F811
    return gdal_gpkg(helsinki, str(tmp_path_factory.mktemp("gpkg") / "helsinki.gpkg"))


@pytest.fixture(scope="module")
def stretched_gpkg(stretched, tmp_path_factory):  # noqa: F811
    return gdal_gpkg(stretched, str(tmp_path_factory.mktemp("gpkg") / "stretched.gpkg"))


@pytest.fixture(scope="module")
def stretched_parquet(stretched, tmp_path_factory):  # noqa: F811
    return json_geoparquet(stretched, str(tmp_path_factory.mktemp("pq") / "stretched.parquet"))


# ----------------------------------------------------------------------------------------------------------
# the independent side: geopandas, this file's own tag parsing, the table's matcher, the cell arithmetic


def _hstore_as_json(text) -> dict:
    """other_tags `"k"=>"v",...` read as JSON (`=>` between a closing and an opening quote is `:`)."""
    if not isinstance(text, str) or not text:
        return {}
    return json.loads("{" + re.sub(r'(?<!\\)"=>"', '":"', text) + "}", strict=False)  # raw newlines in values


def _frames(path: str):
    """(layer name, GeoDataFrame in EPSG:4326) of every layer; unreadable WKB read as a missing geometry."""
    import geopandas as gpd
    import pyogrio

    if path.endswith(".parquet"):
        yield None, gpd.read_parquet(path).to_crs("EPSG:4326")
        return
    for layer, _ in pyogrio.list_layers(path):
        yield layer, pyogrio.read_dataframe(path, layer=layer, on_invalid="ignore").to_crs("EPSG:4326")


def _is_text(column) -> bool:
    import pandas as pd

    return column.dtype == object or pd.api.types.is_string_dtype(column)


def brute_force(path: str) -> tuple[dict, dict, dict]:
    """({category: {cell ids}}, rows read per kind, matching rows without a usable geometry) over the file."""
    found, read, lost = {n: set() for n in TABLE.names}, defaultdict(int), 0
    for layer, frame in _frames(path):
        keys = [c for c in frame.columns if c not in NOT_TAGS and c != "osm_type" and _is_text(frame[c])]
        for rec in frame.to_dict("records"):
            if layer is None:
                tags, kind = json.loads(rec["tags"]), rec["osm_type"]
            else:
                tags = {**_hstore_as_json(rec["other_tags"]), **{k: rec[k] for k in keys if isinstance(rec[k], str)}}
                kind = {"points": "node", "lines": "way"}.get(layer, "relation")
                kind = "way" if layer == "multipolygons" and isinstance(rec["osm_way_id"], str) else kind
            read[kind + "s"] += 1
            names = TABLE.categories_of(tags)
            if not names:
                continue
            if rec["geometry"] is None or rec["geometry"].is_empty:
                lost += 1
                continue
            epsg, touched = cellmath.feature_cells(rec["geometry"])
            for n in names:
                found[n].update(cellmath.cell_id(epsg, c, r) for c, r in touched)
    return found, dict(read), lost


def _run(osm, out, table, **overrides):
    from pipelines.selection.config import SelectCellsConfig
    from pipelines.selection.job import select_cells

    return select_cells(SelectCellsConfig(osm=osm, out=out, categories=table, **overrides))


def _cells(out):
    import geopandas as gpd

    return gpd.read_parquet(os.path.join(out, "cells.parquet"))


def _cell_rows(out) -> list[tuple]:
    return [(r.cell_id, r.crs, list(r.categories), r.start_date, r.end_date, r.geometry.wkb)
            for r in _cells(out).itertuples()]  # fmt: skip


def _by_category(out) -> dict[str, set]:
    cells = _cells(out)
    return {n: {c for c, cats in zip(cells.cell_id, cells.categories, strict=True) if n in cats} for n in TABLE.names}


# ----------------------------------------------------------------------------------------------------------
# unit: tags, plans, errors (no Ray)


def test_hstore_and_tags_cells():
    assert ft.parse_hstore('"a"=>"1","b:c"=>"x y"') == {"a": "1", "b:c": "x y"}
    assert ft.parse_hstore(r'"q"=>"say \"hi\"","p"=>"a\\b","n"=>NULL') == {"q": 'say "hi"', "p": "a\\b"}
    assert ft.parse_hstore(None) == {} and ft.parse_hstore("") == {}
    assert ft._tags_of('{"building": "yes", "levels": 3, "x": null}', "w") == {"building": "yes", "levels": "3"}
    assert ft._tags_of([("highway", "primary")], "w") == {"highway": "primary"}  # a map column's cell
    assert ft._tags_of(None, "w") == {}
    with pytest.raises(ft.FeatureTableError, match="f.parquet, row 7: `tags` is not a JSON object"):
        ft._tags_of("[1, 2]", "f.parquet, row 7")


def test_gdal_layout_plan_and_parts(gpkg):
    import pyogrio

    counts = {layer: pyogrio.read_info(gpkg, layer=layer)["features"] for layer in GDAL_LAYERS}
    plan = ft.plan(gpkg, features_per_task=1000)
    assert [la.name for la in plan.layers] == list(GDAL_LAYERS) and plan.rows == sum(counts.values())
    lines = plan.layers[1]
    assert lines.hstore == "other_tags" and "highway" in lines.key_columns and "z_order" not in lines.key_columns
    assert "osm_id" not in lines.key_columns and lines.tags is None
    # parts tile every layer: ranges of <= 1000 features, in order, none lost or read twice
    for i, layer in enumerate(GDAL_LAYERS):
        ranges = [(skip, n) for k, skip, n in plan.parts if k == i]
        assert ranges[0][0] == 0 and all(n <= 1000 for _, n in ranges)
        assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
        assert sum(n for _, n in ranges) == counts[layer]


def test_gpkg_rows_match_independent_reading(gpkg):
    """Every GDAL-layout row read in one process: tags as this test parses them, ids and kinds by layer."""
    stats = {}
    rows = list(ft.read_features(gpkg, None, stats, features_per_task=700))
    expected = {}
    for layer, frame in _frames(gpkg):
        keys = [c for c in frame.columns if c not in NOT_TAGS and _is_text(frame[c])]
        for rec in frame.to_dict("records"):
            tags = {**_hstore_as_json(rec["other_tags"]), **{k: rec[k] for k in keys if isinstance(rec[k], str)}}
            way = layer == "multipolygons" and isinstance(rec["osm_way_id"], str)
            kind = "way" if way else {"points": "node", "lines": "way"}.get(layer, "relation")
            if tags and rec["geometry"] is not None:
                expected[(kind, int(rec["osm_way_id"] if way else rec["osm_id"]))] = tags
    assert {(r["osm_type"], r["osm_id"]): json.loads(r["tags"]) for r in rows} == expected
    assert len(rows) == len(expected) > 13000  # one row per feature: ids are unique per kind
    assert stats["geometry_invalid"] >= 1 and stats["geometry_missing"] == stats["geometry_empty"] == 0
    lon0, lat0, lon1, lat1 = stats["bounds"]
    assert 24.9 < lon0 < lon1 < 25.0 and 60.1 < lat0 < lat1 < 60.2


def test_reprojected_and_map_tags(helsinki, tmp_path):  # noqa: F811
    """A GeoParquet in EPSG:3067 with a map<string, string> `tags` column and a reprojected GeoPackage give the
    lon/lat rows of the EPSG:4326 files (within 1e-9 degrees, tags equal)."""
    import geopandas as gpd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    base = json_geoparquet(helsinki, str(tmp_path / "lonlat.parquet"))
    projected = json_geoparquet(helsinki, str(tmp_path / "tm35fin.parquet"), crs="EPSG:3067")
    table = pq.read_table(projected)
    tags = pa.array([sorted(json.loads(t).items()) for t in table.column("tags").to_pylist()],
                    type=pa.map_(pa.string(), pa.string()))  # fmt: skip
    as_map = str(tmp_path / "map.geoparquet")
    pq.write_table(table.set_column(table.schema.get_field_index("tags"), "tags", tags), as_map, row_group_size=4000)
    assert ft.plan(as_map).layers[0].crs is not None and len(ft.plan(as_map, 4000).parts) == 4

    def by_id(path):
        return {(r["osm_type"], r["osm_id"]): r for r in ft.read_features(path)}

    want, got = by_id(base), by_id(as_map)
    assert got.keys() == want.keys() and all(got[k]["tags"] == want[k]["tags"] for k in want)
    keys = sorted(want)
    a = shapely.from_wkb([want[k]["wkb"] for k in keys])
    b = shapely.from_wkb([got[k]["wkb"] for k in keys])
    assert float(shapely.hausdorff_distance(a, b).max()) < 1e-9
    # a GeoPackage layer in EPSG:3067 (geopandas writes it): its points back in lon/lat
    frame = gpd.read_parquet(base)
    frame[frame.osm_type == "node"].to_crs("EPSG:3067").to_file(tmp_path / "nodes.gpkg", layer="nodes")
    nodes = by_id(str(tmp_path / "nodes.gpkg"))
    assert nodes.keys() == {k for k in want if k[0] == "node"}
    assert max(shapely.from_wkb(nodes[k]["wkb"]).distance(shapely.from_wkb(want[k]["wkb"])) for k in nodes) < 1e-9


def test_geometry_missing_and_empty_counted(helsinki, tmp_path):  # noqa: F811
    import geopandas as gpd
    import shapely

    frame = gpd.read_parquet(json_geoparquet(helsinki, str(tmp_path / "h.parquet")))
    is_tree = frame.tags.map(lambda t: json.loads(t).get("natural") == "tree")
    trees = frame.index[is_tree]
    frame.loc[trees[:5], "geometry"] = None
    frame.loc[trees[5:8], "geometry"] = shapely.Point()
    frame.to_parquet(tmp_path / "holes.parquet")
    stats = {}
    rows = list(ft.read_features(str(tmp_path / "holes.parquet"), TABLE.matches, stats))
    assert stats["geometry_missing"] == 5 and stats["geometry_empty"] == 3 and stats["geometry_invalid"] == 0
    trees_left = sum(json.loads(r["tags"]).get("natural") == "tree" for r in rows)
    assert trees_left == len(trees) - 8
    assert stats["nodes"] + stats["ways"] + stats["relations"] == len(frame) and stats["untyped"] == 0


def test_bad_inputs_named(helsinki, tmp_path, capsys, table_uri):  # noqa: F811
    import geopandas as gpd
    import shapely

    from pipelines.selection.config import SelectCellsConfig, check_config
    from ray_jobs import select_cells

    with pytest.raises(ValueError, match="osm: .*extract.shp: unknown format"):
        check_config(SelectCellsConfig(osm=str(tmp_path / "extract.shp"), out=str(tmp_path / "o")))
    assert select_cells.main(["--osm", str(tmp_path / "x.geojson"), "--out", str(tmp_path / "o")]) == 2
    assert "x.geojson: unknown format" in capsys.readouterr().err
    # no tag column: the file and the columns it has are named, by the reader and by the CLI (exit 2)
    untagged = gpd.GeoDataFrame({"name": ["a", "b"], "height": [1.0, 2.0]},
                                geometry=[shapely.Point(24.94, 60.17)] * 2, crs="EPSG:4326")  # fmt: skip
    untagged.to_parquet(tmp_path / "untagged.parquet")
    untagged.to_file(tmp_path / "untagged.gpkg", layer="places")
    for name, words in (("untagged.parquet", []), ("untagged.gpkg", ["layer 'places'"])):
        with pytest.raises(ft.FeatureTableError) as e:
            ft.plan(str(tmp_path / name))
        assert all(w in str(e.value) for w in [name, "no tag column", "'height'", "'name'", *words]), str(e.value)
        assert select_cells.main(["--osm", str(tmp_path / name), "--out", str(tmp_path / "o"),
                                  "--categories", table_uri]) == 2  # fmt: skip
        assert name in capsys.readouterr().err
    # not the format its suffix says; missing; projected coordinates without a CRS
    (tmp_path / "text.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "text.gpkg").write_bytes(b"not a geopackage")
    for name in ("text.parquet", "text.gpkg"):
        with pytest.raises(ft.FeatureTableError, match=name):
            ft.plan(str(tmp_path / name))
    with pytest.raises(FileNotFoundError):
        ft.plan(str(tmp_path / "missing.gpkg"))
    with pytest.raises(FileNotFoundError):
        ft.plan(str(tmp_path / "missing.parquet"))
    metres = gpd.GeoDataFrame({"tags": ['{"building": "yes"}']}, geometry=[shapely.Point(385000.0, 6672000.0)])
    metres.to_parquet(tmp_path / "nocrs.parquet")
    with pytest.raises(ft.FeatureTableError, match="nocrs.parquet.*not lon/lat although the file has no CRS"):
        list(ft.read_features(str(tmp_path / "nocrs.parquet")))


# ----------------------------------------------------------------------------------------------------------
# integration: the job on the Ray cluster


def test_gpkg_counts_match_brute_force(ray_cluster, stretched, stretched_gpkg, table_uri, tmp_path):  # noqa: F811
    expected, read, lost = brute_force(stretched_gpkg)
    assert len(expected["building"]) > 100 and lost >= 1
    a = _run(stretched_gpkg, str(tmp_path / "a"), table_uri, features_per_task=1500, cap=25, seed=3, map=False)
    assert a["osm_format"] == "gpkg"
    assert a["candidates"] == {n: len(c) for n, c in expected.items()}
    assert a["features_read"] == {"nodes": read["nodes"], "ways": read["ways"], "relations": read["relations"],
                                  "untyped": 0}  # fmt: skip
    assert a["geometry_invalid"] == lost and a["geometry_missing"] == a["geometry_empty"] == 0
    assert a["drawn"] == {n: min(25, len(c)) for n, c in expected.items()}
    for name, cells in _by_category(str(tmp_path / "a")).items():  # the cap lowest ranks of the true candidates
        assert cells == set(sorted(expected[name], key=lambda c: cellmath.rank(3, name, c))[:25])
    assert _cells(str(tmp_path / "a")).cell_id.is_unique
    # one task per layer: the same cells, windows and squares
    b = _run(stretched_gpkg, str(tmp_path / "b"), table_uri, features_per_task=10**6, cap=25, seed=3, map=False)
    assert b["candidates"] == a["candidates"] and _cell_rows(str(tmp_path / "b")) == _cell_rows(str(tmp_path / "a"))
    # against the PBF: nodes and open ways are built alike by GDAL and the PBF reader; areas follow each one's
    # own rules (docs/corpus.md, "Or a table of features", says where they part)
    p = _run(stretched, str(tmp_path / "p"), table_uri, cap=25, seed=3, map=False)
    for name in ("tree", "road", "rail"):
        assert a["candidates"][name] == p["candidates"][name] > 50, name


def test_geoparquet_from_pbf_rows_equals_pbf(ray_cluster, stretched, stretched_parquet, table_uri, tmp_path):  # noqa: F811
    expected, read, lost = brute_force(stretched_parquet)
    q = _run(stretched_parquet, str(tmp_path / "q"), table_uri, features_per_task=2500, cap=25, seed=7)
    p = _run(stretched, str(tmp_path / "p"), table_uri, cap=25, seed=7, blocks_per_task=2)
    assert q["osm_format"] == "geoparquet" and p["osm_format"] == "pbf"
    assert q["candidates"] == p["candidates"] == {n: len(c) for n, c in expected.items()}
    assert q["drawn"] == p["drawn"] and _cell_rows(str(tmp_path / "q")) == _cell_rows(str(tmp_path / "p"))
    assert _by_category(str(tmp_path / "q")) == {n: set(sorted(c, key=lambda x: cellmath.rank(7, n, x))[:25])
                                                 for n, c in expected.items()}  # fmt: skip
    assert q["features_read"] == {**read, "untyped": 0} and lost == 0  # every row of the file, by its osm_type
    assert open(os.path.join(tmp_path, "q", "cells.png"), "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_feature_dataset_equals_one_process(ray_cluster, gpkg):
    st_ray, st_one = {}, {}
    ds = ft.feature_dataset(gpkg, TABLE.matches, features_per_task=900, stats=st_ray)
    key = lambda r: (r["osm_type"], r["osm_id"], r["tags"], bytes(r["wkb"]))  # noqa: E731
    got = sorted(map(key, ds.iter_rows()))
    assert got == sorted(map(key, ft.read_features(gpkg, TABLE.matches, st_one, features_per_task=900)))
    assert st_ray == st_one and len(got) > 1000 and 1 < ds.num_blocks() <= len(ft.plan(gpkg, 900).parts)


def test_tables_on_s3(ray_cluster, s3_bucket, stretched_gpkg, stretched_parquet, table_uri, tmp_path, capsys):  # noqa: F811
    from pipelines.common.storage import Storage
    from ray_jobs import select_cells

    storage = Storage()
    for local in (stretched_gpkg, stretched_parquet):
        storage.write_bytes(f"{s3_bucket}/in/{os.path.basename(local)}", open(local, "rb").read())
    remote_parquet = f"{s3_bucket}/in/stretched.parquet"
    assert list(ft.read_features(remote_parquet, TABLE.matches, features_per_task=5000)) == \
        list(ft.read_features(stretched_parquet, TABLE.matches, features_per_task=5000))  # fmt: skip
    out = f"{s3_bucket}/cells"
    assert select_cells.main(["--osm", f"{s3_bucket}/in/stretched.gpkg", "--out", out, "--categories", table_uri,
                              "--features_per_task", "4000", "--map", "false"]) == 0  # fmt: skip
    assert "building" in capsys.readouterr().out
    report = json.loads(storage.read_text(f"{out}/report.json"))
    local = _run(stretched_gpkg, str(tmp_path / "l"), table_uri, features_per_task=4000, map=False)
    assert report["candidates"] == local["candidates"] and report["cells"] == local["cells"]
    for missing in ("nothing.gpkg", "nothing.parquet"):
        with pytest.raises(FileNotFoundError):
            ft.plan(f"{s3_bucket}/in/{missing}")
