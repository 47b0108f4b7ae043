"""The labelled data of a fine-tuning run: which reader, which split, checked labels, fixed-size batches.

    reader = make_reader(cfg.data)                     # FinetuneData -> FinetuneReader (picklable)
    splits, report = checked_splits(reader, task)      # {"train": [row...], "val": [...], "test": [...]}
    x, months, labels = load_batch(reader, splits["train"][:8])
        x {modality: float32 (B, S, S, T, C)} raw units, NaN missing; months int64 (B, T)
        labels: classification int64 (B,) | multilabel int64 (B, K) 0/1 | segmentation int64 (B, S, S), -1
                unlabelled | regression float32 (B, K) | pixel_regression float32 (B, K, S, S), NaN unlabelled

Formats (the evaluation readers, wrapped, plus rasters of per-pixel labels, pairs.py):
    synth          the labelled synthetic corpus (synth_task.py): classification (dominant class of the chip),
                   segmentation (the class map), regression (cover fraction of each class in class_names)
    chips          a folder of GeoTIFF chips + labels CSV (classification, multilabel, segmentation)
    geobench       a converted GEO-Bench dataset (its kind)
    bigearthnet    BigEarthNet S2 (+ S1) patch folders (multilabel)
    pairs          image GeoTIFFs + a label GeoTIFF on the same grid (segmentation, pixel_regression)
    corpus_raster  a label GeoTIFF covering corpus cells (segmentation, pixel_regression)

Every sample is cut or padded to `chip_size` px (centre crop; NaN pixels / unlabelled labels as padding)
and its temporal modalities to `max_timesteps` timesteps (the first ones; NaN timesteps as padding), so that
batches stack.

Splits: "given" keeps each reader's own (BigEarthNet's split CSVs, GEO-Bench's partition, a chip CSV's
`split` column, a pairs scene's `split`; otherwise the reader's seeded split: synth's geographic blocks, a
hash per chip). "geographic" deals whole blocks of `split_block` x `split_block` corpus grid cells (2.56 km)
to train / val / test by `fractions` (task.assign_splits), so neighbouring chips never straddle splits; the
block of a chip is that of its centre (rows without a given split always use it).

Checks (checked_splits): a label that is NaN, outside the class list, or without any labelled pixel skips
its sample, counted per split and reason, with the first messages (file and value) kept in the report; an
empty split, a class seen in val/test but never in train (unless data.unseen_classes is "report"), or a
label raster on another grid stops the run with a ValueError naming the file or config field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from olmoearth.finetuned import IGNORE, PER_PIXEL_KINDS, TASK_KINDS, TaskSpec
from olmoearth.modalities import MAX_PATCH_SIZE, MODALITIES
from pipelines.common.storage import Storage, join
from pipelines.corpus.raw_layout import CLASSES as SYNTH_CLASSES
from pipelines.evaluation.task import SPLITS, TaskInfo, assign_splits

FORMATS = ("synth", "chips", "geobench", "bigearthnet", "pairs", "corpus_raster")
SPLIT_MODES = ("given", "geographic")
MAX_EXAMPLES = 5  # messages kept per split and skip reason


@dataclass
class FinetuneData:
    """The labelled data of a fine-tuning run (the `data:` section of its config)."""

    format: str = "synth"  # synth | chips | geobench | bigearthnet | pairs | corpus_raster
    root: str = ""  # dataset folder or URI (synth / corpus_raster: the corpus root; bigearthnet: the S2 patches)
    kind: str = "classification"  # classification | multilabel | segmentation | regression | pixel_regression
    name: str = ""  # task name in reports (default: per format)
    class_names: list[str] = field(default_factory=list)  # classes, or regression targets (default: the reader's)
    s1_root: str = ""  # bigearthnet: the Sentinel-1 patch folders (optional)
    modality: str = "sentinel2_l2a"  # chips: modality of the chip bands
    bands: list[str] = field(default_factory=list)  # chips: band names in file order (default: all, registry order)
    labels_csv: str = "labels.csv"  # chips: labels CSV inside root
    partition: str = "default"  # geobench: partition name
    chips_per_tile: int = 1  # synth: chips cut from each 256 px tile
    max_samples: int = 0  # synth: tiles read (0 = all)
    # pairs: scenes [{images: {modality: file}, label: file, split: optional train|val|test}], files under root
    pairs: list[dict] = field(default_factory=list)
    months: list[int] = field(default_factory=list)  # pairs: month 0..11 of each image timestep (default 0, 1, ...)
    stride: int = 0  # pairs: px between chip corners (0 = chip_size)
    label_raster: str = ""  # corpus_raster: the label GeoTIFF on the corpus's 10 m grid
    split: str = "given"  # given (the reader's splits) | geographic (blocks of grid cells dealt by fractions)
    split_block: int = 4  # grid cells per side of a geographic split block
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train / val / test shares
    seed: int = 0  # seed of the seeded splits
    # a class of val/test missing from train: error (stop the run) | report (train anyway; listed in the report)
    unseen_classes: str = "error"
    modalities: list[str] = field(default_factory=lambda: ["sentinel2_l2a"])  # encoder inputs fed to the model
    max_timesteps: int = 1  # timesteps per sample (the first ones; shorter samples padded with missing steps)
    chip_size: int = 32  # sample side in px (bigger samples centre-cropped, smaller padded as missing)
    patch_size: int = 4  # encoder patch size; chip_size must be a multiple


def validate_data(d: FinetuneData) -> None:
    """Refuse a bad `data:` section, naming the field."""
    if d.format not in FORMATS:
        raise ValueError(f"data.format must be one of {FORMATS}, got {d.format!r}")
    if d.kind not in TASK_KINDS:
        raise ValueError(f"data.kind must be one of {TASK_KINDS}, got {d.kind!r}")
    if not d.root:
        raise ValueError("data.root: give the dataset folder or URI")
    if d.split not in SPLIT_MODES:
        raise ValueError(f"data.split must be one of {SPLIT_MODES}, got {d.split!r}")
    f = list(d.fractions)
    if len(f) != 3 or any(v < 0 for v in f) or sum(f) <= 0:
        raise ValueError(f"data.fractions must be three non-negative shares (train, val, test), got {d.fractions}")
    if d.unseen_classes not in ("error", "report"):
        raise ValueError(f"data.unseen_classes must be 'error' or 'report', got {d.unseen_classes!r}")
    if d.split_block < 1:
        raise ValueError(f"data.split_block must be >= 1, got {d.split_block}")
    bad = [m for m in d.modalities if m not in MODALITIES or not MODALITIES[m].encoder_input]
    if not d.modalities or bad:
        raise ValueError(f"data.modalities: {bad or 'empty'}; give encoder inputs of {list(MODALITIES)}")
    if not 1 <= d.max_timesteps <= 12:
        raise ValueError(f"data.max_timesteps must be in 1..12, got {d.max_timesteps}")
    if not 1 <= d.patch_size <= MAX_PATCH_SIZE:
        raise ValueError(f"data.patch_size must be in 1..{MAX_PATCH_SIZE}, got {d.patch_size}")
    if d.chip_size < 1 or d.chip_size % d.patch_size:
        raise ValueError(f"data.chip_size {d.chip_size} must be a positive multiple of data.patch_size {d.patch_size}")
    if any(not 0 <= m <= 11 for m in d.months):
        raise ValueError(f"data.months must be month indices 0..11, got {d.months}")
    if d.format == "pairs" and not d.pairs:
        raise ValueError("data.pairs: the pairs format needs scenes [{images: {modality: file}, label: file}]")
    if d.format == "corpus_raster" and not d.label_raster:
        raise ValueError("data.label_raster: the corpus_raster format needs the label GeoTIFF")


def _inner_reader(d: FinetuneData):
    """The format's own reader, configured from `d`."""
    from pipelines.evaluation.readers import reader_from_config
    from pipelines.finetune.pairs import CorpusLabelReader, PairsReader

    named = {"name": d.name} if d.name else {}
    if d.format == "synth":
        if d.kind not in ("classification", "segmentation", "regression"):
            raise ValueError(f"data.kind: the synth corpus gives classification, segmentation or regression "
                             f"(class cover fractions), not {d.kind!r}")
        return reader_from_config("synth", root=d.root, kind="segmentation", chip_size=d.chip_size,
                                  chips_per_tile=d.chips_per_tile, max_timesteps=d.max_timesteps,
                                  max_samples=d.max_samples, split_block=d.split_block,
                                  fractions=tuple(d.fractions), seed=d.seed,
                                  modalities=tuple(d.modalities), **named)
    if d.format == "chips":
        if d.kind not in ("classification", "multilabel", "segmentation"):
            raise ValueError(f"data.kind: a chip folder gives classification, multilabel or segmentation, "
                             f"not {d.kind!r} (per-pixel regression: format pairs)")
        return reader_from_config("chips", root=d.root, modality=d.modality, kind=d.kind, labels_csv=d.labels_csv,
                                  bands=list(d.bands), class_names=list(d.class_names),
                                  fractions=tuple(d.fractions), seed=d.seed, **named)
    if d.format == "geobench":
        return reader_from_config("geobench", root=d.root, partition=d.partition, **named)
    if d.format == "bigearthnet":
        return reader_from_config("bigearthnet", s2_root=d.root, s1_root=d.s1_root or None,
                                  class_names=list(d.class_names), fractions=tuple(d.fractions), seed=d.seed, **named)
    if d.format == "pairs":
        return PairsReader(d.root, list(d.pairs), d.kind, list(d.class_names), list(d.months), d.chip_size,
                           d.stride, d.split_block, d.name or "pairs")
    return CorpusLabelReader(d.root, d.label_raster, d.kind, list(d.class_names), d.chip_size, list(d.modalities),
                             d.split_block, d.name or "corpus_labels", d.max_timesteps)


