"""A STAC catalog as an image source (`pipelines.imagery.sources.ImageSource`): the items of an area, searched
once on the driver, read per tile as windows of their COGs, masked, harmonised and composited per month.

    source = StacSource("https://earth-search.aws.element84.com/v1", {"sentinel2_l2a": "sentinel-2-l2a"},
                        Storage(), "2024-04-01", "2024-09-30", grid=grid)
    x = source.read(tile, grid)      # {modality: (size, size, T, C)} float32 model units, NaN = missing

`stac` is a STAC API (searched with pystac-client: collections, the area's lon/lat box, the time range) or a
static catalog / collection / ItemCollection JSON at any URI (local, s3://, http(s)://; walked with pystac and
filtered the same way). Each item becomes a small record (`stac_items.item_record`): its month on the job's
timeline, its cloud cover, its footprint (exact from the projection extension when the item has it, else its
lon/lat bbox), its own href, the href of each registry band and of its cloud mask, and its
radiometric rule (`pipelines.imagery.units`). The records are the source's spec: workers never search. An area
job partitions them (`spec(tiles, grid)`): each block of GROUP_TILES x GROUP_TILES tiles gets the records
meeting it, put once in the Ray object store, and a worker fetches only the blocks of the tiles it reads, so a
10,000-item area does not ship 10,000 records to every actor.

A tile: per modality and month, the items whose footprint meets the tile, in order of `eo:cloud_cover`; per item
each bandset warped (nearest) from the COG's window onto the tile at the bandset's stored resolution (10 / 20 /
40 m, as the corpus) and repeated onto 10 m, its cloud mask warped at 10 m (`pipelines.imagery.composite`), the
first clear value per pixel kept (or the median). Reads are ranged (GDAL, the blocks of the window only) and
retried with backoff; a read that still fails fails the tile with the item, asset and error.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import numpy as np
from affine import Affine

from olmoearth.modalities import BASE_GSD, MODALITIES
from pipelines.common.storage import Storage
from pipelines.imagery import units
from pipelines.imagery.composite import MASK_KIND, Composite, clear_pixels
from pipelines.imagery.grid import Grid, Tile, bbox_to_crs
from pipelines.imagery.sources import Handles, aligned_step, as_crs, warp_window
from pipelines.imagery.stac_io import storage_stac_io
from pipelines.imagery.stac_items import ASSET_KEYS, item_bounds, item_record

MAX_MONTHS = 12  # the model's timesteps
GROUP_TILES = 8  # the item list travels to the workers in groups of GROUP_TILES x GROUP_TILES tiles
RETRIES = 3  # attempts per asset read
BACKOFF_S = 0.25  # first wait between attempts, doubled each time



class StacReadError(RuntimeError):
    """An asset that could not be read after every retry (names the item, asset and href)."""


def month_timeline(time_start: str, time_end: str) -> tuple[tuple[int, int], np.ndarray]:
    """((year, month) of the first, months (T,) 0 = January): the calendar months from time_start's to
    time_end's, at most 12."""
    if not (time_start and time_end):
        raise ValueError("time_start and time_end: both required with stac (ISO dates; up to 12 months)")
    a, b = dt.date.fromisoformat(time_start), dt.date.fromisoformat(time_end)
    n = (b.year - a.year) * 12 + b.month - a.month + 1
    if b < a or n > MAX_MONTHS:
        raise ValueError(f"time range {time_start}..{time_end}: must span 1..{MAX_MONTHS} calendar months")
    return (a.year, a.month), np.asarray([(a.month - 1 + k) % 12 for k in range(n)], dtype=np.int64)


# ---- the catalog ------------------------------------------------------------------------------------------


def read_root(url: str, storage: Storage, io=None) -> dict:
    """The JSON at `url` (a STAC API landing page, a catalog, a collection or an ItemCollection)."""
    try:
        return json.loads((io or storage_stac_io(storage)).read_text_from_href(url))
    except Exception as e:  # noqa: BLE001 - any failure to reach or parse it is the same user error
        raise ValueError(f"stac {url}: cannot read the catalog: {type(e).__name__}: {e}") from None


def is_api(root: dict) -> bool:
    """A STAC API landing page: it conforms to item search or links a search endpoint."""
    conforms = any("item-search" in c for c in root.get("conformsTo", []))
    return conforms or any(link.get("rel") == "search" for link in root.get("links", []))


