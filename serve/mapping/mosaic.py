"""Write an embedding mosaic block by block: Cloud-Optimized GeoTIFF, zarr (xarray-readable, CF grid mapping)
and a PCA false-colour PNG preview. Blocks are (h, w, D) float32 at token resolution, NaN = no data, written
in any order.

The zarr store follows the geo-embeddings Zarr convention (https://github.com/geo-embeddings/
embeddings-zarr-convention, v1): the root group carries `zarr_conventions` and the `geoemb:` attributes (type
pixel, dimensions, model, source data, data type, gsd, quantisation with its scalar scale, spatial layout
`utm_zones`) and lists its zone groups in `olmoearth:groups`; one group per UTM zone, named as the convention
says (`utm18`; `utm18s` for a southern zone), holds the arrays (embedding (band, y, x), x, y, band, CF
`spatial_ref`) with the GeoZarr `proj:code` and `spatial:` attributes. An area in one UTM zone (or with an explicit
`crs`) has one grid and its store one group; an area spanning zones has one grid per zone (serve/mapping/plan.py,
`plan_zones`), each zone's writer adds its group to one shared store (`zarr_path`) and names its COG and preview
after its zone (`suffix`: embeddings_utm17.tif). int8 maps keep
nodata distinct: values are -127..127 (value = q * scale) and -128 is the fill value.

The preview keeps every `stride`-th token of each block (float16, at most PREVIEW_MAX_PX per side and
PREVIEW_MAX_BYTES in all) and is coloured at close(): its PCA is fitted on a sample of that lattice, i.e. on
the whole area, not on the blocks that happened to come first."""

from __future__ import annotations

import os

import numpy as np

from pipelines.imagery.grid import Grid
from serve.mapping.geo import quantise_int8

PREVIEW_MAX_PX = 4096
PREVIEW_MAX_BYTES = 512 * 2**20  # the float16 lattice of D-dim embeddings behind the preview


