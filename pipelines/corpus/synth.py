"""A realistic synthetic raw corpus, in exactly the original's raw layout (see pipelines/corpus/raw_layout.py).

    write_corpus(SynthConfig(num_samples=200, seed=0), "s3://raw", Storage())

Each sample is a 2560 m UTM cell. One land-cover map drives every modality so that they agree:
1. a class map (8 classes) from value noise on the cell's absolute coordinates (so neighbouring cells
   continue each other's patches), biased by an elevation field (bare ground high, water low);
2. Sentinel-2 L2A reflectance from per-class spectra with a seasonal vegetation cycle (inverted south of
   the equator), texture, clouds (bright, per-timestep cover) and swath-edge nodata; 20/40 m bandsets
   sample the same fields at their resolution;
3. Sentinel-1 VV/VH backscatter per class (crops follow the season) with speckle, stored as linear power;
4. Landsat L1 DN (TOA reflectance scaled as Collection 2, thermal bands from a temperature field);
5. maps from the same classes: WorldCover codes, SRTM elevation, canopy height (trees tall), CDL
   (only in CONUS UTM zones), WorldCereal crop products, OpenStreetMap features rasterised at 2.5 m.
Missing timesteps and missing modalities occur at rates like the original's. Values are scaled to land
near the published per-band means (olmoearth/data/norm_stats.json).

Labelled variant (`labelled=True`): the cells form one contiguous block of one UTM zone, all observed over
one year from LABELLED_START (an area of interest, as the area-embedding job expects; split by col/row
for a geographic train/test split), plus `labels.csv` (sample_id, label, label_name: the dominant class)
and `10_labels/<name>_10.tif` (uint8 class per 10 m pixel). Deterministic for (seed, num_samples).
The physics of one sample: pipelines/corpus/synth_scene.py.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from olmoearth.modalities import MODALITIES
from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus import synth_scene as sc
from pipelines.imagery.geotiff import geotiff_bytes
from pipelines.imagery.units import RAW_FORMAT


@dataclass
class SynthConfig:
    num_samples: int = 16  # samples (2560 m cells) to write
    seed: int = 0  # seed of everything: places, times, land cover, sensors
    labelled: bool = False  # one contiguous block over one year, plus labels.csv and 10_labels/ maps
    missing_timestep_rate: float = 1.0  # scales how many months the temporal sensors miss
    missing_modality_rate: float = 1.0  # scales how often optional modalities are absent
    cloud_rate: float = 1.0  # scales cloud cover
    ray_tasks: int = 0  # >0: write in that many Ray tasks (needs ray.init); 0: in this process
    timesteps: int = 12  # monthly periods in each sample's window (the original: 12; fewer for quick tests)


@dataclass
class Cell:
    index: int
    epsg: int
    col: int
    row: int
    start: dt.date

    @property
    def sid(self) -> str:
        return rl.sample_id(self.epsg, self.col, self.row)


LABELLED_START = dt.date(2021, 6, 1)


def plan_cells(cfg: SynthConfig) -> list[Cell]:
    """Where and when each sample lies: scattered over UTM zones, or one contiguous block if labelled."""
    rng = np.random.default_rng([cfg.seed, 7])
    cells, seen = [], set()
    width = int(np.ceil(np.sqrt(cfg.num_samples)))
    c0, r0 = int(rng.integers(120, 250)), int(rng.integers(-1900, -1500))
    while len(cells) < cfg.num_samples:
        i = len(cells)
        if cfg.labelled:
            epsg, col, row = 32618, c0 + i % width, r0 + i // width
        else:
            epsg = int(rng.choice(sc.ZONES))
            col = int(rng.integers(70, 320))
            # northern zones: 2.7..6.6 Mm north of the equator; southern: 6.0..7.6 Mm false northing
            row = int(rng.integers(-2580, -1050)) if epsg < 32700 else int(rng.integers(-2960, -2350))
        if (epsg, col, row) in seen:
            continue
        seen.add((epsg, col, row))
        start = dt.date(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 8 * 365)))
        if cfg.labelled:  # one area of interest, one acquisition year, starting in the growing season
            start = LABELLED_START
        cells.append(Cell(i, epsg, col, row, start))
    return cells


def make_sample(cell: Cell, cfg: SynthConfig) -> dict:
    """All files of one sample: {"files": {relative path: bytes}, "periods": {modality: [(idx, start, end)]},
    "label": dominant class}."""
    rng = np.random.default_rng([cfg.seed, cell.index, 1])
    cls, elevation, fields = sc.land_cover(cell, cfg.seed)
    scene = sc.Scene(cell, cfg, rng, cls, elevation, fields)
    has, keep = sc.availability(scene)
    files: dict[str, bytes] = {}
    periods: dict[str, list] = {}

    def put(folder: str, resolution: float, arr: np.ndarray, nodata) -> None:
        name = rl.file_name(cell.epsg, cell.col, cell.row, resolution)
        transform = rl.cell_transform(cell.col, cell.row, resolution)
        files[f"{folder}/{name}"] = geotiff_bytes(arr, cell.epsg, transform, nodata)

    sensors = (("sentinel2_l2a", sc.sentinel2), ("landsat", sc.landsat), ("sentinel1", sc.sentinel1))
    for name, make in sensors:  # the order of their random draws
        if has[name]:
            for res, arr in make(scene, keep[name]).items():
                put(MODALITIES[name].raw_folder, res, arr, RAW_FORMAT[name][1])
            periods[name] = [(i, *scene.period(t)) for i, t in enumerate(keep[name])]
    for name, arr in sc.maps(scene, has).items():
        put(MODALITIES[name].raw_folder, 10, arr, RAW_FORMAT[name][1])
    put(MODALITIES["openstreetmap_raster"].raw_folder, 2.5, sc.osm_raster(cls, fields["fine"][0], rng), None)
    if cfg.labelled:
        put(rl.LABELS_FOLDER, 10, cls[None], None)
    counts = np.bincount(cls.ravel(), minlength=len(rl.CLASSES))
    return {"files": files, "periods": periods, "label": int(counts.argmax())}


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_cells(cells: list[Cell], cfg: SynthConfig, out_uri: str, storage: Storage | None = None,
                progress=True) -> list:  # fmt: skip
    """Generate and upload the given cells -> [(sid, periods, label, bytes)]."""
    storage = storage or Storage()
    out = []
    for cell in tqdm(cells, desc="synth", unit="sample", disable=not progress):
        s = make_sample(cell, cfg)
        for rel, data in s["files"].items():
            storage.write_bytes(join(out_uri, rel), data)
        out.append((cell.sid, s["periods"], s["label"], sum(len(b) for b in s["files"].values())))
    return out


def write_corpus(cfg: SynthConfig, out_uri: str, storage: Storage) -> dict:
    """Write cfg.num_samples samples (GeoTIFFs, timestep CSVs, labels if labelled) under out_uri.
    Returns a summary {"samples", "bytes", "sample_ids"}."""
    if cfg.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {cfg.num_samples}")
    storage.makedirs(out_uri)
    cells = plan_cells(cfg)
    if cfg.ray_tasks > 0:
        import ray

        task = ray.remote(write_cells)
        chunks = [cells[i :: cfg.ray_tasks] for i in range(cfg.ray_tasks) if cells[i :: cfg.ray_tasks]]
        refs = [task.remote(c, cfg, out_uri, None, False) for c in chunks]
        results = []
        for r in tqdm(refs, desc="synth tasks", disable=None):
            results += ray.get(r)
        order = {c.sid: c.index for c in cells}
        results.sort(key=lambda r: order[r[0]])
    else:
        results = write_cells(cells, cfg, out_uri, storage, progress=None)
    for name, mod in MODALITIES.items():
        if mod.temporal:
            rows = [(sid, i, s, e) for sid, periods, _, _ in results for i, s, e in periods.get(name, [])]
            storage.write_text(rl.csv_uri(out_uri, name), rl.write_timesteps_csv(rows))
    if cfg.labelled:
        lines = ["sample_id,label,label_name"] + [
            f"{sid},{lab},{rl.CLASSES[lab]}" for sid, _, lab, _ in results
        ]
        storage.write_text(join(out_uri, "labels.csv"), "\n".join(lines) + "\n")
    return {
        "samples": len(results),
        "bytes": int(sum(r[3] for r in results)),
        "sample_ids": [r[0] for r in results],
    }
