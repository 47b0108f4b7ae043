"""Readers of labelled datasets, one per on-disk format. Each is a small picklable dataclass with

    info()      -> TaskInfo                       name, kind, class names
    rows()      -> list[dict]                     one JSON-able row per chip (id, split, label, paths)
    load(row)   -> (x, months, label)             pixels in this project's layout (see task.py)

Formats: BigEarthNet-S2 (+ S1) patch folders, a generic folder of GeoTIFF chips with a labels CSV, and
GEO-Bench's converted HDF5 datasets. The synthetic corpus task lives in synth_task.py. Paths may be local
or s3:// (read through pipelines.common.storage)."""

from __future__ import annotations

import ast
import csv
import datetime
import io
import json
import pickle
import re
from dataclasses import dataclass, field

import numpy as np

from olmoearth.modalities import get_modality
from pipelines.common.storage import Storage, is_s3, join
from pipelines.evaluation.task import TaskInfo, assign_splits
from pipelines.imagery.geotiff import GeoTiffVanished, read_geotiff
from pipelines.imagery.units import repeat_pixels

# --------------------------------------------------------------------------------------------------
# small I/O helpers


def _glob(storage: Storage, pattern: str) -> list[str]:
    fs = storage.fs(pattern)
    found = sorted(fs.glob(pattern))
    return ["s3://" + p if is_s3(pattern) and not p.startswith("s3://") else p for p in found]


def _read_tif(uri: str) -> tuple[np.ndarray, dict]:
    """(bands, H, W) array and the profile of a GeoTIFF (local or s3)."""
    try:
        return read_geotiff(uri)
    except GeoTiffVanished:
        raise FileNotFoundError(f"missing chip file {uri}") from None