def make_reader(data: FinetuneData) -> FinetuneReader:
    validate_data(data)
    return FinetuneReader(data, _inner_reader(data))


@dataclass
class FinetuneReader:
    """A format's reader seen through the run's `data:` settings: the run's kind, class names and split,
    fixed-size samples, and `label(row)` (the label alone, what checked_splits reads)."""

    data: FinetuneData
    inner: object
    _info: TaskInfo | None = field(default=None, repr=False, compare=False)  # info(), once per process

    def info(self) -> TaskInfo:
        if self._info is None:
            self._info = self._read_info()
        return self._info

    def _read_info(self) -> TaskInfo:
        d, info = self.data, self.inner.info()
        if d.format == "synth":
            names = info.class_names
            if d.kind == "regression":
                names = list(d.class_names) or names
                unknown = [n for n in names if n not in info.class_names]
                if unknown:
                    raise ValueError(f"data.class_names: synth regression targets {unknown} are not classes of "
                                     f"{d.root} ({info.class_names})")
            return TaskInfo(info.name, d.kind, list(names))
        if info.kind != d.kind:
            raise ValueError(f"data.kind is {d.kind!r} but {d.root} ({d.format}) is a {info.kind} task")
        return info

    def rows(self) -> list[dict]:
        d = self.data
        rows = self.inner.rows()
        if not rows:
            raise ValueError(f"{d.root}: the {d.format} reader found no sample")
        ids = [r["id"] for r in rows]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"{d.root}: sample id {dup!r} appears twice")
        todo = rows if d.split == "geographic" else [r for r in rows if r.get("split") is None]
        if todo:
            keys = {r["id"]: self.geo_key(r) for r in todo}
            split_of = assign_splits(list(keys.values()), tuple(d.fractions), d.seed)
            for r in todo:
                r["split"] = split_of[keys[r["id"]]]
        return rows

    def geo_key(self, row: dict) -> str:
        """The geographic block of a row (see the module docstring)."""
        from pipelines.evaluation.synth_task import geo_block
        from pipelines.finetune.pairs import geo_key, header

        d = self.data
        if "geo" in row:
            return row["geo"]
        if d.format == "synth":
            return geo_block(row["sample_id"], d.split_block)
        if d.format == "chips":
            uri = row["chip"]
        elif d.format == "bigearthnet":
            uri = join(row["s2_dir"], f"{row['id']}_B02.tif")
        else:
            raise ValueError(f"data.split: geographic needs georeferenced samples; {d.format} samples are not "
                             "(use split: given)")
        prof = header(uri, Storage())
        return geo_key(prof, 0, 0, prof["width"], d.split_block)

    def label(self, row: dict):
        """The row's label, fixed-size (see load_batch), without reading its pixels where the format allows."""
        from pipelines.finetune.tiles import synth_label_map

        d = self.data
        if d.format == "synth":
            r0, c0, s = row["r0"], row["c0"], d.chip_size
            class_map = synth_label_map(d.root, row["sample_id"])[r0 : r0 + s, c0 : c0 + s]
            return self._fit_label(self._synth_label(class_map))
        if d.format in ("pairs", "corpus_raster"):
            return self._fit_label(self.inner.label(row))
        if d.format == "chips" and d.kind == "segmentation":
            from pipelines.finetune.pairs import read_label

            return self._fit_label(read_label(row["mask"], Storage(), "segmentation"))
        if d.format == "geobench":
            return self._fit_label(self.inner.load(row)[2])
        return self._fit_label(np.asarray(row["label"]))

    def _synth_label(self, class_map: np.ndarray):
        """A synth chip's (S, S) class map -> the run's label: the map, its dominant class, or cover fractions."""
        kind = self.data.kind
        if kind == "segmentation":
            return class_map
        labelled = class_map[class_map >= 0]
        if kind == "classification":
            return np.asarray(np.bincount(labelled).argmax() if labelled.size else IGNORE, np.int64)
        info = self.info()
        classes = SYNTH_CLASSES  # the class ids of the synth label maps
        counts = np.bincount(labelled, minlength=len(classes)).astype(np.float32)
        if not labelled.size:
            return np.full(info.num_classes, np.nan, np.float32)
        return np.asarray([counts[classes.index(n)] / labelled.size for n in info.class_names], np.float32)

    def _fit_label(self, label):
        d = self.data
        if d.kind == "segmentation":
            return fit_spatial(np.asarray(label, np.int64), d.chip_size, IGNORE, axes=(0, 1))
        if d.kind == "pixel_regression":
            label = np.asarray(label, np.float32)
            label = label[None] if label.ndim == 2 else label  # (K, H, W)
            return fit_spatial(label, d.chip_size, np.nan, axes=(1, 2))
        if d.kind == "regression":
            return np.asarray(label, np.float32).reshape(-1)
        return np.asarray(label)

    def load(self, row: dict):
        """(x {m: (S, S, T, C)}, months (T,), label) of one checked row, fixed-size."""
        d = self.data
        if d.format == "synth":  # through the tile cache (pipelines/finetune/tiles.py)
            from pipelines.finetune.tiles import corpus_tile

            tile, months = corpus_tile(d.root, row["sample_id"], tuple(d.modalities), d.max_timesteps)
            r0, c0, s = row["r0"], row["c0"], d.chip_size
            x = {m: np.array(v[r0 : r0 + s, c0 : c0 + s]) for m, v in tile.items()}  # a copy, not a view
        else:
            x, months, _ = self.inner.load(row)
        present = [m for m in d.modalities if m in x]
        if not present:
            raise ValueError(f"{row['id']}: has none of data.modalities {d.modalities} (it has {sorted(x)})")
        t = d.max_timesteps
        out = {}
        for m in d.modalities:
            mod = MODALITIES[m]
            steps = t if mod.temporal else 1
            v = x.get(m)
            if v is None:
                v = np.full((d.chip_size, d.chip_size, steps, mod.num_bands), np.nan, np.float32)
            v = fit_spatial(np.asarray(v, np.float32), d.chip_size, np.nan, axes=(0, 1))
            out[m] = fit_time(v, steps)
        months = np.asarray(months, np.int64)[:t]
        months = np.concatenate([months, np.full(t - len(months), months[-1] if len(months) else 0, np.int64)])
        return out, months, self.label(row)