def search(url: str, collection_ids: list[str], bbox: tuple, time_range: tuple[str, str],
           storage: Storage) -> list[dict]:  # fmt: skip
    """Item dicts of `collection_ids` meeting lon/lat `bbox` in [time_range]: one search of the API, or one
    walk of the static catalog filtered the same way (asset hrefs made absolute)."""
    io = storage_stac_io(storage)
    root = read_root(url, storage, io)
    when = f"{time_range[0]}T00:00:00Z/{time_range[1]}T23:59:59Z"
    if is_api(root):
        from pystac_client import Client

        try:
            client = Client.open(url, stac_io=None)
            found = client.search(collections=collection_ids, bbox=list(bbox), datetime=when, max_items=None)
            return list(found.items_as_dicts())
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"stac {url}: search failed: {type(e).__name__}: {e}") from None
    return [d for d in _static_items(url, root, io) if d.get("collection") in collection_ids
            and _meets(d.get("bbox"), bbox) and _in_time(d.get("properties", {}), time_range)]  # fmt: skip


def _static_items(url: str, root: dict, io) -> list[dict]:
    import pystac

    if root.get("type") == "FeatureCollection":
        coll = pystac.ItemCollection.from_dict(root, root=None, preserve_dict=True)
        items = list(coll.items)
        for it in items:
            it.set_self_href(url)  # relative asset hrefs resolve against the ItemCollection's folder
    else:
        try:
            obj = pystac.read_dict(root, href=url, stac_io=io)  # the root as read_root read it
            items = list(obj.get_items(recursive=True))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"stac {url}: cannot walk the catalog: {type(e).__name__}: {e}") from None
    out = []
    for it in items:
        if it.get_self_href():
            it.make_asset_hrefs_absolute()
        d = it.to_dict(include_self_link=True, transform_hrefs=False)  # its self href: the output's derived_from
        if not d.get("collection") and it.get_parent() is not None:
            d["collection"] = it.get_parent().id
        out.append(d)
    return out


def _meets(item_bbox, bbox) -> bool:
    if not item_bbox:
        return True  # no footprint given: the reads find out
    b = item_bbox if len(item_bbox) == 4 else [item_bbox[0], item_bbox[1], item_bbox[3], item_bbox[4]]
    return not (b[0] > bbox[2] or b[2] < bbox[0] or b[1] > bbox[3] or b[3] < bbox[1])


def _in_time(props: dict, time_range: tuple[str, str]) -> bool:
    start = str(props.get("datetime") or props.get("start_datetime") or "")[:10]
    end = str(props.get("datetime") or props.get("end_datetime") or start)[:10]
    return bool(start) and start <= time_range[1] and end >= time_range[0]


def find_items(url: str, collections: dict[str, str], grid: Grid, time_start: str, time_end: str,
               storage: Storage, assets: dict | None = None, sign: str = "") -> list[dict]:  # fmt: skip
    """The records of every item of the job's modalities meeting the area and time range, searched once."""
    first, months = month_timeline(time_start, time_end)
    bbox = bbox_to_crs(grid_bounds(grid), grid.crs, "EPSG:4326")
    by_coll: dict[str, list[str]] = {}
    for m, coll in collections.items():
        by_coll.setdefault(coll, []).append(m)
    records = []
    signer = href_signer(sign)
    for d in search(url, sorted(by_coll), bbox, (time_start, time_end), storage):
        for a in d.get("assets", {}).values():
            if signer is not None and a.get("href"):
                a["href"] = signer(a["href"])
        for m in by_coll.get(d.get("collection"), []):
            rec = item_record(d, m, first, (assets or {}).get(m))
            if 0 <= rec["k"] < len(months):
                records.append(rec)
    if not records:
        raise ValueError(f"stac {url}: no item of collection(s) {sorted(by_coll)} meets the area "
                         f"(lon/lat {tuple(round(v, 4) for v in bbox)}) in {time_start}..{time_end}")  # fmt: skip
    return sorted(records, key=lambda r: (r["modality"], r["k"], r["cloud"], str(r["id"])))


