"""The `openstreetmap_raster` modality of one cell: 30 binary channels at 2.5 m (1024 x 1024 px) rasterised
from OpenStreetMap features (shapely geometries in lon/lat with their tags).

    classes = feature_classes(tags)                       # the channels a feature's tags belong to
    raster = rasterise(features, epsg, col, row)         # uint8 (30, 1024, 1024), 1 where a feature lies

Where the rules come from: the original's rslearn dataset config for this layer,
github allenai/olmoearth_pretrain `data/rslearn_dataset_configs/config_openstreetmap.json` (per category: the
tag conditions, the OSM element types and the geometry the feature is turned into), and its rasteriser
`rasterize_openstreetmap` in the same repository (dataset_creation; polygons filled with their holes left out,
line strings drawn as one-pixel lines, points as one pixel, at 10 / 4 = 2.5 m on the cell's grid). CLASS_RULES
below restates that config: (tag key, accepted values (empty: any value), element types, geometry). Categories
whose geometry is "Point" are rasterised at one pixel (a way or area becomes its centroid, as rslearn's
`to_geometry: Point`); "river" keeps its own geometry. One difference, deliberate: the original's `water_tower`
condition is spelled `man_mode` (a typo that matches no OSM tag); this module uses `man_made=water_tower`.
Relations are not assembled by the PBF reader (`pipelines.selection.pbf`), so multipolygon-only features
(large aerodromes, some parks) are missing from the raster; their member ways count when they carry the tags.
"""

from __future__ import annotations

import numpy as np

from olmoearth.modalities import OSM_FEATURES, TILE_METRES

RESOLUTION = 2.5  # metres per pixel of the stored raster
SIZE = int(TILE_METRES / RESOLUTION)  # 1024 px per side
ANY = ("node", "way", "relation")
AREA = ("way", "relation")

# category -> (tag key, accepted values (() = any value), element types, geometry: Point | LineString |
# Polygon | None (as it is))
CLASS_RULES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str | None]] = {
    "aerialway_pylon": ("aerialway", ("pylon",), ANY, "Point"),
    "aerodrome": ("aeroway", ("aerodrome",), AREA, "Polygon"),
    "airstrip": ("aeroway", ("airstrip",), ("way",), "LineString"),
    "amenity_fuel": ("amenity", ("fuel",), AREA, "Polygon"),
    "building": ("building", (), AREA, "Polygon"),
    "chimney": ("man_made", ("chimney",), ANY, "Point"),
    "communications_tower": ("man_made", ("communications_tower",), ANY, "Point"),
    "crane": ("man_made", ("crane",), ANY, "Point"),
    "flagpole": ("man_made", ("flagpole",), ANY, "Point"),
    "fountain": ("amenity", ("fountain",), ANY, "Point"),
    "generator_wind": ("generator:source", ("wind",), ANY, "Point"),
    "helipad": ("aeroway", ("helipad",), ANY, "Point"),
    "highway": ("highway", (), ("way",), "LineString"),
    "leisure": ("leisure", (), AREA, "Polygon"),
    "lighthouse": ("man_made", ("lighthouse",), ANY, "Point"),
    "obelisk": ("man_made", ("obelisk",), ANY, "Point"),
    "observatory": ("man_made", ("observatory",), ANY, "Point"),
    "parking": ("amenity", ("parking",), AREA, "Polygon"),
    "petroleum_well": ("man_made", ("petroleum_well",), ANY, "Point"),
    "power_plant": ("power", ("plant",), AREA, "Polygon"),
    "power_substation": ("power", ("substation",), AREA, "Polygon"),
    "power_tower": ("power", ("tower",), ANY, "Point"),
    "river": ("waterway", ("river",), AREA, None),
    "runway": ("aeroway", ("runway",), ("way",), "LineString"),
    "satellite_dish": ("man_made", ("satellite_dish",), ANY, "Point"),
    "silo": ("man_made", ("silo",), ANY, "Point"),
    "storage_tank": ("man_made", ("storage_tank",), ANY, "Point"),
    "taxiway": ("aeroway", ("taxiway",), ("way",), "LineString"),
    "water_tower": ("man_made", ("water_tower",), ANY, "Point"),
    "works": ("man_made", ("works",), AREA, "Polygon"),
}
assert tuple(CLASS_RULES) == OSM_FEATURES, "the rules must be in the registry's channel order"
CHANNEL = {name: i for i, name in enumerate(OSM_FEATURES)}


