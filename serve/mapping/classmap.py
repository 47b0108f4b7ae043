"""Write a fine-tuned model's map block by block (the `olmoearth predict` counterpart of mosaic.py's
MosaicWriter, same interface: `dim`, `write_block`, `close`). Blocks are (h, w, K) float32 at the map's
resolution, NaN = no data: the blended per-class probabilities (class kinds) or values (regression kinds).

    classification / segmentation  classes.tif        uint8 class ids, colour table, nodata 255, class names in
                                                      the tags (`class_names`, `class_<id>`) and classes.json
                                   probabilities.tif  optional: K bands, float32 (NaN nodata) or uint8 (p * 254,
                                                      nodata 255, GDAL band scale 1/254)
    multilabel                     labels.tif         K bands uint8 0 / 1 (probability > 0.5), nodata 255
                                   probabilities.tif  optional, as above
    regression / pixel_regression  values.tif         K bands float32, NaN nodata, a band per target name
    every kind                     classes.json       the names (and colours) of the classes / targets
                                   preview.png        the class map in its colours with a legend (regression:
                                                      the first target in viridis with a colour bar)

Each GeoTIFF is written to a local scratch file and copied into a Cloud-Optimized GeoTIFF at close(); the
class and label maps get nearest-neighbour overviews (a class id is not averaged)."""

from __future__ import annotations

import colorsys
import json
import os

import numpy as np

from pipelines.imagery.grid import Grid