def _onto_grid(band: np.ndarray, size: tuple[int, int], where: str) -> np.ndarray:
    """Bring a (h, w) band stored at a coarser resolution onto the (H, W) 10 m grid by pixel repetition
    (as the original's data); the factor must be a whole number."""
    h, w = band.shape
    H, W = size
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"{where}: band of {h}x{w} px cannot be repeated onto a {H}x{W} grid")
    return repeat_pixels(band, H // h)


def _months_from_date(text: str | None, default: int) -> int:
    if not text:
        return default
    return datetime.date.fromisoformat(str(text)[:10]).month - 1


# --------------------------------------------------------------------------------------------------
# BigEarthNet


@dataclass
class BigEarthNetReader:
    """BigEarthNet patch folders: `<s2_root>/<patch>/<patch>_B01.tif ... _B12.tif` (10/20/60 m bands,
    uint16 L2A reflectance x 10000) + `<patch>_labels_metadata.json` (CORINE labels, acquisition date);
    optionally the matching Sentinel-1 folders `<s1_root>/<s1 patch>/..._VV.tif, _VH.tif` (dB) whose
    metadata names `corresponding_s2_patch`. Multi-label task. Splits from `split_csvs` (BigEarthNet's
    train.csv / val.csv / test.csv: one S2 patch name per line) or, without them, patches dealt to
    splits by a seeded hash."""

    s2_root: str
    s1_root: str | None = None
    class_names: list[str] = field(default_factory=list)  # empty: the labels seen, sorted
    split_csvs: dict[str, str] = field(default_factory=dict)  # {"train": uri, "val": uri, "test": uri}
    fractions: tuple[float, float, float] = (0.6, 0.0, 0.4)
    seed: int = 0
    name: str = "bigearthnet"

    def _patches(self) -> list[tuple[str, dict]]:
        storage = Storage()
        metas = _glob(storage, join(self.s2_root, "*", "*_labels_metadata.json"))
        if not metas:
            raise FileNotFoundError(f"no BigEarthNet patch (<patch>/<patch>_labels_metadata.json) under {self.s2_root}")
        out = []
        for m in metas:
            try:
                meta = json.loads(storage.read_text(m))
                labels = meta["labels"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{m}: not a BigEarthNet labels file (need a JSON object with 'labels'): {e}") from None
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise ValueError(f"{m}: 'labels' must be a list of class names, got {labels!r}")
            out.append((m.rsplit("/", 2)[-2], meta))
        return out

    def info(self) -> TaskInfo:
        names = self.class_names or sorted({l for _, meta in self._patches() for l in meta["labels"]})
        return TaskInfo(self.name, "multilabel", list(names))

    def _s1_index(self, storage: Storage) -> dict[str, str]:
        if not self.s1_root:
            return {}
        index = {}
        for m in _glob(storage, join(self.s1_root, "*", "*_labels_metadata.json")):
            s2 = json.loads(storage.read_text(m)).get("corresponding_s2_patch")
            if s2:
                index[s2] = m.rsplit("/", 1)[0]
        return index

    def rows(self) -> list[dict]:
        storage = Storage()
        patches = self._patches()
        names = self.info().class_names
        lookup = {n: i for i, n in enumerate(names)}
        if self.split_csvs:
            split_of = {}
            for split, uri in self.split_csvs.items():
                for line in storage.read_text(uri).splitlines():
                    if line.strip():
                        split_of[line.strip().split(",")[0]] = split
        else:
            split_of = assign_splits([p for p, _ in patches], self.fractions, self.seed)
        s1 = self._s1_index(storage)
        rows = []
        for patch, meta in patches:
            if patch not in split_of:
                continue  # not in any official split (e.g. removed cloudy/snowy patches)
            unknown = [l for l in meta["labels"] if l not in lookup]
            if unknown:
                raise ValueError(f"patch {patch}: labels {unknown} are not among the task's class names")
            y = [0] * len(names)
            for l in meta["labels"]:
                y[lookup[l]] = 1
            if self.s1_root and patch not in s1:
                raise FileNotFoundError(f"patch {patch}: no Sentinel-1 patch under {self.s1_root} names it")
            rows.append({"id": patch, "split": split_of[patch], "label": y,
                         "s2_dir": join(self.s2_root, patch), "s1_dir": s1.get(patch),
                         "date": meta.get("acquisition_date")})
        return rows

    def load(self, row: dict):
        s2 = get_modality("sentinel2_l2a")
        bands = []
        for b in s2.bands:
            arr, _ = _read_tif(join(row["s2_dir"], f"{row['id']}_{b}.tif"))
            bands.append(arr[0].astype(np.float32))
        size = max((b.shape for b in bands), key=lambda s: s[0])
        x = {"sentinel2_l2a": np.stack([_onto_grid(b, size, f"{row['id']}") for b in bands], -1)[:, :, None]}
        if row.get("s1_dir"):
            s1_name = row["s1_dir"].rstrip("/").rsplit("/", 1)[-1]
            pols = [_read_tif(join(row["s1_dir"], f"{s1_name}_{p.upper()}.tif"))[0][0] for p in ("vv", "vh")]
            x["sentinel1"] = np.stack([_onto_grid(p.astype(np.float32), size, s1_name) for p in pols], -1)[:, :, None]
        months = np.array([_months_from_date(row.get("date"), 6)], dtype=np.int64)
        return x, months, np.asarray(row["label"], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# A folder of GeoTIFF chips + a labels CSV


@dataclass
class ChipFolderReader:
    """A generic labelled set: `<root>/<labels_csv>` with one row per chip.

    Columns: `chip` (GeoTIFF path relative to root), then for classification `label` (a class name; for
    multilabel several names joined by ';'), for segmentation `mask` (a one-band GeoTIFF of class ids,
    -1 or the file's nodata = unlabelled); optional `split` (train/val/test; else seeded hash split) and
    `date` (YYYY-MM-DD, gives the month). The chip's bands are `bands` (registry names of `modality`) in
    file order, repeated per timestep when the file stacks T timesteps on the band axis; missing values
    are the file's nodata or NaN."""

    root: str
    modality: str = "sentinel2_l2a"
    kind: str = "classification"
    labels_csv: str = "labels.csv"
    bands: list[str] = field(default_factory=list)  # empty: all bands of the modality, registry order
    class_names: list[str] = field(default_factory=list)  # empty: the labels seen, sorted
    fractions: tuple[float, float, float] = (0.6, 0.0, 0.4)
    seed: int = 0
    name: str = "chips"

    def _table(self) -> list[dict]:
        uri = join(self.root, self.labels_csv)
        storage = Storage()
        try:
            text = storage.read_text(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"labels file {uri} not found") from None
        reader = csv.DictReader(io.StringIO(text))
        need = ["chip", "mask" if self.kind == "segmentation" else "label"]
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{uri}: missing column(s) {missing}; has {reader.fieldnames}")
        table = list(reader)
        for i, r in enumerate(table, start=2):
            for c in need:
                if not (r.get(c) or "").strip():
                    raise ValueError(f"{uri} line {i}: empty {c!r}")
            if r.get("split") and r["split"] not in ("train", "val", "test"):
                raise ValueError(f"{uri} line {i}: split must be train, val or test, got {r['split']!r}")
            r["_line"] = i
        if not table:
            raise ValueError(f"{uri}: no rows")
        return table

    def _labels(self, r: dict) -> list[str]:
        return [s.strip() for s in r["label"].split(";") if s.strip()]

    def info(self) -> TaskInfo:
        names = list(self.class_names)
        if not names and self.kind != "segmentation":
            names = sorted({l for r in self._table() for l in self._labels(r)})
        if not names:
            raise ValueError(f"chip folder {self.root}: segmentation needs class_names in the config")
        return TaskInfo(self.name, self.kind, names)

    def rows(self) -> list[dict]:
        storage = Storage()
        table, names = self._table(), self.info().class_names
        lookup = {n: i for i, n in enumerate(names)}
        auto = assign_splits([r["chip"] for r in table if not r.get("split")], self.fractions, self.seed)
        rows = []
        for r in table:
            where = f"{join(self.root, self.labels_csv)} line {r['_line']}"
            chip_uri = join(self.root, r["chip"])
            if not storage.exists(chip_uri):
                raise FileNotFoundError(f"{where}: chip {chip_uri} does not exist")
            label = None
            if self.kind == "segmentation":
                if not storage.exists(join(self.root, r["mask"])):
                    raise FileNotFoundError(f"{where}: mask {join(self.root, r['mask'])} does not exist")
            else:
                labels = self._labels(r)
                unknown = [l for l in labels if l not in lookup]
                if unknown:
                    raise ValueError(f"{where}: label(s) {unknown} not among class names {names}")
                if self.kind == "classification":
                    if len(labels) != 1:
                        raise ValueError(f"{where}: classification needs exactly one label, got {labels}")
                    label = lookup[labels[0]]
                else:
                    label = [int(n in labels) for n in names]
            rows.append({"id": r["chip"], "split": r.get("split") or auto[r["chip"]], "label": label,
                         "chip": chip_uri, "mask": join(self.root, r["mask"]) if self.kind == "segmentation" else None,
                         "date": r.get("date") or None})
        return rows

    def load(self, row: dict):
        mod = get_modality(self.modality)
        bands = list(self.bands) or list(mod.bands)
        unknown = [b for b in bands if b not in mod.bands]
        if unknown:
            raise ValueError(f"bands {unknown} are not bands of {self.modality} ({list(mod.bands)})")
        arr, meta = _read_tif(row["chip"])  # (T*c, H, W)
        arr = arr.astype(np.float32)
        if meta.get("nodata") is not None and not np.isnan(meta["nodata"]):
            arr[arr == meta["nodata"]] = np.nan
        if arr.shape[0] % len(bands):
            raise ValueError(f"{row['chip']}: {arr.shape[0]} bands is not a multiple of the {len(bands)} configured bands")
        T = arr.shape[0] // len(bands)
        H, W = arr.shape[1:]
        x = np.full((H, W, T, mod.num_bands), np.nan, np.float32)  # bands not in the file stay missing
        for j, b in enumerate(bands):
            x[:, :, :, mod.bands.index(b)] = arr[j :: len(bands)].transpose(1, 2, 0)
        months = np.full(T, _months_from_date(row.get("date"), 6), np.int64)
        if self.kind == "segmentation":
            m, mmeta = _read_tif(row["mask"])
            label = m[0].astype(np.int64)
            if mmeta.get("nodata") is not None and not np.isnan(mmeta["nodata"]):
                label[m[0] == mmeta["nodata"]] = -1
            if label.shape != (H, W):
                raise ValueError(f"{row['mask']}: mask is {label.shape}, chip {row['chip']} is {(H, W)}")
            if label.max() >= len(self.class_names) or label.min() < -1:
                raise ValueError(f"{row['mask']}: class ids {label.min()}..{label.max()} outside -1..{len(self.class_names) - 1}")
        else:
            label = np.asarray(row["label"], dtype=np.int64)
        return {self.modality: x}, months, label


# --------------------------------------------------------------------------------------------------
# GEO-Bench


class _Record:
    """Stands in for any class of GEO-Bench's pickles (band infos, task specs, label types): keeps the
    object's state as attributes and never runs the original's code, so reading needs no geobench."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {("datetime", "date"), ("datetime", "datetime"), ("datetime", "timedelta"),
                ("collections", "OrderedDict"), ("copyreg", "_reconstructor"), ("builtins", "object"),
                ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}  # fmt: skip

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        return type(name, (_Record,), {"__module__": "geobench_record:" + module})


def _safe_loads(data: bytes):
    return _SafeUnpickler(io.BytesIO(data)).load()


_S2_NUMBER = re.compile(r"^\s*(\d{1,2}A?)\b")


def _geobench_band(band_name: str, sensor: str) -> tuple[str, str] | None:
    """GEO-Bench band name -> (modality, band) of ours, or None for a band we do not model.
    Sentinel-2: '02 - Blue' -> B02, '08A - ...' -> B8A; Landsat-8: '04 - Red' -> B4; Sentinel-1: VV / VH."""
    m = _S2_NUMBER.match(band_name)
    if sensor == "Sentinel1" or (not m and band_name.upper() in ("VV", "VH")):
        pol = band_name.strip().lower()
        return ("sentinel1", pol) if pol in ("vv", "vh") else None
    if not m:
        return None
    num = m.group(1)
    if sensor == "Landsat8":
        band = "B" + str(int(num.rstrip("A")))
        return ("landsat", band) if band in get_modality("landsat").bands else None
    band = "B8A" if num.upper() in ("8A", "08A") else f"B{int(num):02d}"
    return ("sentinel2_l2a", band) if band in get_modality("sentinel2_l2a").bands else None


@dataclass
class GeoBenchReader:
    """One converted GEO-Bench dataset folder (e.g. `classification_v1.0/m-eurosat`):

        task_specs.pkl            pickled TaskSpecifications (label type, class count and names)
        <name>_partition.json     {"train": [sample names], "valid": [...], "test": [...]}
        <sample>.hdf5             one dataset per band (named by the band, plus '_<date>' for time series);
                                  file attribute 'pickle' = repr of the pickled dict with 'bands_order',
                                  per-band info and, for classification, 'label' (int or 0/1 list);
                                  segmentation stores its class map as the band 'label'.

    Pickles are read without GEO-Bench's code: its classes are replaced by plain records."""

    root: str
    partition: str = "default"
    name: str = ""  # empty: the folder name
    default_month: int = 6

    def _specs(self):
        uri = join(self.root, "task_specs.pkl")
        try:
            return _safe_loads(Storage().read_bytes(uri))
        except FileNotFoundError:
            raise FileNotFoundError(f"GEO-Bench task metadata {uri} not found") from None

    def info(self) -> TaskInfo:
        specs = self._specs()
        label_type = getattr(specs, "label_type", None)
        kind_name = type(label_type).__name__
        kind = {"Classification": "classification", "MultiLabelClassification": "multilabel",
                "SegmentationClasses": "segmentation"}.get(kind_name)
        if kind is None:
            raise ValueError(f"{join(self.root, 'task_specs.pkl')}: unsupported label type {kind_name!r}")
        n = getattr(label_type, "n_classes", None)
        names = getattr(label_type, "class_names", None) or getattr(label_type, "_class_names", None)
        if not names:
            if not n:
                raise ValueError(f"{join(self.root, 'task_specs.pkl')}: label type has no n_classes")
            names = [str(i) for i in range(n)]
        name = self.name or getattr(specs, "dataset_name", None) or self.root.rstrip("/").rsplit("/", 1)[-1]
        return TaskInfo(name, kind, list(names))

    def rows(self) -> list[dict]:
        storage = Storage()
        uri = join(self.root, f"{self.partition}_partition.json")
        try:
            part = json.loads(storage.read_text(uri))
        except FileNotFoundError:
            raise FileNotFoundError(f"GEO-Bench partition file {uri} not found") from None
        rows = []
        for split, ours in (("train", "train"), ("valid", "val"), ("test", "test")):
            for sample in part.get(split, []):
                path = join(self.root, f"{sample}.hdf5")
                if not storage.exists(path):
                    raise FileNotFoundError(f"{uri} lists sample {sample!r} but {path} does not exist")
                rows.append({"id": sample, "split": ours, "label": None, "path": path})
        if not rows:
            raise ValueError(f"{uri}: no samples in train/valid/test")
        return rows

    def load(self, row: dict):
        import h5py

        info = self.info()
        data = Storage().read_bytes(row["path"])
        with h5py.File(io.BytesIO(data), "r") as fp:
            try:
                attrs = _safe_loads(ast.literal_eval(fp.attrs["pickle"]))
            except (KeyError, ValueError, SyntaxError) as e:
                raise ValueError(f"{row['path']}: no readable 'pickle' attribute ({e})") from None
            order = attrs.get("bands_order", list(fp.keys()))
            planes: dict[tuple[str, str], dict] = {}  # (modality, band) -> {date: array}
            label = None
            for key in order:
                if key.startswith("label"):
                    label = np.asarray(fp[key])
                    continue
                band_info = attrs[key]["band_info"]
                mapped = _geobench_band(band_info.name, type(band_info).__name__)
                if mapped is None:
                    continue  # e.g. Sentinel-2 B10 (absent from L2A), cloud masks
                date = attrs[key].get("date")
                planes.setdefault(mapped, {})[date] = np.asarray(fp[key], dtype=np.float32)
        if not planes:
            raise ValueError(f"{row['path']}: no band maps onto Sentinel-2, Sentinel-1 or Landsat")
        dates = sorted({d for v in planes.values() for d in v}, key=lambda d: (d is None, str(d)))
        size = max((a.shape[:2] for v in planes.values() for a in v.values()), key=lambda s: s[0])
        x = {}
        for (mod_name, band), by_date in planes.items():
            mod = get_modality(mod_name)
            if mod_name not in x:
                x[mod_name] = np.full((*size, len(dates), mod.num_bands), np.nan, np.float32)
            for d, arr in by_date.items():
                arr = arr[..., 0] if arr.ndim == 3 else arr
                x[mod_name][:, :, dates.index(d), mod.bands.index(band)] = _onto_grid(arr, size, row["path"])
        months = np.array([d.month - 1 if isinstance(d, datetime.date) else self.default_month for d in dates], np.int64)
        if info.kind == "segmentation":
            if label is None:
                raise ValueError(f"{row['path']}: segmentation sample without a 'label' band")
            label = label[..., 0] if label.ndim == 3 else label
            label = label.astype(np.int64)
        else:
            label = attrs.get("label") if label is None else label
            if label is None:
                raise ValueError(f"{row['path']}: no 'label' in the sample")
            label = np.asarray(label, dtype=np.int64)
            if info.kind == "multilabel" and label.shape != (info.num_classes,):
                raise ValueError(f"{row['path']}: multi-label vector of shape {label.shape}, expected ({info.num_classes},)")
        return x, months, label


def reader_from_config(fmt: str, /, **kwargs):
    """'bigearthnet' | 'chips' | 'geobench' | 'synth' -> a reader."""
    if fmt == "synth":
        from pipelines.evaluation.synth_task import SynthTaskReader

        return SynthTaskReader(**kwargs)
    classes = {"bigearthnet": BigEarthNetReader, "chips": ChipFolderReader, "geobench": GeoBenchReader}
    if fmt not in classes:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {sorted(classes) + ['synth']}")
    return classes[fmt](**kwargs)


