"""The physics of one synthetic sample (pipelines/corpus/synth.py): one land-cover map, and every modality
derived from it so that they agree.

`Scene` holds a sample's shared state (class map, elevation, texture, the months, its random stream); each
part below draws from the scene's random stream in a fixed order (the order in which `make_sample` calls
them), which is what keeps a sample deterministic for its (seed, index).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np

from olmoearth.modalities import MODALITIES, OSM_FEATURES, TILE_SIZE
from pipelines.corpus import raw_layout as rl
from pipelines.imagery.units import repeat_pixels

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


def land_cover(cell, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> (class map uint8 (256, 256), elevation float32 (256, 256) metres, noise fields)."""
    x0, y0 = cell.col * TILE_SIZE, cell.row * TILE_SIZE
    key = (seed, cell.epsg)
    elev01 = 0.7 * value_noise(key + (1,), x0, y0, 600)[0] + 0.3 * value_noise(key + (2,), x0, y0, 90)[0]
    k = len(rl.CLASSES)
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


# ----------------------------------------------------------------------------------------------------------
# One sample's scene


@dataclass
class Scene:
    """What every modality of one sample is derived from."""

    cell: object  # the synth.Cell: where and when
    cfg: object  # the SynthConfig
    rng: np.random.Generator  # the sample's random stream, drawn in make_sample's order
    cls: np.ndarray  # class map uint8 (256, 256), index into rl.CLASSES
    elevation: np.ndarray  # float32 (256, 256) metres
    fields: dict  # noise fields of land_cover: "fine" (2, 256, 256), "elev01" (256, 256)
    tex: np.ndarray = field(init=False)  # float32 (256, 256) texture, a little spatial correlation
    months: list[int] = field(init=False)  # month 0..11 of each of the cfg.timesteps slots

    def __post_init__(self):
        nt = max(1, min(12, self.cfg.timesteps))
        self.months = rl.period_months(self.cell.start, nt)
        tex = self.rng.standard_normal((TILE_SIZE, TILE_SIZE), dtype=np.float32)
        self.tex = 0.5 * (tex + np.roll(tex, 1, axis=1))

    @property
    def southern(self) -> bool:
        return self.cell.epsg >= 32700

    def at(self, a: np.ndarray, res: int) -> np.ndarray:
        """A 10 m field sampled at 10, 20 or 40 m."""
        f = res // 10
        return a[::f, ::f]

    def period(self, t: int) -> tuple[dt.date, dt.date]:
        s = self.cell.start + dt.timedelta(days=rl.PERIOD_DAYS * int(t))
        return s, s + dt.timedelta(days=rl.PERIOD_DAYS)


def availability(sc: Scene) -> tuple[dict[str, bool], dict[str, np.ndarray]]:
    """Which modalities the sample has, and which month slots each temporal sensor keeps."""
    rng, mm, nt = sc.rng, sc.cfg.missing_modality_rate, len(sc.months)
    has = {name: True for name in MODALITIES}
    has["landsat"] = rng.random() > 0.15 * mm
    has["sentinel1"] = rng.random() > 0.1 * mm
    has["sentinel2_l2a"] = rng.random() > 0.04 * mm or not has["sentinel1"]
    has["worldcereal"] = rng.random() > 0.25 * mm
    has["wri_canopy_height_map"] = rng.random() > 0.05 * mm
    has["cdl"] = sc.cell.epsg in CONUS_ZONES
    keep = {}
    for name, n_max in (("sentinel2_l2a", 4), ("sentinel1", 2), ("landsat", 8)):
        drop = min(nt - 1, _drop_months(rng, n_max, sc.cfg.missing_timestep_rate))
        keep[name] = np.sort(rng.choice(nt, nt - drop, replace=False))
    # the timeline must start at slot 0 for at least one sensor (the reader counts from the earliest image)
    first = [k for k in ("sentinel2_l2a", "sentinel1", "landsat") if has[k]][0]
    keep[first] = np.union1d(keep[first], [0])
    return has, keep


# ----------------------------------------------------------------------------------------------------------
# Optical reflectance, clouds, swath gaps


def surface(sc: Scene, t: int, res: int, bands=slice(None)) -> np.ndarray:
    """Surface reflectance x 10000 of month slot t at 10, 20 or 40 m, no clouds: (n/f, n/f, C of `bands`)."""
    v = _season(sc.months[t], sc.southern)
    table = S2_SPECTRA * (1 + SEASON_AMPLITUDE[:, None] * (v - 1) * SEASON_BAND[None, :])
    table = np.maximum(table, 30).astype(np.float32)[:, bands]
    return table[sc.at(sc.cls, res)] * (1 + 0.08 * sc.at(sc.tex, res))[..., None]


