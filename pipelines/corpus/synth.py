"""A realistic synthetic raw corpus, in exactly the original's raw layout (see pipelines/corpus/raw_layout.py).

    write_corpus(SynthConfig(num_samples=200, seed=0), "s3://raw", Storage(endpoint))

Each sample is a 2560 m UTM cell. One land-cover map drives every modality so that they agree:
1. a class map (8 classes) from value noise on the cell's absolute coordinates (so neighbouring cells
   continue each other's patches), biased by an elevation field (bare ground high, water low);
2. Sentinel-2 L2A reflectance from per-class spectra with a seasonal vegetation cycle (inverted south of
   the equator), texture, clouds (bright, per-timestep cover) and swath-edge nodata; 20/40 m bandsets are
   block means of the 10 m field;
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
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from olmoearth.modalities import MODALITIES, OSM_FEATURES, TILE_SIZE
from pipelines.common.storage import Storage, is_s3, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.raster import geotiff_bytes

CLASSES = ("tree_cover", "shrubland", "grassland", "cropland", "built_up", "bare", "water", "wetland")
WORLDCOVER_CODE = np.array([10, 20, 30, 40, 50, 60, 80, 90], np.uint8)
CONUS_ZONES = tuple(range(32610, 32620))
ZONES = CONUS_ZONES + (32630, 32631, 32632, 32633, 32634, 32635, 32643, 32644, 32650, 32721, 32735, 32756)

# Sentinel-2 L2A surface reflectance x 10000 at the growing-season peak, bands in registry order
# B02 B03 B04 B08 | B05 B06 B07 B8A B11 B12 | B01 B09
S2_SPECTRA = np.array([
    [300, 500, 300, 3000, 700, 2000, 2700, 3000, 1500, 700, 250, 2900],      # tree cover
    [500, 750, 800, 2200, 1100, 1700, 2000, 2300, 2200, 1400, 450, 2100],    # shrubland
    [450, 800, 700, 2800, 1100, 2200, 2600, 2900, 2300, 1400, 400, 2500],    # grassland
    [500, 900, 700, 3500, 1200, 2600, 3200, 3500, 2200, 1200, 450, 3000],    # cropland
    [1100, 1200, 1300, 2000, 1400, 1800, 1950, 2050, 2400, 2100, 1000, 1700],  # built-up
    [1500, 1900, 2300, 2800, 2500, 2700, 2800, 2900, 3500, 3000, 1300, 2400],  # bare
    [500, 600, 400, 200, 350, 250, 220, 200, 100, 80, 600, 150],             # water
    [400, 600, 500, 1500, 700, 1100, 1300, 1400, 900, 500, 400, 1200],       # wetland
], np.float32)  # fmt: skip
SEASON_AMPLITUDE = np.array([0.25, 0.2, 0.45, 0.75, 0.0, 0.0, 0.0, 0.3], np.float32)
# how a band moves when vegetation senesces: NIR/red-edge drop (+1), visible/SWIR rise (-0.6)
SEASON_BAND = np.array([-0.6, -0.4, -0.6, 1, -0.2, 0.6, 1, 1, -0.6, -0.6, -0.3, 1], np.float32)
# Sentinel-1 backscatter (dB) VV, VH
S1_DB = np.array([[-7.5, -13.5], [-10, -16.5], [-11, -18], [-10, -17], [-3, -10], [-14, -22], [-20, -27],
                  [-9, -16]], np.float32)  # fmt: skip
CDL_CODES = np.array(
    [141, 152, 176, 1, 121, 131, 111, 195], np.uint8
)  # crops refined below (1 corn, 5 soy, 24 wheat)


@dataclass
class SynthConfig:
    num_samples: int = 16
    seed: int = 0
    labelled: bool = False
    missing_timestep_rate: float = 1.0  # scales how many months the temporal sensors miss
    missing_modality_rate: float = 1.0  # scales how often optional modalities are absent
    cloud_rate: float = 1.0  # scales cloud cover
    ray_tasks: int = 0  # >0: write in that many Ray tasks (needs ray.init); 0: in this process
    timesteps: int = 12  # monthly periods in each sample's window (the original: 12; fewer for quick tests)


# ----------------------------------------------------------------------------------------------------------
# Noise on absolute coordinates


def _hash(*keys) -> np.ndarray:
    """A vectorised 64-bit integer hash (splitmix64 steps) of broadcastable integer arrays -> [0, 1)."""
    h = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for k in keys:
            h = (h ^ np.asarray(k).astype(np.int64).astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(29))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def value_noise(
    key: tuple, x0: int, y0: int, spacing: int, channels: int = 1, n: int = TILE_SIZE
) -> np.ndarray:
    """Bilinear value noise in [0, 1), (channels, n, n), for pixels [x0, x0+n) x [y0, y0+n) of a global grid
    (x east, y south, in 10 m pixels), lattice every `spacing` pixels: equal where cells overlap."""
    gx = (x0 + np.arange(n)) / spacing
    gy = (y0 + np.arange(n)) / spacing
    ix0, iy0 = int(np.floor(gx[0])), int(np.floor(gy[0]))
    nx, ny = int(np.floor(gx[-1])) - ix0 + 2, int(np.floor(gy[-1])) - iy0 + 2
    c = np.arange(channels)[:, None, None]
    lat = _hash(*key, c, (iy0 + np.arange(ny))[None, :, None], (ix0 + np.arange(nx))[None, None, :])
    lat = lat.astype(np.float32)  # (channels, ny, nx)
    fx, fy = gx - ix0, gy - iy0
    jx, jy = np.floor(fx).astype(int), np.floor(fy).astype(int)
    tx, ty = (fx - jx).astype(np.float32), (fy - jy).astype(np.float32)
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)  # smoothstep
    a = lat[:, jy][:, :, jx] * (1 - tx) + lat[:, jy][:, :, jx + 1] * tx  # (channels, n, n)
    b = lat[:, jy + 1][:, :, jx] * (1 - tx) + lat[:, jy + 1][:, :, jx + 1] * tx
    return a * (1 - ty[:, None]) + b * ty[:, None]


def _upsample(small: np.ndarray, n: int = TILE_SIZE) -> np.ndarray:
    """(..., k, k) -> (..., n, n) bilinear-ish via repeat then a 2-tap smoothing (cheap, local fields)."""
    f = n // small.shape[-1]
    out = np.repeat(np.repeat(small, f, axis=-2), f, axis=-1)
    return 0.5 * (out + np.roll(out, f // 2, axis=-1))


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """(H, W, ...) -> (H/f, W/f, ...)."""
    h, w = a.shape[:2]
    return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3))


# ----------------------------------------------------------------------------------------------------------
# One sample


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
            epsg = int(rng.choice(ZONES))
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


def land_cover(cell: Cell, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> (class map uint8 (256, 256), elevation float32 (256, 256) metres, noise fields)."""
    x0, y0 = cell.col * TILE_SIZE, cell.row * TILE_SIZE
    key = (seed, cell.epsg)
    elev01 = 0.7 * value_noise(key + (1,), x0, y0, 600)[0] + 0.3 * value_noise(key + (2,), x0, y0, 90)[0]
    k = len(CLASSES)
    logits = (
        2.2 * value_noise(key + (3,), x0, y0, 400, k)
        + 1.0 * value_noise(key + (4,), x0, y0, 48, k)
        + 0.35 * value_noise(key + (5,), x0, y0, 10, k)
    )
    bias = np.array([0.2, 0.0, 0.1, 0.3, -0.3, -0.4, -0.5, -0.6], np.float32)[:, None, None]
    logits += bias
    logits[5] += 2.0 * (elev01 - 0.6)  # bare ground on heights
    logits[6] -= 2.5 * (elev01 - 0.3)  # water in lowlands
    logits[7] -= 2.0 * (elev01 - 0.35)
    cls = logits.argmax(axis=0).astype(np.uint8)
    elevation = (elev01 * 2400.0 - 150.0).astype(np.float32)
    fine = value_noise(key + (6,), x0, y0, 6, 2)  # parcels / textures
    return cls, elevation, {"fine": fine, "elev01": elev01}