def feature_classes(tags: dict, osm_type: str | None = None) -> list[str]:
    """The categories whose tag condition (and element type, when given) the feature meets."""
    out = []
    for name, (key, values, types, _) in CLASS_RULES.items():
        v = tags.get(key)
        if v is None or (values and v not in values) or (osm_type is not None and osm_type not in types):
            continue
        out.append(name)
    return out


def matches(tags: dict) -> bool:
    """Whether any category wants this feature (the filter handed to the PBF reader)."""
    return bool(feature_classes(tags))


def _as_geometry(geom, kind: str | None):
    """The feature's geometry as its category takes it: Point categories get the centroid of a way or area; a
    Polygon category keeps only areas (a closed way the reader left as a LineString is made a polygon)."""
    from shapely.geometry import Polygon

    if kind == "Point" and geom.geom_type != "Point":
        return geom.centroid
    if kind == "Polygon" and geom.geom_type == "LineString":
        coords = list(geom.coords)
        return Polygon(coords) if len(coords) >= 4 and coords[0] == coords[-1] else None
    return geom


def rasterise(features, epsg: int, col: int, row: int) -> np.ndarray:
    """features: iterable of (shapely geometry in EPSG:4326, tags dict, osm type or None) -> uint8
    (30, 1024, 1024) for cell (epsg, col, row): polygons filled (holes left out), lines one pixel wide (every
    pixel a segment passes), points one pixel; features outside the cell leave it untouched."""
    import shapely
    from pyproj import Transformer
    from rasterio.features import rasterize

    from pipelines.corpus.raw_layout import cell_transform

    tr = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)

    def to_utm(xy: np.ndarray) -> np.ndarray:  # (N, 2) lon/lat -> (N, 2) metres
        return np.column_stack(tr.transform(xy[:, 0], xy[:, 1]))

    t = cell_transform(col, row, RESOLUTION)
    shapes: dict[int, list] = {}
    for geom, tags, osm_type in features:
        utm = None
        for name in feature_classes(tags, osm_type):
            kind = CLASS_RULES[name][3]
            if utm is None:
                utm = shapely.transform(geom, to_utm)
            g = _as_geometry(utm, kind)
            if g is not None and not g.is_empty:
                shapes.setdefault(CHANNEL[name], []).append(g)
    out = np.zeros((len(OSM_FEATURES), SIZE, SIZE), np.uint8)
    for ch, geoms in shapes.items():
        # all_touched: a line marks every pixel it passes, a point the pixel it lies in
        out[ch] = rasterize([(g, 1) for g in geoms], out_shape=(SIZE, SIZE), transform=t, fill=0,
                            all_touched=True, dtype="uint8")  # fmt: skip
    return out


def read_osm_features(uri: str, lonlat_bbox: tuple | None = None) -> list[tuple]:
    """[(geometry lon/lat, tags, osm type or None)] of the features any category wants, from an OSM extract:
    a `.osm.pbf` or a GeoParquet / GeoPackage of features, read in this process by the selection's readers
    (pipelines/selection/pbf.py, features_table.py). `lonlat_bbox`: keep only features meeting it."""
    import json

    from shapely import wkb
    from shapely.geometry import box

    from pipelines.selection.config import osm_format

    if osm_format(uri) == "pbf":
        from pipelines.selection.pbf import read_features
    else:
        from pipelines.selection.features_table import read_features
    keep = box(*lonlat_bbox) if lonlat_bbox else None
    out = []
    for r in read_features(uri, matches):
        geom = wkb.loads(r["wkb"])
        if keep is None or geom.intersects(keep):
            out.append((geom, json.loads(r["tags"]), r["osm_type"] or None))
    return out
