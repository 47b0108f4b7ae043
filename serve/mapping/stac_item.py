"""A STAC Item for each embedding map (`<out>/item.json`), so that the map can itself be catalogued and searched.

It follows the STAC Embeddings extension (https://github.com/geo-embeddings/embeddings-stac-specification,
v0.0.1, prefix `emb:`): the asset `embeddings` (the COG, or the zarr store when no COG is written) and
`embeddings_zarr` / `chips` / `preview` beside it, `emb:type` / `emb:dimensions` / `data_type` / `gsd`,
`emb:runtime_parameters` (model, patch, tile, overlap, composite), `emb:quantization` (int8: linear, its scale),
`processing:datetime`; the projection extension's `proj:code` / `proj:transform` / `proj:shape`; and links:
`derived_from` to each source STAC item (StacSource's records carry their hrefs), `emb:source-data` to the
catalog or input, `emb:model` to the model. A map over several UTM zones has one asset per zone COG
(`embeddings_utm17`, ...) carrying that zone's `proj:` fields (`write_zones_item`). Asset hrefs are relative to item.json, so the folder can move."""

from __future__ import annotations

import datetime as dt
import json
import os

from pipelines.common.storage import Storage, join
from pipelines.imagery.grid import Grid, bbox_to_crs

EXTENSIONS = ["https://stac-extensions.github.io/embeddings/v0.0.1/schema.json",
              "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
              "https://stac-extensions.github.io/processing/v1.2.0/schema.json"]  # fmt: skip
MEDIA = {"cog": "image/tiff; application=geotiff; profile=cloud-optimized", "zarr": "application/vnd+zarr",
         "chips": "application/vnd.apache.parquet", "preview": "image/png"}  # fmt: skip


def source_refs(cfg) -> list[str]:
    """References to the job's input (the zarr's `geoemb:source_data`, the item's `emb:source-data` links):
    the STAC collections (API) or catalog, the corpus root, or the GeoTIFFs."""
    if cfg.stac:
        api = not cfg.stac.endswith(".json")
        return sorted({f"{cfg.stac.rstrip('/')}/collections/{c}" if api else cfg.stac for c in cfg.collections.values()})
    if cfg.source:
        return [cfg.source]
    return sorted(u for uris in cfg.geotiffs.values() for u in uris)


def lonlat_footprint(grid: Grid) -> tuple[list[float], dict]:
    """(lon/lat bbox, GeoJSON polygon) of the grid's area."""
    r = grid.resolution
    b = bbox_to_crs((grid.x0, grid.y0 - grid.height * r, grid.x0 + grid.width * r, grid.y0), grid.crs, "EPSG:4326")
    ring = [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]
    return list(b), {"type": "Polygon", "coordinates": [ring]}


def item_dict(cfg, grid: Grid, outputs: dict, dim: int, scale: float | None, source_items: list[dict],
              item_id: str) -> dict:  # fmt: skip
    """The Item as a dict; outputs {kind: uri} of the files written (cog, zarr, preview, chips)."""
    p = cfg.patch_size
    bbox, geom = lonlat_footprint(grid)
    props = {"datetime": None, "start_datetime": _iso(cfg.time_start or "", False),
             "end_datetime": _iso(cfg.time_end or cfg.time_start or "", True),
             "emb:type": "pixel", "emb:dimensions": int(dim), "data_type": "int8" if scale is not None else "float32",
             "gsd": float(p * grid.resolution),
             "emb:runtime_parameters": {"model": cfg.model_uri, "patch_size": p, "tile_size": cfg.tile_size,
                                        "overlap": cfg.overlap, "composite": cfg.composite if cfg.stac else None},
             "processing:datetime": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
             **proj_fields(grid, p)}  # fmt: skip
    if props["start_datetime"] is None:  # no time range given (corpus / GeoTIFF input): the run's time
        props.update(datetime=props["processing:datetime"], start_datetime=None, end_datetime=None)
        props = {k: v for k, v in props.items() if v is not None}
    if scale is not None:
        props["emb:quantization"] = {"method": "linear", "original_dtype": "float32", "quantized_dtype": "int8",
                                     "scale": [float(scale)], "offset": [0.0]}  # fmt: skip
    return {"type": "Feature", "stac_version": "1.0.0", "stac_extensions": EXTENSIONS, "id": item_id,
            "bbox": bbox, "geometry": geom, "properties": props, "links": links(cfg, source_items),
            "assets": assets(outputs)}  # fmt: skip