def clouds(sc: Scene, t: int, salt: int) -> np.ndarray:
    """Cloud opacity 0..1 (256, 256) of slot t."""
    n = TILE_SIZE
    cover = sc.rng.choice([0.0, 0.0, 0.0, 0.1, 0.3, 0.6, 1.0]) * sc.cfg.cloud_rate
    if cover <= 0:
        return np.zeros((n, n), np.float32)
    f = value_noise((sc.cfg.seed, sc.cell.index, salt, int(t)), 0, 0, 40)[0]
    thr = np.quantile(f[::8, ::8], 1 - min(cover, 1.0)) if cover < 1 else -1.0
    return np.clip((f - thr) * 8, 0, 1).astype(np.float32)


def swath_gap(sc: Scene) -> np.ndarray | None:
    """A nodata wedge at the edge of an orbit swath (10% of acquisitions)."""
    n, rng = TILE_SIZE, sc.rng
    if rng.random() > 0.1:
        return None
    edge = rng.integers(40, 216)
    yy, xx = np.mgrid[0:n, 0:n]
    return xx > edge + (yy - n // 2) * rng.uniform(-0.3, 0.3)


def cloudy(sc: Scene, refl: np.ndarray, cl: np.ndarray, bright: float, gap) -> np.ndarray:
    """Blend clouds (opacity cl at 10 m) into refl (h, w, C) at its own resolution, cut the swath gap."""
    f = TILE_SIZE // refl.shape[0]
    c = cl[::f, ::f, None]
    out = refl * (1 - c) + c * (bright * (1 + 0.15 * sc.at(sc.tex, 10 * f)[..., None]))
    out = np.clip(out, 1, 65535)
    if gap is not None:
        out[gap[::f, ::f]] = 0
    return out


def sentinel2(sc: Scene, keep: np.ndarray) -> dict[int, np.ndarray]:
    """Sentinel-2 L2A: uint16, nodata 0 -> {resolution: (T*C, h, w) time-major} for the 10, 20, 40 m bandsets."""
    stacks = {10: [], 20: [], 40: []}
    for t in keep:
        cl, gap = clouds(sc, t, 11), swath_gap(sc)
        stacks[10].append(cloudy(sc, surface(sc, t, 10, slice(0, 4)), cl, 6500, gap))
        stacks[20].append(cloudy(sc, surface(sc, t, 20, slice(4, 10)), cl, 6500, gap))
        stacks[40].append(cloudy(sc, surface(sc, t, 40, slice(10, 12)), cl, 6500, gap))
    out = {}
    for res, st in stacks.items():
        arr = np.stack(st).astype(np.uint16).transpose(0, 3, 1, 2)  # (T, C, h, w) time-major
        out[res] = arr.reshape(-1, *arr.shape[2:])
    return out


def landsat(sc: Scene, keep: np.ndarray) -> dict[int, np.ndarray]:
    """Landsat 8/9 L1: uint16 DN, nodata 0 -> {10: [B8] per timestep, 20: [B1..B7, B9, B10, B11] per timestep}."""
    pan, ms = [], []
    cls20 = sc.at(sc.cls, 20)
    elev20, water20, tree20 = sc.fields["elev01"][::2, ::2], cls20 == 6, cls20 == 0
    for t in keep:
        s = surface(sc, t, 20) / 10000.0  # S2-like reflectance at 20 m
        toa = np.stack([s[..., 10] + 0.03, s[..., 0] + 0.04, s[..., 1] + 0.03, s[..., 2] + 0.02, s[..., 3],
                        s[..., 8], s[..., 9], np.full_like(s[..., 0], 0.004)], axis=-1)  # B1..B7, B9  # fmt: skip
        temp_k = (300 - 12 * elev20 - 6 * tree20 - 8 * water20
                  + 8 * (_season(sc.months[t], sc.southern) - 0.5)).astype(np.float32)  # fmt: skip
        th = 20000 + (temp_k - 290) * 400
        cl, gap = clouds(sc, t, 23), swath_gap(sc)
        dn = np.concatenate([(toa + 0.1) / 2e-5, th[..., None], (th - 1500)[..., None]], -1)
        cl20 = cl[::2, ::2, None]
        dn[..., :8] = dn[..., :8] * (1 - cl20) + cl20 * 42000
        dn[..., 8:] -= cl20 * 14000  # cold cloud tops
        dn = np.clip(dn, 1, 65535)
        if gap is not None:
            dn[gap[::2, ::2]] = 0
        s10 = surface(sc, t, 10, slice(1, 3)) / 10000.0
        b8 = (s10.mean(-1) + 0.13) / 2e-5
        pan.append(cloudy(sc, b8[..., None], cl, 42000, gap).transpose(2, 0, 1))
        ms.append(dn.transpose(2, 0, 1))
    return {10: np.concatenate(pan).astype(np.uint16), 20: np.concatenate(ms).astype(np.uint16)}


# ----------------------------------------------------------------------------------------------------------
# SAR backscatter


def sentinel1(sc: Scene, keep: np.ndarray) -> dict[int, np.ndarray]:
    """Sentinel-1 VV/VH: float32 linear power, nodata -32768 -> {10: (T*2, 256, 256) time-major}."""
    st = []
    for t in keep:
        v = _season(sc.months[t], sc.southern)
        db = S1_DB[sc.cls].copy()  # (256, 256, 2)
        db[sc.cls == 3] += 3.0 * (v - 0.5)  # crops brighten as they grow
        speckle = np.roll(sc.tex, int(t) * 37, axis=0)[..., None] * np.array([1.0, 1.2], np.float32)
        lin = np.exp((db + 1.8 * speckle) * np.float32(np.log(10) / 10))  # dB -> linear power, float32
        gap = swath_gap(sc)
        if gap is not None:
            lin[gap] = -32768.0
        st.append(lin.transpose(2, 0, 1))
    return {10: np.concatenate(st).astype(np.float32)}


# ----------------------------------------------------------------------------------------------------------
# Maps


def maps(sc: Scene, has: dict[str, bool]) -> dict[str, np.ndarray]:
    """The static maps the sample has, at 10 m, from its classes: {modality: (C, 256, 256) raw dtype}."""
    cls, (fine0, fine1) = sc.cls, sc.fields["fine"]
    out = {"worldcover": WORLDCOVER_CODE[cls][None], "srtm": np.round(sc.elevation).astype(np.int16)[None]}
    if has["wri_canopy_height_map"]:
        h = np.where(
            cls == 0, 8 + 22 * fine0, np.where(cls == 1, 1 + 2 * fine0, np.where(cls == 7, 3 * fine0, 0))
        )
        out["wri_canopy_height_map"] = np.round(h).astype(np.uint8)[None]
    crop_type = np.select([fine1 < 0.4, fine1 < 0.75], [0, 1], 2)  # corn, soy, wheat
    if has["cdl"]:
        cdl = CDL_CODES[cls].copy()
        cdl[cls == 3] = np.array([1, 5, 24], np.uint8)[crop_type[cls == 3]]
        out["cdl"] = cdl[None]
    if has["worldcereal"]:
        out["worldcereal"] = _worldcereal(cls == 3, crop_type, fine0)
    return out


def _worldcereal(crop: np.ndarray, crop_type: np.ndarray, fine0: np.ndarray) -> np.ndarray:
    """WorldCereal's 8 crop products (0 or 100 per pixel), uint8 (8, 256, 256)."""
    wc = np.zeros((8, *crop.shape), np.uint8)
    wc[0] = 100 * crop
    wc[2] = 100 * (crop & (crop_type == 0))
    wc[1] = 100 * (crop & (crop_type == 0) & (fine0 > 0.7))
    wc[5] = 100 * (crop & (crop_type == 2) & (fine0 < 0.3))
    wc[7] = 100 * (crop & (crop_type == 2) & (fine0 >= 0.3))
    wc[6] = 100 * (crop & (crop_type == 2) & (fine0 > 0.85))
    return wc


def osm_raster(cls: np.ndarray, fine: np.ndarray, rng) -> np.ndarray:
    """30 binary OSM feature channels at 2.5 m (1024 x 1024), uint8, consistent with the class map."""
    m = 4 * TILE_SIZE
    out = np.zeros((len(OSM_FEATURES), m, m), np.uint8)
    idx = {f: i for i, f in enumerate(OSM_FEATURES)}
    up = lambda a: repeat_pixels(a, 4)  # noqa: E731
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
