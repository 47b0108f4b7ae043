"""Per-pixel labels as rasters: image GeoTIFFs + a label GeoTIFF on the same grid, or a label raster over a
corpus area. Both readers follow pipelines/evaluation/task.py (info / rows / load) and add `label(row)`: the
row's label alone, without its pixels (what pipelines/finetune/data.py checks before training).

PairsReader: scenes, each `{"images": {modality: file}, "label": file, "split": optional}` (files relative to
`root` or URIs). An image holds T*C bands, time-major (timestep t, band c at index t*C + c: the layout of the
area job's GeoTIFF input), raw sensor units, its nodata (or the original's -99999) missing. The label raster
has the images' CRS, transform and size exactly (else ValueError naming both files and what differs):
one band of class ids for segmentation (its nodata -> -1 unlabelled), one band per target for
pixel_regression (nodata / NaN -> NaN unlabelled). Chips of `chip_size` px are cut with `stride`, the last
one of a row or column ending at the edge. A chip's row carries its geographic block (the corpus grid cell of
its centre, divided by `split_block`) for the geographic split.

CorpusLabelReader: a label GeoTIFF on the corpus's 10 m grid in one UTM CRS (pixel edges on multiples of
10 m); every corpus cell of that CRS lying inside the raster is cut into chips, its pixels read from the
corpus (read_sample), its labels from the raster's window over the cell. Cells of the corpus in another CRS
or only partly covered are rows with a `skip` reason (reported, not trained on).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from olmoearth.modalities import MISSING_VALUE, MODALITIES, TILE_SIZE
from pipelines.common.storage import Storage, join
from pipelines.imagery.geotiff import read_geotiff
from pipelines.imagery.grid import cell_of, starts

PER_PIXEL = ("segmentation", "pixel_regression")


def _uri(root: str, name: str) -> str:
    return name if "://" in name or name.startswith("/") or not root else join(root, name)


def header(uri: str, storage: Storage) -> dict:
    """A GeoTIFF's profile (crs, transform, width, height, count, nodata, dtype), reading one pixel."""
    from rasterio.windows import Window

    return read_geotiff(uri, storage, window=Window(0, 0, 1, 1))[1]


def grid_difference(a: dict, b: dict) -> str | None:
    """What differs between the pixel grids of two profiles (CRS, transform, size), or None."""
    if a["crs"] != b["crs"]:
        return f"CRS {a['crs']} vs {b['crs']}"
    if not np.allclose(tuple(a["transform"])[:6], tuple(b["transform"])[:6], rtol=0, atol=1e-6):
        return f"transform {tuple(a['transform'])[:6]} vs {tuple(b['transform'])[:6]}"
    if (a["width"], a["height"]) != (b["width"], b["height"]):
        return f"size {a['width']}x{a['height']} vs {b['width']}x{b['height']} px"
    return None


def geo_key(profile: dict, r0: int, c0: int, size: int, block: int) -> str:
    """The geographic split block of the chip at (r0, c0): the corpus cell of its centre (in the raster's
    CRS, or its UTM zone for a geographic CRS) divided by `block`."""
    t = profile["transform"]
    col_px, row_px = c0 + size / 2, r0 + size / 2
    x, y = t.c + t.a * col_px + t.b * row_px, t.f + t.d * col_px + t.e * row_px
    crs = profile["crs"]
    if crs is not None and crs.is_geographic:
        from rasterio.warp import transform

        from pipelines.imagery.grid import utm_epsg

        epsg = utm_epsg(x, y)
        (x,), (y,) = transform(crs, f"EPSG:{epsg}", [x], [y])
    else:
        epsg = crs.to_epsg() if crs is not None else 0
    col, row = cell_of(x, y)
    return f"EPSG:{epsg}/{col // block}/{row // block}"


def read_label(uri: str, storage: Storage, kind: str, window=None) -> np.ndarray:
    """Label raster (window) -> segmentation int64 (H, W), -1 unlabelled; pixel_regression float32 (K, H, W),
    NaN unlabelled."""
    arr, prof = read_geotiff(uri, storage, window=window)
    nodata = prof.get("nodata")
    if kind == "segmentation":
        band = arr[0].astype(np.float64)
        bad = ~np.isfinite(band) | ((band == nodata) if nodata is not None else False)
        label = np.where(bad, -1, band).astype(np.int64)
        frac = (band != np.round(band)) & ~bad
        if frac.any():
            raise ValueError(f"{uri}: segmentation label raster holds non-integer class ids "
                             f"(e.g. {band[frac][0]}); expected class ids and nodata")
        return label
    out = arr.astype(np.float32)
    if nodata is not None:
        out[arr == nodata] = np.nan
    return out