def _season(month: int, southern: bool) -> float:
    """Vegetation vigour 0..1, peak in July (January south of the equator)."""
    peak = 0.5 if southern else 6.5
    return float(0.5 + 0.5 * np.cos(2 * np.pi * (month - peak) / 12))


def _drop_months(rng, n_max: int, rate: float) -> int:
    return int(min(11, rng.binomial(n_max, min(1.0, 0.3 * rate))))


def make_sample(cell: Cell, cfg: SynthConfig) -> dict:
    """All files of one sample: {"files": {relative path: bytes}, "periods": {modality: [(idx, start, end)]},
    "label": dominant class}."""
    rng = np.random.default_rng([cfg.seed, cell.index, 1])
    n = TILE_SIZE
    cls, elevation, fields = land_cover(cell, cfg.seed)
    southern = cell.epsg >= 32700
    nt = max(1, min(12, cfg.timesteps))
    months_all = [(cell.start + dt.timedelta(days=30 * t + 15)).month - 1 for t in range(nt)]
    tex = rng.standard_normal((n, n), dtype=np.float32)
    tex = 0.5 * (tex + np.roll(tex, 1, axis=1))  # a little spatial correlation

    # which modalities and timesteps exist
    mm = cfg.missing_modality_rate
    has = {name: True for name in MODALITIES}
    has["landsat"] = rng.random() > 0.15 * mm
    has["sentinel1"] = rng.random() > 0.1 * mm
    has["sentinel2_l2a"] = rng.random() > 0.04 * mm or not has["sentinel1"]
    has["worldcereal"] = rng.random() > 0.25 * mm
    has["wri_canopy_height_map"] = rng.random() > 0.05 * mm
    has["cdl"] = cell.epsg in CONUS_ZONES
    keep = {}
    for name, n_max in (("sentinel2_l2a", 4), ("sentinel1", 2), ("landsat", 8)):
        drop = min(nt - 1, _drop_months(rng, n_max, cfg.missing_timestep_rate))
        keep[name] = np.sort(rng.choice(nt, nt - drop, replace=False))
    # the timeline must start at slot 0 for at least one sensor (the reader counts from the earliest image)
    first = [k for k in ("sentinel2_l2a", "sentinel1", "landsat") if has[k]][0]
    keep[first] = np.union1d(keep[first], [0])

    files: dict[str, bytes] = {}
    periods: dict[str, list] = {}

    def put(modality_or_folder: str, resolution: float, arr: np.ndarray, nodata):
        folder = (
            MODALITIES[modality_or_folder].raw_folder
            if modality_or_folder in MODALITIES
            else modality_or_folder
        )
        name = rl.file_name(cell.epsg, cell.col, cell.row, resolution)
        transform = rl.cell_transform(cell.col, cell.row, resolution)
        files[f"{folder}/{name}"] = geotiff_bytes(arr, cell.epsg, transform, nodata)

    def period(t: int):
        s = cell.start + dt.timedelta(days=30 * int(t))
        return s, s + dt.timedelta(days=30)

    # surface reflectance x 10000 of month slot t at 10, 20 or 40 m, no clouds: (n/f, n/f, C of `bands`)
    cls_at = {10: cls, 20: cls[::2, ::2], 40: cls[::4, ::4]}
    tex_at = {10: tex, 20: tex[::2, ::2], 40: tex[::4, ::4]}

    def surface(t: int, res: int, bands=slice(None)) -> np.ndarray:
        v = _season(months_all[t], southern)
        table = S2_SPECTRA * (1 + SEASON_AMPLITUDE[:, None] * (v - 1) * SEASON_BAND[None, :])
        table = np.maximum(table, 30).astype(np.float32)[:, bands]
        return table[cls_at[res]] * (1 + 0.08 * tex_at[res])[..., None]

    def clouds(t: int, salt: int) -> np.ndarray:
        """Cloud opacity 0..1 (256, 256) of slot t."""
        cover = rng.choice([0.0, 0.0, 0.0, 0.1, 0.3, 0.6, 1.0]) * cfg.cloud_rate
        if cover <= 0:
            return np.zeros((n, n), np.float32)
        f = value_noise((cfg.seed, cell.index, salt, int(t)), 0, 0, 40)[0]
        thr = np.quantile(f[::8, ::8], 1 - min(cover, 1.0)) if cover < 1 else -1.0
        return np.clip((f - thr) * 8, 0, 1).astype(np.float32)

    def swath_gap() -> np.ndarray | None:
        """A nodata wedge at the edge of an orbit swath (10% of acquisitions)."""
        if rng.random() > 0.1:
            return None
        edge = rng.integers(40, 216)
        yy, xx = np.mgrid[0:n, 0:n]
        return xx > edge + (yy - n // 2) * rng.uniform(-0.3, 0.3)

    def cloudy(refl: np.ndarray, cl: np.ndarray, bright: float, gap) -> np.ndarray:
        """Blend clouds (opacity cl at 10 m) into refl (h, w, C) at its own resolution, cut the swath gap."""
        f = n // refl.shape[0]
        c = cl[::f, ::f, None]
        out = refl * (1 - c) + c * (bright * (1 + 0.15 * tex_at[{1: 10, 2: 20, 4: 40}[f]][..., None]))
        out = np.clip(out, 1, 65535)
        if gap is not None:
            out[gap[::f, ::f]] = 0
        return out

    # --- Sentinel-2 L2A: uint16, nodata 0, three bandsets (10, 20, 40 m)
    if has["sentinel2_l2a"]:
        stacks = {10: [], 20: [], 40: []}
        for t in keep["sentinel2_l2a"]:
            cl, gap = clouds(t, 11), swath_gap()
            stacks[10].append(cloudy(surface(t, 10, slice(0, 4)), cl, 6500, gap))
            stacks[20].append(cloudy(surface(t, 20, slice(4, 10)), cl, 6500, gap))
            stacks[40].append(cloudy(surface(t, 40, slice(10, 12)), cl, 6500, gap))
        for res, st in stacks.items():
            arr = np.stack(st).astype(np.uint16).transpose(0, 3, 1, 2)  # (T, C, h, w) time-major
            put("sentinel2_l2a", res, arr.reshape(-1, *arr.shape[2:]), 0)
        periods["sentinel2_l2a"] = [(i, *period(t)) for i, t in enumerate(keep["sentinel2_l2a"])]

    # --- Landsat 8/9 L1: uint16 DN, nodata 0; [B8] at 10 m, [B1..B7, B9, B10, B11] at 20 m
    if has["landsat"]:
        pan, ms = [], []
        elev20, water20, tree20 = fields["elev01"][::2, ::2], cls_at[20] == 6, cls_at[20] == 0
        for t in keep["landsat"]:
            s = surface(t, 20) / 10000.0  # S2-like reflectance at 20 m
            toa = np.stack(
                [
                    s[..., 10] + 0.03,
                    s[..., 0] + 0.04,
                    s[..., 1] + 0.03,
                    s[..., 2] + 0.02,
                    s[..., 3],
                    s[..., 8],
                    s[..., 9],
                    np.full_like(s[..., 0], 0.004),
                ],
                axis=-1,
            )  # B1..B7, B9
            temp_k = (300 - 12 * elev20 - 6 * tree20 - 8 * water20
                      + 8 * (_season(months_all[t], southern) - 0.5)).astype(np.float32)  # fmt: skip
            th = 20000 + (temp_k - 290) * 400
            cl, gap = clouds(t, 23), swath_gap()
            dn = np.concatenate([(toa + 0.1) / 2e-5, th[..., None], (th - 1500)[..., None]], -1)
            cl20 = cl[::2, ::2, None]
            dn[..., :8] = dn[..., :8] * (1 - cl20) + cl20 * 42000
            dn[..., 8:] -= cl20 * 14000  # cold cloud tops
            dn = np.clip(dn, 1, 65535)
            if gap is not None:
                dn[gap[::2, ::2]] = 0
            s10 = surface(t, 10, slice(1, 3)) / 10000.0
            b8 = (s10.mean(-1) + 0.13) / 2e-5
            pan.append(cloudy(b8[..., None], cl, 42000, gap).transpose(2, 0, 1))
            ms.append(dn.transpose(2, 0, 1))
        put("landsat", 10, np.concatenate(pan).astype(np.uint16), 0)
        put("landsat", 20, np.concatenate(ms).astype(np.uint16), 0)
        periods["landsat"] = [(i, *period(t)) for i, t in enumerate(keep["landsat"])]

    # --- Sentinel-1: float32 linear power, nodata -32768
    if has["sentinel1"]:
        st = []
        for t in keep["sentinel1"]:
            v = _season(months_all[t], southern)
            db = S1_DB[cls].copy()  # (256, 256, 2)
            db[cls == 3] += 3.0 * (v - 0.5)  # crops brighten as they grow
            speckle = np.roll(tex, int(t) * 37, axis=0)[..., None] * np.array([1.0, 1.2], np.float32)
            lin = np.exp((db + 1.8 * speckle) * np.float32(np.log(10) / 10))  # dB -> linear power, float32
            gap = swath_gap()
            if gap is not None:
                lin[gap] = -32768.0
            st.append(lin.transpose(2, 0, 1))
        put("sentinel1", 10, np.concatenate(st).astype(np.float32), -32768.0)
        periods["sentinel1"] = [(i, *period(t)) for i, t in enumerate(keep["sentinel1"])]

    # --- maps
    fine0, fine1 = fields["fine"]
    put("worldcover", 10, WORLDCOVER_CODE[cls][None], 0)
    put("srtm", 10, np.round(elevation).astype(np.int16)[None], -32768)
    if has["wri_canopy_height_map"]:
        h = np.where(
            cls == 0, 8 + 22 * fine0, np.where(cls == 1, 1 + 2 * fine0, np.where(cls == 7, 3 * fine0, 0))
        )
        put("wri_canopy_height_map", 10, np.round(h).astype(np.uint8)[None], 255)
    crop_type = np.select([fine1 < 0.4, fine1 < 0.75], [0, 1], 2)  # corn, soy, wheat
    if has["cdl"]:
        cdl = CDL_CODES[cls].copy()
        cdl[cls == 3] = np.array([1, 5, 24], np.uint8)[crop_type[cls == 3]]
        put("cdl", 10, cdl[None], 0)
    if has["worldcereal"]:
        crop = cls == 3
        wc = np.zeros((8, n, n), np.uint8)
        wc[0] = 100 * crop
        wc[2] = 100 * (crop & (crop_type == 0))
        wc[1] = 100 * (crop & (crop_type == 0) & (fine0 > 0.7))
        wc[5] = 100 * (crop & (crop_type == 2) & (fine0 < 0.3))
        wc[7] = 100 * (crop & (crop_type == 2) & (fine0 >= 0.3))
        wc[6] = 100 * (crop & (crop_type == 2) & (fine0 > 0.85))
        put("worldcereal", 10, wc, 255)
    put("openstreetmap_raster", 2.5, osm_raster(cls, fine0, rng), None)

    label_map = cls
    if cfg.labelled:
        put(rl.LABELS_FOLDER, 10, label_map[None], None)
    counts = np.bincount(cls.ravel(), minlength=len(CLASSES))
    return {"files": files, "periods": periods, "label": int(counts.argmax())}


def osm_raster(cls: np.ndarray, fine: np.ndarray, rng) -> np.ndarray:
    """30 binary OSM feature channels at 2.5 m (1024 x 1024), uint8, consistent with the class map."""
    m = 4 * TILE_SIZE
    out = np.zeros((len(OSM_FEATURES), m, m), np.uint8)
    idx = {f: i for i, f in enumerate(OSM_FEATURES)}
    up = lambda a: np.repeat(np.repeat(a, 4, axis=0), 4, axis=1)  # noqa: E731
    built = up(cls == 4)
    yy, xx = np.arange(m, dtype=np.float32)[:, None], np.arange(m, dtype=np.float32)[None, :]
    lots = ((xx // 6) % 3 != 0) & (
        (yy // 6) % 3 != 0
    )  # (m, m) by broadcasting  # building footprints inside blocks
    out[idx["building"]] = built & lots & up(fine > 0.3)
    out[idx["parking"]] = built & ~lots & up(fine < 0.2)
    out[idx["leisure"]] = up((cls == 2) & (fine > 0.85))
    out[idx["river"]] = up(cls == 6) & up(fine > 0.5)
    out[idx["works"]] = built & up(fine > 0.9)
    roads = np.zeros((m, m), bool)
    for _ in range(int(rng.integers(1, 4)) + 2 * int((cls == 4).mean() > 0.1)):
        angle, off = rng.uniform(0, np.pi), rng.uniform(-m / 3, m / 3)
        d = (xx - m / 2) * np.float32(np.sin(angle)) - (
            (yy - m / 2) * np.float32(np.cos(angle)) + np.float32(off)
        )
        roads |= np.abs(d) < 2.0
    out[idx["highway"]] = roads
    if rng.random() < 0.3:  # a power line with towers every 120 m
        y = int(rng.integers(0, m))
        out[idx["power_tower"], y, ::48] = 1
    return out


# ----------------------------------------------------------------------------------------------------------
# Writing


def _writer(out_uri: str, storage: Storage):
    if is_s3(out_uri):
        fs = storage.fs(out_uri)
        return lambda uri, data: fs.pipe_file(uri, data)

    def write(uri, data):
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        with open(uri, "wb") as fh:
            fh.write(data)

    return write


def write_cells(cells: list[Cell], cfg: SynthConfig, out_uri: str, storage: Storage, progress=True) -> list:
    """Generate and upload the given cells -> [(sid, periods, label, bytes)]."""
    write = _writer(out_uri, storage)
    out = []
    for cell in tqdm(cells, desc="synth", unit="sample", disable=not progress):
        s = make_sample(cell, cfg)
        for rel, data in s["files"].items():
            write(join(out_uri, rel), data)
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
        refs = [task.remote(c, cfg, out_uri, storage, False) for c in chunks]
        results = []
        for r in tqdm(refs, desc="synth tasks", disable=None):
            results += ray.get(r)
        order = {c.sid: c.index for c in cells}
        results.sort(key=lambda r: order[r[0]])
    else:
        results = write_cells(cells, cfg, out_uri, storage, progress=None)
    write = _writer(out_uri, storage)
    for name, mod in MODALITIES.items():
        if mod.temporal:
            rows = [(sid, i, s, e) for sid, periods, _, _ in results for i, s, e in periods.get(name, [])]
            write(rl.csv_uri(out_uri, name), rl.write_timesteps_csv(rows).encode())
    if cfg.labelled:
        lines = ["sample_id,label,label_name"] + [f"{sid},{lab},{CLASSES[lab]}" for sid, _, lab, _ in results]
        write(join(out_uri, "labels.csv"), ("\n".join(lines) + "\n").encode())
    return {
        "samples": len(results),
        "bytes": int(sum(r[3] for r in results)),
        "sample_ids": [r[0] for r in results],
    }
