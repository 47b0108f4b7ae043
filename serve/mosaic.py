"""Write an embedding mosaic block by block: Cloud-Optimized GeoTIFF, zarr (xarray-readable, CF grid mapping)
and a PCA false-colour PNG preview. Blocks are (h, w, D) float32 at token resolution, NaN = no data."""

from __future__ import annotations

import os

import numpy as np

from serve.geo import quantise_int8
from serve.tiling import Grid

PREVIEW_MAX_PX = 4096


class MosaicWriter:
    def __init__(self, folder: str, grid: Grid, patch_size: int, dim: int, formats: list[str],
                 int8_scale: float | None, preview: bool, tags: dict | None = None):  # fmt: skip
        self.folder, self.grid, self.p, self.dim = folder, grid, patch_size, dim
        self.h, self.w = grid.height // patch_size, grid.width // patch_size
        self.scale = int8_scale
        self.transform = grid.transform(patch_size)  # token pixels: p x 10 m
        self.tags = {**(tags or {}), "units": "embedding", "crs": grid.crs}
        if int8_scale is not None:
            self.tags.update(scale=repr(float(int8_scale)), offset="0", quantisation="int8: value = q * scale, -128 nodata")
        self.paths = {}
        self.tif = self.zarr = None
        if "cog" in formats:
            self._open_tif()
        if "zarr" in formats:
            self._open_zarr()
        self.pca = None
        self.want_preview = preview
        self.stride = max(1, -(-max(self.h, self.w) // PREVIEW_MAX_PX))
        if preview:
            self.preview = np.zeros((-(-self.h // self.stride), -(-self.w // self.stride), 4), np.uint8)

    # ---- GeoTIFF -> COG ----------------------------------------------------------------------------------

    def _open_tif(self):
        import rasterio

        from serve.geo import embedding_profile

        dtype, nodata = ("int8", -128) if self.scale is not None else ("float32", float("nan"))
        prof = embedding_profile(_wkt(self.grid.crs), self.transform, self.w, self.h, self.dim, dtype, nodata)
        # a local scratch file, recompressed by the COG copy: the fastest compression that still keeps it small
        prof.update(tiled=True, blockxsize=256, blockysize=256, compress="zstd", zstd_level=1, BIGTIFF="IF_SAFER",
                    interleave="pixel")  # fmt: skip
        self._tif_tmp = os.path.join(self.folder, "mosaic_tmp.tif")
        self.tif = rasterio.open(self._tif_tmp, "w", **prof)
        self.tif.update_tags(**{k: str(v) for k, v in self.tags.items()})
        for i in range(self.dim):
            self.tif.set_band_description(i + 1, f"emb_{i:03d}")
        if self.scale is not None:
            self.tif.scales = tuple([float(self.scale)] * self.dim)

    # ---- zarr --------------------------------------------------------------------------------------------

    def _open_zarr(self):
        import zarr

        path = os.path.join(self.folder, "embeddings.zarr")
        root = zarr.open_group(path, mode="w", zarr_format=3)
        dtype, fill = ("int8", -128) if self.scale is not None else ("float32", float("nan"))
        arr = root.create_array("embedding", shape=(self.dim, self.h, self.w), chunks=(self.dim, 256, 256),
                                dtype=dtype, fill_value=fill, dimension_names=["band", "y", "x"])  # fmt: skip
        attrs = {"grid_mapping": "spatial_ref", "coordinates": "spatial_ref", "long_name": "OlmoEarth embedding", **{k: str(v) for k, v in self.tags.items()}}
        if self.scale is not None:
            attrs.update(scale_factor=float(self.scale), add_offset=0.0)
            attrs.pop("scale", None)
            attrs.pop("offset", None)
        arr.attrs.update(attrs)
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
        root.attrs.update({"crs": self.grid.crs, "transform": list(self.transform), "patch_size": self.p})
        self.zarr, self._zarr_path = arr, path

    # ---- preview -----------------------------------------------------------------------------------------

    def fit_pca(self, tiles: list[np.ndarray], n: int = 20000, seed: int = 0) -> None:
        v = np.concatenate([t.reshape(-1, t.shape[-1]) for t in tiles])
        v = v[np.isfinite(v).all(1)]
        if len(v) == 0:
            return
        rng = np.random.default_rng(seed)
        if len(v) > n:
            v = v[rng.choice(len(v), n, replace=False)]
        mean = v.mean(0)
        _, _, vt = np.linalg.svd(v - mean, full_matrices=False)
        comp = vt[:3]
        if comp.shape[0] < 3:
            comp = np.concatenate([comp, np.zeros((3 - comp.shape[0], v.shape[1]))])
        proj = (v - mean) @ comp.T
        lo, hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)
        self.pca = (mean, comp, lo, np.where(hi > lo, hi, lo + 1))

    def _preview_block(self, by: int, bx: int, block: np.ndarray) -> None:
        s = self.stride
        oy, ox = (-by) % s, (-bx) % s  # first row / col of this block on the preview lattice
        sub = block[oy::s, ox::s]
        if sub.size == 0:
            return
        mean, comp, lo, hi = self.pca
        flat = sub.reshape(-1, self.dim)
        ok = np.isfinite(flat).all(1)
        rgb = np.clip(((np.nan_to_num(flat) - mean) @ comp.T - lo) / (hi - lo), 0, 1) * 255
        rgba = np.concatenate([rgb, np.where(ok, 255, 0)[:, None]], 1).astype(np.uint8)
        rgba[~ok, :3] = 0
        py, px = (by + oy) // s, (bx + ox) // s
        self.preview[py : py + sub.shape[0], px : px + sub.shape[1]] = rgba.reshape(sub.shape[0], sub.shape[1], 4)

    # ---- blocks ------------------------------------------------------------------------------------------

    def write_block(self, by: int, bx: int, block: np.ndarray, preview_minus: np.ndarray | None = None) -> None:
        """block (bh, bw, D) float32, NaN nodata, placed at token row `by`, column `bx`. preview_minus (bh, bw, D):
        subtracted from the block in the preview only (the job's tiling component, serve/embed_area.py)."""
        from rasterio.windows import Window

        bh, bw, _ = block.shape
        data = quantise_int8(block, self.scale) if self.scale is not None else block
        chw = np.ascontiguousarray(np.moveaxis(data, -1, 0))
        if self.tif is not None:
            self.tif.write(chw, window=Window(bx, by, bw, bh))
        if self.zarr is not None:
            self.zarr[:, by : by + bh, bx : bx + bw] = chw
        if self.want_preview and self.pca is not None:
            self._preview_block(by, bx, block if preview_minus is None else block - preview_minus)

    def close(self) -> dict[str, str]:
        out = {}
        if self.tif is not None:
            from serve.geo import to_cog

            self.tif.close()
            cog = os.path.join(self.folder, "embeddings.tif")
            to_cog(self._tif_tmp, cog)
            os.remove(self._tif_tmp)
            out["cog"] = cog
        if self.zarr is not None:
            import zarr

            zarr.consolidate_metadata(self._zarr_path)
            out["zarr"] = self._zarr_path
        if self.want_preview and self.pca is not None:
            from PIL import Image

            path = os.path.join(self.folder, "preview.png")
            Image.fromarray(self.preview, "RGBA").save(path)
            out["preview"] = path
        return out


def _wkt(crs: str) -> str:
    from rasterio.crs import CRS

    return CRS.from_user_input(crs).to_wkt()