def fit_spatial(a: np.ndarray, size: int, fill, axes=(0, 1)) -> np.ndarray:
    """Centre-crop or pad (with `fill`) the two `axes` of `a` to `size`."""
    out = a
    for ax in axes:
        n = out.shape[ax]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, np.arange(start, start + size), axis=ax)
        elif n < size:
            pad = [(0, 0)] * out.ndim
            before = (size - n) // 2
            pad[ax] = (before, size - n - before)
            out = np.pad(out, pad, constant_values=fill)
    return out


def fit_time(v: np.ndarray, steps: int) -> np.ndarray:
    """(S, S, T, C) -> (S, S, steps, C): the first `steps` timesteps, NaN timesteps appended if fewer."""
    v = v[:, :, :steps]
    if v.shape[2] < steps:
        pad = np.full((*v.shape[:2], steps - v.shape[2], v.shape[3]), np.nan, np.float32)
        v = np.concatenate([v, pad], axis=2)
    return v


# --------------------------------------------------------------------------------------------------
# checks


def label_problem(kind: str, num_classes: int, label) -> tuple[str, str] | None:
    """(reason, detail) when a label cannot be trained on, else None."""
    a = np.asarray(label)
    if kind in ("regression", "pixel_regression"):
        a = a.astype(np.float64)
        if kind == "regression" and a.shape != (num_classes,):
            return "label_outside_classes", f"{a.size} value(s), expected one per target ({num_classes})"
        if kind == "regression" and not np.isfinite(a).all():
            return "nan_label", f"non-finite target value(s) {a.tolist()}"
        if kind == "pixel_regression" and not np.isfinite(a).any():
            return "no_labelled_pixel", "every target pixel is NaN / nodata"
        return None
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return "nan_label", "NaN label"
    a = a.astype(np.int64)
    if kind == "classification":
        if a.ndim != 0:
            return "label_outside_classes", f"expected one class id, got shape {a.shape}"
        if int(a) == IGNORE:
            return "unlabelled", "no class (-1)"
        if not 0 <= int(a) < num_classes:
            return "label_outside_classes", f"class id {int(a)} outside 0..{num_classes - 1}"
        return None
    if kind == "multilabel":
        if a.shape != (num_classes,) or not np.isin(a, (0, 1)).all():
            return "label_outside_classes", f"expected a 0/1 vector of {num_classes} classes, got {a.tolist()}"
        return None
    bad = np.unique(a[(a < IGNORE) | (a >= num_classes)])
    if bad.size:
        return "label_outside_classes", f"class id(s) {bad[:5].tolist()} outside -1..{num_classes - 1}"
    if not (a != IGNORE).any():
        return "no_labelled_pixel", "every pixel is unlabelled (-1 / nodata)"
    return None