def group_key(tile: Tile, n: int | None = None) -> str:
    """The item group of a tile (partitioned specs): tiles in blocks of n x n (default GROUP_TILES)."""
    n = n or GROUP_TILES
    return f"{tile.row // n}_{tile.col // n}"


def href_signer(sign: str):
    """None (no signing) or a function href -> signed href. planetary_computer: the `planetary-computer`
    package appends a SAS token to each Azure Blob href, fetched once per storage container; tokens expire
    after about an hour, so a longer job signs again by being rerun (finished tiles are kept)."""
    if not sign:
        return None
    if sign != "planetary_computer":
        raise ValueError(f"sign: '' or 'planetary_computer', got {sign!r}")
    try:
        import planetary_computer
    except ImportError:
        raise ValueError("sign: planetary_computer needs the planetary-computer package (pip install "
                         "planetary-computer), which this project does not install") from None  # fmt: skip
    return planetary_computer.sign


def grid_bounds(grid: Grid) -> tuple[float, float, float, float]:
    r = grid.resolution
    return grid.x0, grid.y0 - grid.height * r, grid.x0 + grid.width * r, grid.y0


# ---- the source ---------------------------------------------------------------------------------------------


class StacSource:
    def __init__(self, stac: str, collections: dict[str, str], storage: Storage, time_start: str, time_end: str,
                 grid: Grid | None = None, assets: dict | None = None, composite: str = "first",
                 cloud_classes: dict | None = None, _items: list | None = None, sign: str = ""):  # fmt: skip
        """`grid`: search the area's items (driver); `_items`: the records the driver found (workers)."""
        if not collections:
            raise ValueError("collections: give {modality: collection id}, e.g. {sentinel2_l2a: sentinel-2-l2a}")
        for m in collections:
            if m not in ASSET_KEYS:
                raise ValueError(f"collections: {m!r} is not an encoder modality ({', '.join(ASSET_KEYS)})")
        for m, codes in (cloud_classes or {}).items():
            if m not in MASK_KIND or not isinstance(codes, list):
                raise ValueError(f"cloud_classes: {{modality: [codes]}} for {sorted(MASK_KIND)}, got {m!r}: {codes!r}")
        Composite(composite, (1, 1, 1))  # checks the method's name
        self.url, self.collections, self.storage = stac, dict(collections), storage
        self.time, self.assets, self.method = (time_start, time_end), dict(assets or {}), composite
        self.cloud_classes = dict(cloud_classes or {})
        self.first, self.months = month_timeline(time_start, time_end)
        if _items is None:
            if grid is None:
                raise ValueError("StacSource: give the area's grid (driver) or the item records (worker)")
            _items = find_items(stac, self.collections, grid, time_start, time_end, storage, self.assets, sign)
        self.items = _items
        self.handles = Handles(storage)
        self._empty: dict[str, str] = {}  # tile id -> why it came out empty (`explain_empty`)
        self._footprints: dict[tuple, tuple] = {}  # item -> its bbox in the grid's CRS
        self._gaps: dict[str, list[str]] = {}  # tile id -> its months with scenes but no clear pixel
        self._groups: dict | None = None  # worker of a partitioned spec: {group key: ObjectRef of its records}
        self._group_items: dict[str, list[dict]] = {}
        self._group_tiles: int | None = None  # the driver's GROUP_TILES

    @classmethod
    def from_spec(cls, spec: dict, storage: Storage) -> StacSource:
        src = cls(spec["stac"], spec["collections"], storage, *spec["time"], assets=spec["assets"],
                  composite=spec["composite"], cloud_classes=spec["cloud_classes"], _items=spec["items"] or [])  # fmt: skip
        src._groups, src._group_tiles = spec.get("item_groups"), spec.get("group_tiles")
        return src

    def spec(self, tiles: list[Tile] | None = None, grid: Grid | None = None) -> dict:
        """What a worker rebuilds the source from. With the job's tiles and grid (on a Ray driver) the item
        list is partitioned: each group of GROUP_TILES x GROUP_TILES tiles gets only the items meeting the box
        of its tiles, put in the Ray object store once, and a worker fetches the groups of the tiles it reads;
        without them the spec holds every item."""
        spec = {"kind": "stac", "stac": self.url, "collections": self.collections, "time": list(self.time),
                "assets": self.assets, "composite": self.method, "cloud_classes": self.cloud_classes,
                "items": self.items}  # fmt: skip
        if tiles is not None and grid is not None:
            import ray

            spec["items"], spec["group_tiles"] = None, GROUP_TILES
            spec["item_groups"] = {k: ray.put(v) for k, v in self.partition(tiles, grid).items()}
        return spec

    def partition(self, tiles: list[Tile], grid: Grid) -> dict[str, list[dict]]:
        """{group key: the records meeting the box of that group's tiles}: one bbox test per item and group."""
        boxes: dict[str, list[float]] = {}
        for t in tiles:
            b = t.bounds(grid)
            box = boxes.setdefault(group_key(t), list(b))
            box[:] = [min(box[0], b[0]), min(box[1], b[1]), max(box[2], b[2]), max(box[3], b[3])]
        return {k: [r for r in self.items if self._meets_tile(r, grid, tuple(box))] for k, box in boxes.items()}

    def items_for(self, tile: Tile) -> list[dict]:
        """The records a worker may need for `tile`: all of them, or its group's (fetched once per group)."""
        if self._groups is None:
            return self.items
        key = group_key(tile, self._group_tiles)
        if key not in self._group_items:
            import ray

            self._group_items[key] = ray.get(self._groups[key]) if key in self._groups else []
        return self._group_items[key]

    @property
    def modalities(self) -> list[str]:
        return list(self.collections)

    def read(self, tile: Tile, grid: Grid) -> dict[str, np.ndarray]:
        bounds = tile.bounds(grid)
        out, notes, gaps = {}, [], []
        with self.handles.env_ctx():
            for m in self.collections:
                c = MODALITIES[m].num_bands
                out[m] = np.full((tile.size, tile.size, len(self.months), c), np.nan, np.float32)
                mine = [r for r in self.items_for(tile) if r["modality"] == m and self._meets_tile(r, grid, bounds)]
                for k in range(len(self.months)):
                    scenes = [r for r in mine if r["k"] == k]  # already in order of cloud cover
                    comp = Composite(self.method, (tile.size, tile.size, c))
                    for rec in scenes:
                        self._add_scene(comp, rec, tile, grid, bounds)
                        if comp.full:
                            break
                    out[m][:, :, k] = comp.result()
                    if scenes and not np.isfinite(out[m][:, :, k]).any():
                        gaps.append(f"{m} {self.month_label(k)}: item(s) {[r['id'] for r in scenes]} all cloud/shadow/nodata")
                notes.append(f"{m}: {len(mine)} scene(s) meet the tile" + (", none of their pixels clear or with "
                             "data (cloud, shadow or nodata)" if mine else ""))  # fmt: skip
        if not any(np.isfinite(a).any() for a in out.values()):
            self._empty[tile.id] = "; ".join(notes)
        self._gaps[tile.id] = gaps
        return out

    def month_label(self, k: int) -> str:
        """'YYYY-MM' of timeline index k."""
        n = self.first[0] * 12 + self.first[1] - 1 + k
        return f"{n // 12:04d}-{n % 12 + 1:02d}"

    def explain_gaps(self, tile: Tile) -> str:
        """The months of the last read of `tile` whose scenes had no clear pixel ("" when none): each with its
        modality and item ids. The tile is still written with its other months."""
        return "; ".join(self._gaps.get(tile.id, []))

    def _meets_tile(self, rec: dict, grid: Grid, bounds: tuple) -> bool:
        """Whether the item's footprint (`item_bounds` in the grid's CRS, taken once) meets the tile."""
        key = (rec["id"], rec["collection"], grid.crs)
        fp = self._footprints.get(key)
        if fp is None:
            fp = self._footprints[key] = item_bounds(rec, grid.crs)
        return not (fp[0] >= bounds[2] or fp[2] <= bounds[0] or fp[1] >= bounds[3] or fp[3] <= bounds[1])

    def explain_empty(self, tile: Tile) -> str | None:
        """Why the last read of `tile` had no data at all (which scenes met it), if it had none."""
        return self._empty.get(tile.id)

    def _add_scene(self, comp: Composite, rec: dict, tile: Tile, grid: Grid, bounds: tuple) -> None:
        """One item's pixels of the tile in model units, masked, added to the month's composite: its band files
        and mask read at once (`Handles.map`). A scene none of whose band files reaches the tile (a neighbour
        whose footprint only touches it) adds nothing."""
        m = rec["modality"]
        bands = [(b, bs.resolution) for bs in MODALITIES[m].bandsets for b in bs.bands]  # registry band order
        mask_job = [None] if rec["mask"] is not None else []

        def read(job):  # one file: a band, or (None) the mask
            if job is None:
                return self._warp(rec, *rec["mask"], BASE_GSD, tile, grid, bounds, native=True)
            return self._band(rec, *job, tile, grid, bounds)

        files = self.handles.map(read, bands + mask_job)  # all of the scene's files at once
        vals, mask = files[: len(bands)], (files[-1] if mask_job else None)
        if all(v is None for v in vals):
            return
        pixels = np.full((tile.size, tile.size, len(bands)), np.nan, np.float32)
        for c, v in enumerate(vals):
            if v is not None:
                pixels[:, :, c] = v
        if m == "sentinel2_l2a":
            units.harmonise_s2(pixels, rec["offset"])
        elif m == "sentinel1" and rec["db"]:
            units.power_to_db(pixels)
        clear = None
        if mask is not None:
            mask, res = mask
            if mask is None:
                return  # no mask value over the tile: no pixel is clear
            clear = clear_pixels(m, units.to_10m(mask, res)[: tile.size, : tile.size], self.cloud_classes.get(m))
        comp.add(pixels, clear)

    def _band(self, rec: dict, band: str, res: float, tile: Tile, grid: Grid, bounds: tuple) -> np.ndarray | None:
        """One band on the tile's 10 m pixels, warped at its stored resolution `res` and repeated onto 10 m;
        float32 with the modality's nodata as NaN. None when its file does not reach the tile."""
        key, href = rec["assets"][band]
        vals = self._warp(rec, key, href, res, tile, grid, bounds)[0]
        if vals is None:
            return None
        raw_nodata = units.RAW_FORMAT[rec["modality"]][1]
        if raw_nodata is not None:
            vals[vals == raw_nodata] = np.nan
        return units.to_10m(vals, res)[: tile.size, : tile.size]

    def _warp(self, rec: dict, key: str, href: str, res: float, tile: Tile, grid: Grid, bounds: tuple,
              native: bool = False) -> tuple[np.ndarray | None, float]:  # fmt: skip
        """Asset `key` of `rec` warped (nearest) onto a grid of `res` metres from the tile's top-left corner
        covering the tile -> ((n, n) float32, NaN outside the asset or at its nodata, or None when the asset
        does not reach the tile; the step used); retried. native: a file whose pixels are an integer multiple
        of `res` with an edge on the tile's corner (a 20 m SCL for the 10 m grid) is copied at its own step
        instead, for the caller to repeat onto `res`: nearest neighbour gives exactly those values."""
        from rasterio.warp import transform_bounds

        for attempt in range(RETRIES):
            try:
                ds = self.handles.get(href)
                if ds.crs is None or not ds.crs.is_projected:
                    raise ValueError(f"its CRS ({ds.crs}) is not a projected CRS the grid can use")
                step = (aligned_step(ds, grid.crs, bounds[0], bounds[3], res) if native else None) or res
                n = int(np.ceil(tile.size * grid.resolution / step))
                dst_t = Affine(step, 0, bounds[0], 0, -step, bounds[3])
                cover = (bounds[0], bounds[3] - n * step, bounds[0] + n * step, bounds[3])
                want = cover if ds.crs == as_crs(grid.crs) else transform_bounds(grid.crs, ds.crs, *cover,
                                                                                densify_pts=21)  # fmt: skip
                part = warp_window(ds, want, grid.crs, dst_t, (1, n, n), indexes=[1])
                return (part[0] if part is not None else None), step
            except ValueError as e:  # a property of the file: no retry helps
                raise StacReadError(f"item {rec['id']!r} asset {key!r} ({href}): {e}") from None
            except Exception as e:  # noqa: BLE001 - I/O and decoding errors: retried, then reported
                self.handles.drop(href)
                if attempt == RETRIES - 1:
                    raise StacReadError(f"item {rec['id']!r} asset {key!r} ({href}): {type(e).__name__}: {e}") from None
                time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")