def assets(outputs: dict, zone_grids: dict | None = None, patch_size: int = 1) -> dict:
    """outputs {kind: uri}; a map over several UTM zones has kinds cog_<zone> / preview_<zone>, each of which
    becomes the asset embeddings_<zone> / preview_<zone> with its zone grid's proj: fields (zone_grids
    {zone: Grid})."""
    main = "cog" if any(k.partition("_")[0] == "cog" for k in outputs) else "zarr"
    out = {}
    for kind, uri in outputs.items():
        base, _, zone = kind.partition("_")
        if base not in MEDIA or (zone and kind not in (f"cog_{zone}", f"preview_{zone}")):
            continue
        if zone:
            key = f"embeddings_{zone}" if base == "cog" else kind
        else:
            key = "embeddings" if kind == main else {"zarr": "embeddings_zarr"}.get(kind, kind)
        roles = ["overview"] if base == "preview" else ["data"]
        out[key] = {"href": "./" + os.path.basename(uri.rstrip("/")), "type": MEDIA[base], "roles": roles}
        if zone and zone_grids and zone in zone_grids:
            out[key].update(proj_fields(zone_grids[zone], patch_size))
    return out


def proj_fields(grid: Grid, patch_size: int) -> dict:
    """The projection extension's fields of a map on `grid` at `patch_size` px per token."""
    return {"proj:code": grid.crs, "proj:transform": list(grid.transform(patch_size))[:6],
            "proj:shape": [grid.height // patch_size, grid.width // patch_size], "proj:bbox": list(grid_box(grid))}


def links(cfg, source_items: list[dict]) -> list[dict]:
    out = [{"rel": "emb:model", "href": cfg.model_uri, "title": "encoder"}]
    out += [{"rel": "emb:source-data", "href": ref} for ref in source_refs(cfg)]
    seen = set()
    for rec in source_items:
        key = (rec.get("collection"), rec.get("id"))
        if key in seen:
            continue
        seen.add(key)
        link = {"rel": "derived_from", "href": rec.get("href") or f"{cfg.stac}#{rec.get('collection')}/{rec.get('id')}",
                "type": "application/geo+json", "title": f"{rec.get('collection')}/{rec.get('id')}"}  # fmt: skip
        out.append(link)
    return out


def write_item(storage: Storage, cfg, grid: Grid, outputs: dict, dim: int, scale: float | None,
               source_items: list[dict], item_id: str) -> str:  # fmt: skip
    """Write out/item.json -> its uri."""
    uri = join(cfg.out, "item.json")
    storage.write_text(uri, json.dumps(item_dict(cfg, grid, outputs, dim, scale, source_items, item_id), indent=1))
    return uri


def write_zones_item(storage: Storage, cfg, zone_grids: dict, outputs: dict, dim: int, scale: float | None,
                     source_items: list[dict], item_id: str) -> str:  # fmt: skip
    """out/item.json of a map over several UTM zones {zone: Grid}: one asset per zone COG and preview (each with
    its zone's proj: fields), the footprint the union of the zones' -> its uri."""
    grids = list(zone_grids.values())
    item = item_dict(cfg, grids[0], {}, dim, scale, source_items, item_id)
    for key in [k for k in item["properties"] if k.startswith("proj:")]:  # per asset: each zone its own CRS
        del item["properties"][key]
    boxes = [lonlat_footprint(g)[0] for g in grids]
    b = [min(x[0] for x in boxes), min(x[1] for x in boxes), max(x[2] for x in boxes), max(x[3] for x in boxes)]
    ring = [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]
    item.update(bbox=b, geometry={"type": "Polygon", "coordinates": [ring]},
                assets=assets(outputs, zone_grids, cfg.patch_size))
    item["properties"]["olmoearth:zones"] = list(zone_grids)
    uri = join(cfg.out, "item.json")
    storage.write_text(uri, json.dumps(item, indent=1))
    return uri


def grid_box(grid: Grid) -> tuple[float, float, float, float]:
    r = grid.resolution
    return grid.x0, grid.y0 - grid.height * r, grid.x0 + grid.width * r, grid.y0


def _iso(day: str, end: bool) -> str | None:
    if not day:
        return None
    return f"{day[:10]}T23:59:59Z" if end else f"{day[:10]}T00:00:00Z"