class MosaicWriter:
    """The output files of one mosaic, open while blocks arrive; `close()` finishes them -> {kind: local path}."""

    def __init__(self, folder: str, grid: Grid, patch_size: int, dim: int, formats: list[str],
                 int8_scale: float | None, preview: bool, tags: dict | None = None, block: int = 256,
                 source_data: list[str] | None = None, suffix: str = "", zarr_path: str | None = None):  # fmt: skip
        """block: the GeoTIFF's and zarr's block side in tokens (a multiple of 16); write whole blocks.
        source_data: references to the input (catalog, collections, files) for the zarr's `geoemb:source_data`.
        suffix: added to the COG's and preview's file names (one zone of several: "_utm17"). zarr_path: a store
        shared by the zones of one map (opened for appending, this grid's group added); None: a new store in
        `folder`."""
        if block % 16:
            raise ValueError(f"block must be a multiple of 16 tokens, got {block}")
        self.folder, self.grid, self.p, self.dim, self.block = folder, grid, patch_size, dim, block
        self.suffix, self.shared_zarr = suffix, zarr_path
        self.h, self.w = grid.height // patch_size, grid.width // patch_size
        self.scale = int8_scale
        self.source_data = list(source_data or [])
        self.transform = grid.transform(patch_size)  # token pixels: p x 10 m
        self.tags = {**(tags or {}), "units": "embedding", "crs": grid.crs}
        if int8_scale is not None:
            self.tags.update(scale=repr(float(int8_scale)), offset="0", quantisation="int8: value = q * scale, -128 nodata")
        self.tif = self.zarr = None
        if "cog" in formats:
            self._open_tif()
        if "zarr" in formats:
            self._open_zarr()
        self.want_preview = preview
        self.stride = preview_stride(self.h, self.w, dim)
        if preview:
            self.lattice = np.full((-(-self.h // self.stride), -(-self.w // self.stride), dim), np.nan, np.float16)

    # ---- GeoTIFF -> COG ----------------------------------------------------------------------------------

    def _open_tif(self):
        import rasterio

        from serve.mapping.geo import embedding_profile

        dtype, nodata = ("int8", -128) if self.scale is not None else ("float32", float("nan"))
        prof = embedding_profile(_wkt(self.grid.crs), self.transform, self.w, self.h, self.dim, dtype, nodata)
        # a local scratch file, recompressed by the COG copy: the fastest compression that still keeps it small
        # band-interleaved: the COG copy reads it band by band, so it reads each band once
        prof.update(tiled=True, blockxsize=self.block, blockysize=self.block, compress="zstd", zstd_level=1, BIGTIFF="IF_SAFER",
                    interleave="band")  # fmt: skip
        self._tif_tmp = os.path.join(self.folder, f"mosaic_tmp{self.suffix}.tif")
        self.tif = rasterio.open(self._tif_tmp, "w", **prof)
        self.tif.update_tags(**{k: str(v) for k, v in self.tags.items()})
        for i in range(self.dim):
            self.tif.set_band_description(i + 1, f"emb_{i:03d}")
        if self.scale is not None:
            self.tif.scales = tuple([float(self.scale)] * self.dim)

    # ---- zarr --------------------------------------------------------------------------------------------

    def _open_zarr(self):
        import zarr

        path = self.shared_zarr or os.path.join(self.folder, "embeddings.zarr")
        root = zarr.open_group(path, mode="a" if self.shared_zarr else "w", zarr_format=3)
        group = root.create_group(zone_group_name(self.grid.crs))
        dtype, fill = ("int8", -128) if self.scale is not None else ("float32", float("nan"))
        arr = group.create_array("embedding", shape=(self.dim, self.h, self.w), chunks=(self.dim, self.block, self.block),
                                 dtype=dtype, fill_value=fill, dimension_names=["band", "y", "x"])  # fmt: skip
        attrs = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref", "long_name": "OlmoEarth embedding", **{k: str(v) for k, v in self.tags.items()}}
        if self.scale is not None:  # CF: xarray decodes value = q * scale_factor, -128 (the fill value) -> NaN
            attrs.update(scale_factor=float(self.scale), add_offset=0.0, _FillValue=-128)
            attrs.pop("scale", None)
            attrs.pop("offset", None)
        arr.attrs.update(attrs)
        self._write_zarr_coords(group)
        root.attrs.update(geoemb_root_attrs(self.dim, str(self.tags.get("model", "")), self.source_data,
                                            self.p * self.grid.resolution, self.scale,
                                            sorted({*root.attrs.get("olmoearth:groups", []), group.basename})))  # fmt: skip
        group.attrs.update({**zone_attrs(self.grid, self.transform, self.h, self.w), "patch_size": self.p,
                            "crs": self.grid.crs, "transform": list(self.transform)})  # fmt: skip
        self.zarr, self._zarr_path = arr, path

    def _write_zarr_coords(self, root) -> None:
        """x / y of the token centres, the band index and the CF grid mapping (`spatial_ref`) xarray reads."""
        a, _, c, _, e, f = self.transform
        x = root.create_array("x", shape=(self.w,), dtype="float64", dimension_names=["x"])
        x[:] = c + a * (np.arange(self.w) + 0.5)
        x.attrs.update({"standard_name": "projection_x_coordinate", "units": "m"})
        y = root.create_array("y", shape=(self.h,), dtype="float64", dimension_names=["y"])
        y[:] = f + e * (np.arange(self.h) + 0.5)
        y.attrs.update({"standard_name": "projection_y_coordinate", "units": "m"})
        b = root.create_array("band", shape=(self.dim,), dtype="int32", dimension_names=["band"])
        b[:] = np.arange(self.dim)
        sr = root.create_array("spatial_ref", shape=(), dtype="int32", dimension_names=[])
        sr[...] = 0
        wkt = _wkt(self.grid.crs)
        sr.attrs.update({"crs_wkt": wkt, "spatial_ref": wkt,
                         "GeoTransform": " ".join(str(v) for v in (c, a, 0.0, f, 0.0, e))})  # fmt: skip

    # ---- preview -----------------------------------------------------------------------------------------

    def _keep_for_preview(self, by: int, bx: int, block: np.ndarray) -> None:
        s = self.stride
        oy, ox = (-by) % s, (-bx) % s  # first row / col of this block on the preview lattice
        sub = block[oy::s, ox::s]
        if sub.size:
            py, px = (by + oy) // s, (bx + ox) // s
            self.lattice[py : py + sub.shape[0], px : px + sub.shape[1]] = sub

    def preview_rgba(self, n: int = 20000, seed: int = 0) -> np.ndarray | None:
        """(h, w, 4) uint8: the first 3 principal components of the kept lattice, each stretched between its
        2nd and 98th percentile; alpha 0 where there is no data. None when no token has data."""
        flat = self.lattice.reshape(-1, self.dim)
        ok = np.isfinite(flat).all(1)
        if not ok.any():
            return None
        rows = np.flatnonzero(ok)
        rng = np.random.default_rng(seed)
        v = flat[rng.choice(rows, min(n, len(rows)), replace=False)].astype(np.float64)
        mean = v.mean(0)
        _, vecs = np.linalg.eigh(np.cov(v - mean, rowvar=False).reshape(self.dim, self.dim))
        comp = vecs[:, ::-1][:, :3].T  # (k <= 3, D), largest variance first
        if comp.shape[0] < 3:
            comp = np.concatenate([comp, np.zeros((3 - comp.shape[0], self.dim))])
        proj = (v - mean) @ comp.T
        lo, hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)
        hi = np.where(hi > lo, hi, lo + 1)
        rgba = np.zeros((len(flat), 4), np.uint8)
        for start in range(0, len(rows), 1 << 16):  # project in chunks: bounded memory
            r = rows[start : start + (1 << 16)]
            rgb = np.clip(((flat[r].astype(np.float64) - mean) @ comp.T - lo) / (hi - lo), 0, 1) * 255
            rgba[r, :3], rgba[r, 3] = rgb.astype(np.uint8), 255
        return rgba.reshape(*self.lattice.shape[:2], 4)

    # ---- blocks ------------------------------------------------------------------------------------------

    def write_block(self, by: int, bx: int, block: np.ndarray, preview_minus: np.ndarray | None = None) -> None:
        """block (bh, bw, D) float32, NaN nodata, placed at token row `by`, column `bx`. preview_minus (bh, bw, D):
        subtracted from the block in the preview only (the job's tiling component, serve/mapping/assemble.py)."""
        from rasterio.windows import Window

        bh, bw, _ = block.shape
        data = quantise_int8(block, self.scale) if self.scale is not None else block
        chw = np.ascontiguousarray(np.moveaxis(data, -1, 0))
        if self.tif is not None:
            self.tif.write(chw, window=Window(bx, by, bw, bh))
        if self.zarr is not None:
            self.zarr[:, by : by + bh, bx : bx + bw] = chw
        if self.want_preview:
            self._keep_for_preview(by, bx, block if preview_minus is None else block - preview_minus)

    def close(self) -> dict[str, str]:
        out = {}
        if self.tif is not None:
            from serve.mapping.geo import to_cog

            self.tif.close()
            cog = os.path.join(self.folder, f"embeddings{self.suffix}.tif")
            to_cog(self._tif_tmp, cog)
            os.remove(self._tif_tmp)
            out["cog"] = cog
        if self.zarr is not None:
            import zarr

            zarr.consolidate_metadata(self._zarr_path)
            out["zarr"] = self._zarr_path
        rgba = self.preview_rgba() if self.want_preview else None
        if rgba is not None:
            from PIL import Image

            path = os.path.join(self.folder, f"preview{self.suffix}.png")
            Image.fromarray(rgba, "RGBA").save(path)
            out["preview"] = path
        return out


def preview_stride(h: int, w: int, dim: int) -> int:
    """Every how many tokens the preview keeps one, so that it fits PREVIEW_MAX_PX and PREVIEW_MAX_BYTES."""
    stride = max(1, -(-max(h, w) // PREVIEW_MAX_PX))
    while -(-h // stride) * -(-w // stride) * dim * 2 > PREVIEW_MAX_BYTES:
        stride += 1
    return stride


def zone_group_name(crs: str) -> str:
    """The zarr group of a grid: `utm{NN}` for a northern UTM zone (the convention's name), `utm{NN}s` for a
    southern one (the convention names no hemisphere; ours keeps the two apart), else `epsg{code}`."""
    from rasterio.crs import CRS

    code = CRS.from_user_input(crs).to_epsg()
    if code and 32601 <= code <= 32660:
        return f"utm{code - 32600:02d}"
    if code and 32701 <= code <= 32760:
        return f"utm{code - 32700:02d}s"
    if not code:
        raise ValueError(f"crs {crs!r}: the zarr output needs a CRS with an EPSG code")
    return f"epsg{code}"


def geoemb_root_attrs(dim: int, model: str, source_data: list[str], gsd: float, scale: float | None,
                      groups: list[str]) -> dict:  # fmt: skip
    """The root group's attributes by the geo-embeddings Zarr convention (geoemb:, v1) and the zone groups."""
    attrs = {"zarr_conventions": ZARR_CONVENTIONS, "geoemb:type": "pixel", "geoemb:dimensions": int(dim),
             "geoemb:model": model, "geoemb:source_data": source_data or ["unknown"],
             "geoemb:data_type": "int8" if scale is not None else "float32", "geoemb:gsd": float(gsd),
             "geoemb:spatial_layout": "utm_zones", "geoemb:build_version": "olmoearth-ray",
             "olmoearth:groups": list(groups)}  # fmt: skip
    if scale is not None:
        attrs["geoemb:quantization"] = {"method": "linear", "original_dtype": "float32", "quantized_dtype": "int8",
                                        "scale": {"type": "scalar", "scale": float(scale), "offset": 0.0}}  # fmt: skip
    return attrs


def zone_attrs(grid: Grid, transform, h: int, w: int) -> dict:
    """A zone group's `proj:` and `spatial:` attributes (GeoZarr conventions): CRS, affine, shape, bounds."""
    a, _, c, _, e, f = tuple(transform)[:6]
    return {"proj:code": grid.crs, "spatial:dimensions": ["y", "x"], "spatial:transform": [a, 0.0, c, 0.0, e, f],
            "spatial:shape": [h, w], "spatial:bbox": [c, f + e * h, c + a * w, f], "spatial:registration": "pixel"}  # fmt: skip


ZARR_CONVENTIONS = [  # https://github.com/geo-embeddings/embeddings-zarr-convention (v1), GeoZarr proj: / spatial:
    {"schema_url": "https://raw.githubusercontent.com/geo-embeddings/embeddings-zarr-convention/refs/tags/v1/schema.json",
     "spec_url": "https://github.com/geo-embeddings/embeddings-zarr-convention/blob/v1/README.md",
     "uuid": "61c12cc5-0e28-4056-999a-480cf3fb7e4c", "name": "geoemb:",
     "description": "Geoembeddings convention for geospatial embedding arrays with model provenance"},
    {"schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v1/schema.json",
     "spec_url": "https://github.com/zarr-conventions/spatial/blob/v1/README.md",
     "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4", "name": "spatial:", "description": "Spatial coordinate information"},
    {"schema_url": "https://raw.githubusercontent.com/zarr-experimental/geo-proj/refs/tags/v1/schema.json",
     "spec_url": "https://github.com/zarr-experimental/geo-proj/blob/v1/README.md",
     "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f", "name": "proj:",
     "description": "Coordinate reference system information for geospatial data"},
]  # fmt: skip


def _wkt(crs: str) -> str:
    from rasterio.crs import CRS

    return CRS.from_user_input(crs).to_wkt()