def to_chip_pixels(arr: np.ndarray, modality: str, nodata, where: str) -> np.ndarray:
    """(T*C, H, W) raw bands, time-major -> (H, W, T, C) float32, NaN at nodata / MISSING_VALUE."""
    c = MODALITIES[modality].num_bands
    if arr.shape[0] % c:
        raise ValueError(f"{where}: {arr.shape[0]} bands is not a multiple of {modality}'s {c} bands "
                         "(expected T*C bands, time-major)")
    x = arr.astype(np.float32)
    if nodata is not None:
        x[arr == nodata] = np.nan
    x[x == MISSING_VALUE] = np.nan
    t = arr.shape[0] // c
    return np.moveaxis(x, 0, -1).reshape(*x.shape[1:], t, c)


@dataclass
class PairsReader:
    root: str  # folder the scene file names are relative to (local or s3://)
    scenes: list[dict]  # [{"images": {modality: file}, "label": file, "split": optional train|val|test}]
    kind: str = "segmentation"  # segmentation | pixel_regression
    class_names: list[str] = field(default_factory=list)  # classes (id i = class_names[i]) or target names
    months: list[int] = field(default_factory=list)  # month 0..11 of each image timestep (empty: 0, 1, ...)
    chip_size: int = 32  # chip side in px
    stride: int = 0  # px between chip corners (0: chip_size, no overlap)
    split_block: int = 4  # corpus grid cells per side of a geographic split block
    name: str = "pairs"  # task name in reports

    def _check(self) -> list[dict]:
        """Each scene's files and grid: [{"label": uri, "images": {m: uri}, "profile", "t"}]."""
        if self.kind not in PER_PIXEL:
            raise ValueError(f"data.kind: the pairs reader has per-pixel labels ({PER_PIXEL}), got {self.kind!r}")
        if not self.scenes:
            raise ValueError("data.pairs: no scene given (a list of {images: {modality: file}, label: file})")
        storage, out = Storage(), []
        for i, sc in enumerate(self.scenes):
            if not isinstance(sc, dict) or not sc.get("label") or not sc.get("images"):
                raise ValueError(f"data.pairs[{i}]: needs 'label' (a file) and 'images' ({{modality: file}}), got {sc!r}")
            label = _uri(self.root, sc["label"])
            prof = header(label, storage)
            k = 1 if self.kind == "segmentation" else len(self.class_names)
            if prof["count"] != k:
                raise ValueError(f"{label}: {prof['count']} band(s); a {self.kind} label raster needs {k} "
                                 f"({'class ids' if k == 1 else 'one per target of class_names'})")
            images, t = {}, None
            for m, name in sc["images"].items():
                if m not in MODALITIES or not MODALITIES[m].encoder_input:
                    raise ValueError(f"data.pairs[{i}].images: {m!r} is not an encoder modality")
                uri = _uri(self.root, name)
                iprof = header(uri, storage)
                diff = grid_difference(iprof, prof)
                if diff:
                    raise ValueError(f"label raster {label} is not on the grid of image {uri}: {diff}")
                if MODALITIES[m].temporal:
                    t = t or iprof["count"] // MODALITIES[m].num_bands
                images[m] = uri
            if sc.get("split") not in (None, "train", "val", "test"):
                raise ValueError(f"data.pairs[{i}].split must be train, val or test, got {sc['split']!r}")
            out.append({"label": label, "images": images, "profile": prof, "t": t or 1, "split": sc.get("split")})
        return out

    def info(self):
        from pipelines.evaluation.task import TaskInfo

        if not self.class_names:
            raise ValueError(f"data.class_names: the pairs reader needs the class (or target) names of {self.root}")
        return TaskInfo(self.name, self.kind, list(self.class_names))

    def rows(self) -> list[dict]:
        rows = []
        size, stride = self.chip_size, self.stride or self.chip_size
        for sc in self._check():
            prof = sc["profile"]
            for r0 in starts(prof["height"], size, stride):
                for c0 in starts(prof["width"], size, stride):
                    rows.append({"id": f"{sc['label']}@{r0},{c0}", "split": sc["split"], "label": None,
                                 "label_uri": sc["label"], "images": sc["images"], "r0": r0, "c0": c0,
                                 "t": sc["t"], "geo": geo_key(prof, r0, c0, size, self.split_block)})
        return rows

    def _window(self, row: dict):
        from rasterio.windows import Window

        return Window(row["c0"], row["r0"], self.chip_size, self.chip_size)

    def label(self, row: dict) -> np.ndarray:
        return read_label(row["label_uri"], Storage(), self.kind, self._window(row))

    def load(self, row: dict):
        storage = Storage()
        x = {}
        for m, uri in row["images"].items():
            arr, prof = read_geotiff(uri, storage, window=self._window(row))
            x[m] = to_chip_pixels(arr, m, prof.get("nodata"), uri)
        months = np.asarray(self.months or [i % 12 for i in range(row["t"])], np.int64)
        if len(months) != row["t"]:
            raise ValueError(f"data.months: {len(months)} given but the images of {row['label_uri']} hold "
                             f"{row['t']} timesteps")
        return x, months, self.label(row)


