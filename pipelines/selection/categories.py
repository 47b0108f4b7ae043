"""The category table: which OpenStreetMap features make a grid cell a candidate for which category.

YAML (configs/osm_categories.yaml is the default, the original's list):

    extra_tags:                 # optional: tags outside the built-in vocabulary that this table may use
      crop: [rice, maize]       #   key: [values] ("*": any value)
    categories:
      <name>:                   # a category matches a feature when ANY of its filters matches
        - {<key>: <value> | [<values>] | "*", ..., not: {<key>: <value(s)> | "*"}}
                                # a filter matches when EVERY key has one of its values ("*": the key is
                                # present) and NO key of `not` has one of its values

Why a vocabulary: a typo (`landuse: farmlnd`, `man_mde: tower`) would silently select nothing, so every key
and value is checked against KNOWN_TAGS (the keys and values of the OSM wiki's Map Features for the keys the
original uses, plus a few common ones: our list, not exhaustive) or the table's own `extra_tags`; an unknown
one is refused with the category and the tag named. YAML 1.1 reads `yes` / `no` as booleans: they are read
back as the strings "yes" / "no".
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

ANY = "*"
_A = None  # a key whose values are open (names, numbers, free text): any value is known
KNOWN_TAGS: dict[str, frozenset | None] = {k: (frozenset(v.split()) if v is not None else None) for k, v in {
    "aerialway": "pylon cable_car gondola chair_lift drag_lift t-bar j-bar platter rope_tow magic_carpet "
                 "zip_line station goods mixed_lift",
    "aeroway": "aerodrome runway taxiway apron hangar airstrip terminal helipad heliport launchpad gate "
               "windsock navigationaid holding_position parking_position spaceport",
    "amenity": "fountain fuel parking hospital ferry_terminal place_of_worship school university college "
               "kindergarten bus_station marketplace prison fire_station police townhall library clinic "
               "bicycle_parking charging_station car_wash grave_yard recycling waste_disposal shelter "
               "bench toilets restaurant cafe bank pharmacy post_office theatre cinema",
    "barrier": "toll_booth fence wall gate hedge bollard border_control lift_gate kerb retaining_wall",
    "building": _A, "bridge": _A, "tunnel": _A, "sport": _A, "area": "yes no", "name": _A, "surface": _A,
    "generator:source": "wind solar hydro biomass coal gas oil nuclear geothermal waste battery diesel tidal",
    "highway": "motorway trunk primary secondary tertiary unclassified residential service motorway_link "
               "trunk_link primary_link secondary_link tertiary_link living_street pedestrian track footway "
               "cycleway path bridleway steps road trailhead bus_stop crossing traffic_signals turning_circle "
               "street_lamp rest_area services",
    "landuse": "farmland orchard vineyard industrial cemetery allotments reservoir quarry greenhouse_horticulture "
               "landfill winter_sports aquaculture forest meadow grass residential commercial retail "
               "farmyard railway military construction brownfield greenfield basin salt_pond plant_nursery "
               "recreation_ground village_green religious garages port",
    "leisure": "pitch swimming_pool park garden playground sports_centre track slipway stadium golf_course "
               "marina water_park horse_riding beach_resort ice_rink climbing nature_reserve dog_park "
               "fitness_centre picnic_table common recreation_ground miniature_golf sauna",
    "man_made": "chimney crane obelisk observatory satellite_dish tower works flagpole pier lighthouse "
                "mineshaft storage_tank silo wastewater_plant communications_tower water_tower petroleum_well "
                "offshore_platform beacon bridge flare oil_gas_separator pumping_station breakwater groyne "
                "embankment dyke mast pipeline reservoir_covered water_works antenna cutline street_cabinet",
    "natural": "peak cape geyser hot_spring arch cave_entrance hill volcano wood water wetland scrub heath "
               "grassland bare_rock sand beach glacier coastline cliff tree tree_row scree shingle mud bay "
               "spring ridge saddle valley rock stone fell shrubbery",
    "plant:source": "wind solar biomass hydro coal gas oil geothermal nuclear waste battery diesel tidal",
    "power": "plant tower substation generator line minor_line pole cable transformer portal switch",
    "railway": _A,  # the original takes every railway value (then leaves out abandoned ones and tunnels)
    "resource": "sand gravel clay coal peat stone limestone granite salt ore oil gas",
    "seamark:type": _A, "shop": _A, "water": "lock river lake pond reservoir canal oxbow lagoon basin stream "
                                             "wastewater fishpond moat ditch drain stream_pool",
    "waterway": "river dam stream canal drain ditch weir waterfall lock_gate riverbank dock boatyard rapids "
                "fuel",
    "tourism": "theme_park zoo attraction camp_site caravan_site hotel museum viewpoint picnic_site "
               "artwork information aquarium",
    "boundary": _A, "place": _A, "military": _A, "historic": _A, "wetland": _A, "crop": _A, "produce": _A,
}.items()}


@dataclass(frozen=True)
class Clause:
    """One filter: every (key, values) of `need` holds (values None: the key is present), none of `avoid`."""

    need: tuple[tuple[str, frozenset | None], ...]
    avoid: tuple[tuple[str, frozenset | None], ...]

    def matches(self, tags: dict) -> bool:
        return all(_has(tags, k, v) for k, v in self.need) and not any(_has(tags, k, v) for k, v in self.avoid)


def _has(tags: dict, key: str, values: frozenset | None) -> bool:
    value = tags.get(key)
    return value is not None and (values is None or value in values)


@dataclass(frozen=True)
class CategoryTable:
    categories: tuple[tuple[str, tuple[Clause, ...]], ...]  # (name, filters) in the table's order
    # key -> value (None: any value) -> (category index, filter): each filter filed under one key it needs,
    # so a feature only tries the filters of its own tags (118 categories cost a few dict look-ups)
    index: dict

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.categories]

    def categories_of(self, tags: dict) -> list[str]:
        hits = set()
        for key, value in tags.items():
            by_value = self.index.get(key)
            if by_value is None:
                continue
            for i, clause in by_value.get(value, ()) + by_value.get(None, ()):
                if i not in hits and clause.matches(tags):
                    hits.add(i)
        return [self.categories[i][0] for i in sorted(hits)]

    def matches(self, tags: dict) -> bool:
        return bool(self.categories_of(tags))


def _index(categories) -> dict:
    """File each filter under its first key with listed values (else its first key) and each of them."""
    index: dict = {}
    for i, (_, clauses) in enumerate(categories):
        for clause in clauses:
            key, values = next(((k, v) for k, v in clause.need if v is not None), clause.need[0])
            by_value = index.setdefault(key, {})
            for value in values if values is not None else [None]:
                by_value[value] = by_value.get(value, ()) + ((i, clause),)
    return index


def _text(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _values(where: str, key: str, raw, known: dict) -> frozenset | None:
    if key not in known:
        raise ValueError(f"{where}: unknown OSM key {key!r}; add it under extra_tags if it is meant")
    values = [_text(v) for v in (raw if isinstance(raw, list) else [raw])]
    if ANY in values:
        return None
    vocabulary = known[key]
    for v in values:
        if vocabulary is not None and v not in vocabulary:
            raise ValueError(f"{where}: unknown value {key}={v!r}; add it under extra_tags.{key} if it is meant")
    return frozenset(values)


def _clause(where: str, raw, known: dict) -> Clause:
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: a filter must be a mapping of OSM key -> value(s), got {raw!r}")
    avoid = raw.get("not", {})
    if not isinstance(avoid, dict):
        raise ValueError(f"{where}: `not` must be a mapping of OSM key -> value(s), got {avoid!r}")
    need = tuple((str(k), _values(where, str(k), v, known)) for k, v in raw.items() if k != "not")
    if not need:
        raise ValueError(f"{where}: a filter needs at least one key besides `not`")
    return Clause(need, tuple((str(k), _values(where, str(k), v, known)) for k, v in avoid.items()))


def _known(source: str, extra) -> dict:
    known = dict(KNOWN_TAGS)
    if not isinstance(extra, dict):
        raise ValueError(f"{source}: extra_tags must be a mapping of key -> [values] or '*'")
    for key, values in extra.items():
        values = [_text(v) for v in (values if isinstance(values, list) else [values])]
        old = known.get(str(key), frozenset())
        known[str(key)] = None if ANY in values or old is None else old | frozenset(values)
    return known


def parse_table(doc, source: str) -> CategoryTable:
    """A parsed YAML document -> the validated table; errors name `source`, the category and the tag."""
    if not isinstance(doc, dict) or not isinstance(doc.get("categories"), dict) or not doc["categories"]:
        raise ValueError(f"{source}: expected a mapping with a non-empty `categories:` mapping")
    unknown = set(doc) - {"categories", "extra_tags"}
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)} (expected categories, extra_tags)")
    known = _known(source, doc.get("extra_tags") or {})
    categories = []
    for name, filters in doc["categories"].items():
        where = f"{source}: category {name!r}"
        filters = filters if isinstance(filters, list) else [filters]
        if not filters:
            raise ValueError(f"{where}: no filters")
        categories.append((str(name), tuple(_clause(where, f, known) for f in filters)))
    return CategoryTable(tuple(categories), _index(categories))


def load_table(uri: str, storage=None) -> CategoryTable:
    """The table at `uri`; a relative path missing from the working directory is looked up in the repository
    (the default `configs/osm_categories.yaml` works from anywhere)."""
    import os

    from pipelines.common.storage import Storage, is_s3

    if not is_s3(uri) and not os.path.isabs(uri) and not os.path.exists(uri):
        in_repo = os.path.join(os.path.dirname(__file__), "..", "..", uri)
        uri = os.path.normpath(in_repo) if os.path.exists(in_repo) else uri
    try:
        text = (storage or Storage()).read_text(uri)
    except FileNotFoundError:
        raise ValueError(f"{uri}: category table not found") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{uri}: not valid YAML ({e})") from None
    return parse_table(doc, uri)