def classes_of(kind: str, label) -> set[int]:
    a = np.asarray(label)
    if kind == "classification":
        return {int(a)}
    if kind == "multilabel":
        return {int(i) for i in np.flatnonzero(a)}
    if kind == "segmentation":
        return {int(i) for i in np.unique(a) if i >= 0}
    return set()


def _where(row: dict) -> str:
    """The row's id and, when it is not already in the id, the file holding its label."""
    files = [row.get(k) for k in ("label_uri", "mask", "path", "chip") if row.get(k)]
    return row["id"] if not files or files[0] in row["id"] else f"{row['id']} ({files[0]})"


def checked_splits(reader: FinetuneReader, task: TaskSpec | TaskInfo) -> tuple[dict, dict]:
    """(splits {split: [row...]}, report {split: {"used": n, "skipped": {reason: n}, "examples": {reason:
    [message]}, "classes_absent": [name]}}, train's also "classes_only_held_out"); raises ValueError for an
    empty split or a class that is in val or test but not in train (see the module docstring)."""
    from tqdm import tqdm

    kind, names = task.kind, list(task.class_names)
    splits = {s: [] for s in SPLITS}
    report = {s: {"used": 0, "skipped": {}, "examples": {}} for s in SPLITS}
    seen = {s: set() for s in SPLITS}
    for row in tqdm(reader.rows(), desc="check labels", unit="sample"):
        split = row.get("split")
        if split not in SPLITS:
            raise ValueError(f"{_where(row)}: split {split!r} is not one of {SPLITS}")
        problem = row.get("skip")
        if problem is None:
            try:
                label = reader.label(row)
            except (OSError, ValueError, KeyError) as e:  # unreadable label file: reported, not fatal
                problem = ("unreadable_label", str(e))
            else:
                problem = label_problem(kind, len(names), label)
        if problem is not None:
            _skip(report[split], problem, _where(row))
            continue
        splits[split].append(row)
        report[split]["used"] += 1
        seen[split] |= classes_of(kind, label)
    _check_splits(reader, kind, names, splits, report, seen)
    return splits, report