@dataclass
class CorpusLabelReader:
    root: str  # the corpus root (raw layout)
    label_raster: str  # label GeoTIFF on the corpus's 10 m grid in one UTM CRS
    kind: str = "segmentation"  # segmentation | pixel_regression
    class_names: list[str] = field(default_factory=list)  # classes or target names
    chip_size: int = 64  # chip side in px (256 must be a multiple)
    modalities: list[str] = field(default_factory=lambda: ["sentinel2_l2a"])  # corpus modalities read
    split_block: int = 4  # corpus grid cells per side of a geographic split block
    name: str = "corpus_labels"  # task name in reports
    max_timesteps: int = 12  # the first T timesteps of each cell kept

    def _profile(self) -> dict:
        if self.kind not in PER_PIXEL:
            raise ValueError(f"data.kind: a label raster gives per-pixel labels ({PER_PIXEL}), got {self.kind!r}")
        prof = header(self.label_raster, Storage())
        t = prof["transform"]
        epsg = prof["crs"].to_epsg() if prof["crs"] is not None else None
        on_grid = (t.b == 0 and t.d == 0 and abs(t.a - 10) < 1e-9 and abs(t.e + 10) < 1e-9
                   and abs(t.c / 10 - round(t.c / 10)) < 1e-6 and abs(t.f / 10 - round(t.f / 10)) < 1e-6)
        if not epsg or not on_grid:
            raise ValueError(f"label raster {self.label_raster} is not on the corpus grid of {self.root}: needs a "
                             f"UTM EPSG CRS and 10 m pixels with edges on multiples of 10 m; has CRS "
                             f"{prof['crs']}, transform {tuple(t)[:6]}")
        if TILE_SIZE % self.chip_size:
            raise ValueError(f"data.chip_size {self.chip_size} must divide the corpus tile of {TILE_SIZE} px")
        return prof

    def info(self):
        from pipelines.evaluation.task import TaskInfo

        if not self.class_names:
            raise ValueError(f"data.class_names: give the class (or target) names of {self.label_raster}")
        return TaskInfo(self.name, self.kind, list(self.class_names))

    def rows(self) -> list[dict]:
        from pipelines.corpus.raw_layout import list_samples, parse_sample_id
        from pipelines.evaluation.synth_task import geo_block

        prof = self._profile()
        epsg, t = prof["crs"].to_epsg(), prof["transform"]
        samples = sorted(list_samples(self.root, Storage()))
        if not samples:
            raise FileNotFoundError(f"no corpus sample under {self.root}")
        rows = []
        for s in samples:
            e, col, row = parse_sample_id(s)
            r_px, c_px = int(round((t.f + row * 2560.0) / 10)), int(round((col * 2560.0 - t.c) / 10))
            skip = None
            if e != epsg:
                skip = ("other_crs", f"cell {s} is not in the label raster's EPSG:{epsg}")
            elif r_px < 0 or c_px < 0 or r_px + TILE_SIZE > prof["height"] or c_px + TILE_SIZE > prof["width"]:
                skip = ("outside_label_raster", f"cell {s} is not fully inside {self.label_raster}")
            for r0 in range(0, TILE_SIZE, self.chip_size):
                for c0 in range(0, TILE_SIZE, self.chip_size):
                    rows.append({"id": f"{s}@{r0},{c0}", "sample_id": s, "split": None, "label": None,
                                 "r0": r0, "c0": c0, "lr0": r_px + r0, "lc0": c_px + c0, "skip": skip,
                                 "geo": geo_block(s, self.split_block)})
        return rows

    def label(self, row: dict) -> np.ndarray:
        from rasterio.windows import Window

        win = Window(row["lc0"], row["lr0"], self.chip_size, self.chip_size)
        return read_label(self.label_raster, Storage(), self.kind, win)

    def load(self, row: dict):
        from pipelines.finetune.tiles import corpus_tile

        x, months = corpus_tile(self.root, row["sample_id"], tuple(self.modalities), self.max_timesteps)
        r0, c0, s = row["r0"], row["c0"], self.chip_size
        chip = {m: np.array(v[r0 : r0 + s, c0 : c0 + s], np.float32) for m, v in x.items()}
        return chip, np.asarray(months, np.int64), self.label(row)
