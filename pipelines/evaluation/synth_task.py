"""The labelled task of the synthetic corpus (pipelines/corpus/synth.py with labelled=True): each tile has a
class (`labels.csv`: sample_id, label, label_name: the tile's dominant land cover) and a per-pixel class
map (`10_labels/`).

Chips are cut from the 256 x 256 tiles (`chip_size`, `chips_per_tile`) and keep the first
`max_timesteps` months of `modalities`; every chip of a tile stays in its tile's split. A chip's class
(classification) is the dominant class of the label map inside the chip (the tile's label when the chip
is the whole tile); segmentation uses the map itself. Class ids are the corpus layout's
(`pipelines.corpus.raw_layout.CLASSES`). Splits are by geography: tiles (`EPSG:<code>_<col>_<row>`) are
grouped into blocks of `split_block` x `split_block` grid cells and whole blocks go to train, val or test,
so no tile (and no neighbourhood) is in two splits."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from olmoearth.modalities import ENCODER_MODALITIES, TILE_SIZE
from pipelines.common.storage import Storage, join
from pipelines.evaluation.task import TaskInfo, assign_splits

# The EuroSAT-like task of configs/eval_synth.yaml (single-date Sentinel-2 chips of 32 px, 8 per tile, split by
# 2 x 2-cell blocks); pretraining's in-loop probe scores the same task (pipelines/evaluation/hook.py make_probe).
EUROSAT_LIKE = {"chip_size": 32, "chips_per_tile": 8, "max_timesteps": 1, "split_block": 2,
                "fractions": (0.6, 0.0, 0.4), "modalities": ("sentinel2_l2a",)}  # fmt: skip


def geo_block(sample_id: str, block: int) -> str:
    """The geographic block of a tile: its UTM zone and grid cell divided by `block`."""
    from pipelines.corpus.raw_layout import parse_sample_id

    epsg, col, row = parse_sample_id(sample_id)
    return f"EPSG:{epsg}/{col // block}/{row // block}"


def chip_offsets(chip_size: int, count: int, tile: int = TILE_SIZE) -> list[tuple[int, int]]:
    """`count` non-overlapping chip corners inside a tile, spread over it (row-major over a grid)."""
    n = tile // chip_size
    if chip_size > tile or count < 1 or count > n * n:
        raise ValueError(f"cannot cut {count} chips of {chip_size} px from a {tile} px tile")
    cells = [(r * chip_size, c * chip_size) for r in range(n) for c in range(n)]
    step = len(cells) / count
    return [cells[int(i * step + step / 2)] for i in range(count)]


@dataclass
class SynthTaskReader:
    root: str  # the labelled corpus's root (local or s3://)
    kind: str = "classification"  # or "segmentation" (the per-pixel class maps)
    chip_size: int = 64  # chip side in px, cut from the 256 px tiles
    chips_per_tile: int = 1  # chips cut from each tile
    max_timesteps: int = 12  # the first T months kept
    max_samples: int = 0  # tiles read (0: all)
    split_block: int = 4  # grid cells per side of a geographic split block
    fractions: tuple[float, float, float] = (0.7, 0.0, 0.3)  # train / val / test share of the blocks
    seed: int = 0  # seed of the split
    name: str = "synth"  # task name in the report
    modalities: tuple[str, ...] = ENCODER_MODALITIES  # of the corpus, fed to the encoder

    def _labels(self) -> tuple[dict[str, int], list[str]]:
        uri = join(self.root, "labels.csv")
        storage = Storage()
        try:
            text = storage.read_text(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} not found: write the corpus with labelled=True") from None
        reader = csv.DictReader(io.StringIO(text))
        missing = {"sample_id", "label", "label_name"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{uri}: missing column(s) {sorted(missing)}")
        labels, names = {}, {}
        for i, r in enumerate(reader, start=2):
            try:
                labels[r["sample_id"]] = int(r["label"])
            except ValueError:
                raise ValueError(f"{uri} line {i}: label {r['label']!r} is not an integer") from None
            if names.setdefault(int(r["label"]), r["label_name"]) != r["label_name"]:
                raise ValueError(f"{uri} line {i}: label {r['label']} named both {names[int(r['label'])]!r} and {r['label_name']!r}")
        if not labels:
            raise ValueError(f"{uri}: no rows")
        from pipelines.corpus.raw_layout import CLASSES

        for i, n in names.items():
            if not 0 <= i < len(CLASSES) or CLASSES[i] != n:
                raise ValueError(f"{uri}: label {i} {n!r} is not the generator's class {i} of {list(CLASSES)}")
        return labels, list(CLASSES)

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, self.kind, self._labels()[1])

    def rows(self) -> list[dict]:
        from pipelines.corpus.raw_layout import list_samples

        storage = Storage()
        labels, _ = self._labels()
        samples = sorted(list_samples(self.root, storage))
        if not samples:
            raise FileNotFoundError(f"no corpus sample under {self.root}")
        unlabelled = [s for s in samples if s not in labels]
        if unlabelled:
            raise ValueError(f"{join(self.root, 'labels.csv')}: no label for sample(s) {unlabelled[:5]}")
        if self.max_samples:
            samples = samples[: self.max_samples]
        split_of_block = assign_splits([geo_block(s, self.split_block) for s in samples], self.fractions, self.seed)
        rows = []
        for s in samples:
            for r0, c0 in chip_offsets(self.chip_size, self.chips_per_tile):
                rows.append({"id": f"{s}@{r0},{c0}", "sample_id": s, "r0": r0, "c0": c0,
                             "split": split_of_block[geo_block(s, self.split_block)],
                             "tile_label": labels[s], "label": None})
        return rows

    def load(self, row: dict):
        from pipelines.corpus.sample import read_sample

        storage = Storage()
        key = (self.root, row["sample_id"], tuple(self.modalities))
        if _TILE_CACHE.get("key") != key:  # chips of one tile usually come one after another
            x, months, _ = read_sample(self.root, row["sample_id"], storage, modalities=list(self.modalities))
            if not x:
                raise FileNotFoundError(f"{self.root}: sample {row['sample_id']} has none of {list(self.modalities)}")
            _TILE_CACHE.update(key=key, value=(x, months, read_label_map(self.root, row["sample_id"], storage)))
        x, months, label_map = _TILE_CACHE["value"]
        r0, c0, s, t = row["r0"], row["c0"], self.chip_size, self.max_timesteps
        chip = {m: np.array(v[r0 : r0 + s, c0 : c0 + s, :t], np.float32) for m, v in x.items()}
        label = label_map[r0 : r0 + s, c0 : c0 + s].copy()
        if self.kind != "segmentation":
            if s == TILE_SIZE:
                label = np.asarray(row["tile_label"], np.int64)
            else:
                counts = np.bincount(label[label >= 0].ravel(), minlength=1)
                label = np.asarray(counts.argmax(), np.int64)
        return chip, np.asarray(months[:t], np.int64), label


_TILE_CACHE: dict = {}  # the last tile read by this process


def read_label_map(root: str, sample_id: str, storage: Storage) -> np.ndarray:
    """The tile's per-pixel class map from `10_labels/` as (256, 256) int64, -1 where unlabelled."""
    from pipelines.corpus import raw_layout as rl
    from pipelines.imagery.geotiff import read_geotiff

    uri = join(root, rl.LABELS_FOLDER, rl.file_name(*rl.parse_sample_id(sample_id), 10))
    if not storage.exists(uri):
        raise FileNotFoundError(f"missing per-pixel label map {uri}")
    arr, profile = read_geotiff(uri, storage)
    label = arr[0].astype(np.int64)
    if profile.get("nodata") is not None:
        label[arr[0] == profile["nodata"]] = -1
    return label