def _skip(entry: dict, problem: tuple[str, str], where: str) -> None:
    reason, detail = problem
    entry["skipped"][reason] = entry["skipped"].get(reason, 0) + 1
    examples = entry["examples"].setdefault(reason, [])
    if len(examples) < MAX_EXAMPLES:
        examples.append(f"{where}: {detail}")


def _check_splits(reader, kind: str, names: list[str], splits: dict, report: dict, seen: dict) -> None:
    d = reader.data
    for s in SPLITS:
        if not splits[s]:
            skipped = report[s]["skipped"]
            why = f" (skipped: {skipped}; e.g. {next(iter(report[s]['examples'].values()))[0]})" if skipped else ""
            raise ValueError(f"{d.root}: the {s} split is empty{why}; every split needs samples: change "
                             f"data.fractions ({list(d.fractions)}), data.split ({d.split!r}), data.split_block "
                             f"or the dataset's own split")
    if kind not in ("classification", "multilabel", "segmentation"):
        return
    for s in SPLITS:
        report[s]["classes_absent"] = [names[i] for i in range(len(names)) if i not in seen[s]]
    held_out = sorted((seen["val"] | seen["test"]) - seen["train"])
    report["train"]["classes_only_held_out"] = [names[i] for i in held_out]
    if held_out and d.unseen_classes == "error":
        raise ValueError(f"{d.root}: class(es) {[names[i] for i in held_out]} appear in val/test but never in "
                         "train; change data.split / data.seed / data.fractions, leave them out of the labels, "
                         "or set data.unseen_classes: report to train anyway")