NODATA_CLASS = 255  # uint8 nodata of classes.tif / labels.tif / uint8 probabilities
PROB_SCALE = 254  # uint8 probabilities: q = round(p * 254), p = q / 254
PREVIEW_MAX_PX = 2048
FIXED_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                 (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """n distinct RGB colours: ten fixed ones, then hues spaced by the golden ratio."""
    out = list(FIXED_COLOURS[:n])
    for i in range(len(out), n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.9)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


class ClassMapWriter:
    """The output files of one prediction map, open while blocks arrive; `close()` -> {kind: local path}."""

    def __init__(self, folder: str, grid: Grid, pixel: int, task, probabilities: bool = False,
                 probabilities_dtype: str = "float32", preview: bool = True, tags: dict | None = None,
                 block: int = 256):  # fmt: skip
        """pixel: the map's pixel side in 10 m grid pixels (1 for per-pixel tasks, the chip size for scene
        tasks); task: the model's TaskSpec."""
        self.folder, self.grid, self.task, self.block = folder, grid, task, block
        self.kind, self.names, self.dim = task.kind, list(task.class_names), task.num_outputs
        self.h, self.w = grid.height // pixel, grid.width // pixel
        self.transform = grid.transform(pixel)
        self.colours = class_colours(self.dim)
        self.tags = {**(tags or {}), "task": task.kind, "class_names": json.dumps(self.names), "crs": grid.crs}
        self.files: dict[str, tuple] = {}  # kind -> (rasterio dataset, scratch path, final name, resampling)
        regression = task.kind in ("regression", "pixel_regression")
        if regression:
            self._open("values", "values.tif", "float32", float("nan"), self.names, "average")
        else:
            if task.kind == "multilabel":
                self._open("labels", "labels.tif", "uint8", NODATA_CLASS, self.names, "nearest")
            else:
                self._open("classes", "classes.tif", "uint8", NODATA_CLASS, ["class"], "nearest")
            if probabilities:
                dtype, nodata = ("uint8", NODATA_CLASS) if probabilities_dtype == "uint8" else ("float32", float("nan"))
                self._open("probabilities", "probabilities.tif", dtype, nodata, [f"p_{n}" for n in self.names],
                           "average")  # fmt: skip
        self.want_preview = preview
        self.stride = max(1, -(-max(self.h, self.w) // PREVIEW_MAX_PX))
        lat = (-(-self.h // self.stride), -(-self.w // self.stride))
        self.lattice = np.full(lat, np.nan, np.float32)  # class id (class kinds) or first value, NaN nodata

    def _open(self, kind: str, name: str, dtype: str, nodata, descriptions: list[str], resampling: str) -> None:
        import rasterio
        from rasterio.crs import CRS

        from serve.mapping.geo import embedding_profile

        wkt = CRS.from_user_input(self.grid.crs).to_wkt()
        prof = embedding_profile(wkt, self.transform, self.w, self.h, len(descriptions), dtype, nodata)
        prof.update(tiled=True, blockxsize=self.block, blockysize=self.block, compress="zstd", zstd_level=1,
                    BIGTIFF="IF_SAFER", interleave="band")  # fmt: skip
        path = os.path.join(self.folder, f"{kind}_tmp.tif")
        ds = rasterio.open(path, "w", **prof)
        tags = dict(self.tags)
        if kind == "classes":
            tags.update({f"class_{i}": n for i, n in enumerate(self.names)})
            ds.write_colormap(1, {i: (*c, 255) for i, c in enumerate(self.colours)} | {NODATA_CLASS: (0, 0, 0, 0)})
        if kind == "probabilities" and dtype == "uint8":
            tags.update(scale=repr(1.0 / PROB_SCALE),
                        quantisation=f"uint8: p = q / {PROB_SCALE}, {NODATA_CLASS} nodata")  # fmt: skip
            ds.scales = tuple([1.0 / PROB_SCALE] * len(descriptions))
        ds.update_tags(**{k: str(v) for k, v in tags.items()})
        for i, d in enumerate(descriptions):
            ds.set_band_description(i + 1, d)
        self.files[kind] = (ds, path, name, resampling)

    # ---- blocks ------------------------------------------------------------------------------------------

    def write_block(self, by: int, bx: int, block: np.ndarray, preview_minus: np.ndarray | None = None) -> None:
        """block (bh, bw, K) float32 blended probabilities / values, NaN nodata, at map row `by`, column `bx`
        (preview_minus: the embedding mosaic's de-tiling term, unused here)."""
        from rasterio.windows import Window

        bh, bw, _ = block.shape
        valid = np.isfinite(block).all(-1)  # (bh, bw)
        win = Window(bx, by, bw, bh)
        chw = np.moveaxis(block, -1, 0)  # (K, bh, bw)
        for kind, (ds, *_rest) in self.files.items():
            ds.write(np.ascontiguousarray(self._band_data(kind, chw, valid, ds.dtypes[0])), window=win)
        first = np.where(valid, np.nan_to_num(chw).argmax(0), np.nan) if "values" not in self.files else chw[0]
        s = self.stride
        oy, ox = (-by) % s, (-bx) % s
        sub = first[oy::s, ox::s]
        if sub.size:
            py, px = (by + oy) // s, (bx + ox) // s
            self.lattice[py : py + sub.shape[0], px : px + sub.shape[1]] = sub

    @staticmethod
    def _band_data(kind: str, chw: np.ndarray, valid: np.ndarray, dtype: str) -> np.ndarray:
        if kind == "classes":  # argmax of the blended probabilities
            return np.where(valid, np.nan_to_num(chw).argmax(0), NODATA_CLASS).astype(np.uint8)[None]
        if kind == "labels":
            return np.where(valid[None], chw > 0.5, NODATA_CLASS).astype(np.uint8)
        if kind == "probabilities" and dtype == "uint8":
            q = np.round(np.clip(np.nan_to_num(chw), 0, 1) * PROB_SCALE)
            return np.where(valid[None], q, NODATA_CLASS).astype(np.uint8)
        return np.where(valid[None], chw, np.nan).astype(np.float32)

    # ---- closing -----------------------------------------------------------------------------------------

    def close(self) -> dict[str, str]:
        from rasterio.shutil import copy as rio_copy

        out = {}
        for kind, (ds, path, name, resampling) in self.files.items():
            ds.close()
            dst = os.path.join(self.folder, name)
            rio_copy(path, dst, driver="COG", compress="deflate", level=6, num_threads="ALL_CPUS", overviews="auto",
                     blocksize=256, resampling=resampling, copy_src_overviews=False)  # fmt: skip
            os.remove(path)
            out[kind] = dst
        legend = os.path.join(self.folder, "classes.json")
        with open(legend, "w") as fh:
            json.dump(self.legend(), fh, indent=1)
        out["legend"] = legend
        if self.want_preview and np.isfinite(self.lattice).any():
            out["preview"] = self._preview(os.path.join(self.folder, "preview.png"))
        return out

    def legend(self) -> dict:
        """classes.json: what the pixel values of the map mean."""
        d = {"task": self.kind, "head": self.task.head, "pixel_size_m": self.transform[0]}
        if self.kind in ("regression", "pixel_regression"):
            return {**d, "file": "values.tif", "targets": self.names, "nodata": "NaN"}
        pairs = enumerate(zip(self.names, self.colours, strict=True))
        classes = [{"id": i, "name": n, "color": list(c)} for i, (n, c) in pairs]
        if self.kind == "multilabel":  # band i of labels.tif: class i present (1) or not (0)
            return {**d, "file": "labels.tif", "classes": classes, "nodata": NODATA_CLASS}
        return {**d, "file": "classes.tif", "classes": classes, "nodata": NODATA_CLASS}

    def _preview(self, path: str) -> str:
        """The map in its colours (transparent nodata) with a legend of at most 20 classes (matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        h, w = self.lattice.shape
        fig, ax = plt.subplots(figsize=(min(12, 4 + 8 * w / max(h, w)), min(12, 1 + 8 * h / max(h, w))), dpi=100)
        data = np.ma.masked_invalid(self.lattice)
        if "values" in self.files:
            im = ax.imshow(data, cmap="viridis", interpolation="nearest")
            fig.colorbar(im, ax=ax, shrink=0.8, label=self.names[0])
        else:
            cmap = ListedColormap(np.array(self.colours) / 255.0)
            ax.imshow(data, cmap=cmap, vmin=-0.5, vmax=self.dim - 0.5, interpolation="nearest")
            if self.dim <= 20:
                pairs = zip(self.names, self.colours, strict=True)
                handles = [Patch(color=np.array(c) / 255.0, label=n) for n, c in pairs]
                ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
        ax.set_axis_off()
        title = {"multilabel": "most likely label"}.get(self.kind, self.kind)
        ax.set_title(f"{title} ({self.transform[0]:g} m pixels)", fontsize=9)
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        return path