# --------------------------------------------------------------------------------------------------
# batches and the task


def load_batch(reader: FinetuneReader, rows: list[dict]) -> tuple[dict, np.ndarray, np.ndarray]:
    """Checked rows -> (x {m: float32 (B, S, S, T, C)}, months int64 (B, T), labels (see the module docstring))."""
    if not rows:
        raise ValueError("load_batch: no rows")
    samples = [reader.load(r) for r in rows]
    x = {m: np.stack([s[0][m] for s in samples]) for m in samples[0][0]}
    months = np.stack([s[1] for s in samples])
    labels = np.stack([np.asarray(s[2]) for s in samples])
    if reader.data.kind in ("classification", "multilabel", "segmentation"):
        labels = labels.astype(np.int64)
    else:
        labels = labels.astype(np.float32)
    return x, months, labels


def task_spec(data: FinetuneData, info: TaskInfo, head: str = "") -> TaskSpec:
    """The TaskSpec of a run: the reader's kind and class names, the data's shapes, `head` (default: linear
    for scene tasks, upsample for per-pixel ones)."""
    head = head or ("upsample" if info.kind in PER_PIXEL_KINDS else "linear")
    return TaskSpec(kind=info.kind, class_names=list(info.class_names), head=head, patch_size=data.patch_size,
                    modalities=list(data.modalities), num_timesteps=data.max_timesteps, chip_size=data.chip_size)
