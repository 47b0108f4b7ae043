"""The modality registry: every pretraining modality of OlmoEarth v1, its bandsets and how it is normalised.

A *bandset* is a group of bands of one modality stored at one resolution; the model makes one token per
(spatial patch, timestep, bandset). Band order inside a bandset is the model's order (the order the
original's checkpoints expect), not alphabetical.

All spatial inputs live on a 10 m grid: a bandset stored at 20 m or 40 m is upsampled to 10 m by pixel
repetition before it reaches the model, and OpenStreetMap (rasterised at 2.5 m) is strided down to 10 m.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from importlib import resources

import numpy as np

BASE_GSD = 10.0  # metres per pixel of the model's input grid
TILE_SIZE = 256  # pixels per side of one raw corpus sample (2560 m)
TILE_METRES = TILE_SIZE * BASE_GSD
MAX_TIMESTEPS = 12  # monthly mosaics over one year
MAX_PATCH_SIZE = 8
MISSING_VALUE = -99999.0  # the original's sentinel in stored data; inside this project missing is NaN


@dataclass(frozen=True)
class Bandset:
    bands: tuple[str, ...]
    resolution: float  # metres per pixel as stored in the raw corpus

    @property
    def num_bands(self) -> int:
        return len(self.bands)


@dataclass(frozen=True)
class Modality:
    name: str
    bandsets: tuple[Bandset, ...]
    temporal: bool  # monthly time series (12 steps) or one static map
    encoder_input: bool  # False: decode-only target (maps), never shown to the encoder
    native_resolution: float  # metres, of the sensor or product
    raw_folder: str  # folder of the raw corpus layout

    @cached_property
    def bands(self) -> tuple[str, ...]:
        return tuple(b for bs in self.bandsets for b in bs.bands)

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    @property
    def num_bandsets(self) -> int:
        return len(self.bandsets)

    def bandset_slices(self) -> list[slice]:
        """Channel slices of each bandset inside this modality's (..., C) channel axis."""
        out, start = [], 0
        for bs in self.bandsets:
            out.append(slice(start, start + bs.num_bands))
            start += bs.num_bands
        return out


def _m(name, bandsets, temporal, encoder_input, native, folder) -> Modality:
    return Modality(
        name=name,
        bandsets=tuple(Bandset(tuple(b), float(r)) for b, r in bandsets),
        temporal=temporal,
        encoder_input=encoder_input,
        native_resolution=float(native),
        raw_folder=folder,
    )


OSM_FEATURES = (
    "aerialway_pylon", "aerodrome", "airstrip", "amenity_fuel", "building", "chimney",
    "communications_tower", "crane", "flagpole", "fountain", "generator_wind", "helipad", "highway",
    "leisure", "lighthouse", "obelisk", "observatory", "parking", "petroleum_well", "power_plant",
    "power_substation", "power_tower", "river", "runway", "satellite_dish", "silo", "storage_tank",
    "taxiway", "water_tower", "works",
)  # fmt: skip

WORLDCEREAL_PRODUCTS = (
    "tc-annual-temporarycrops-classification",
    "tc-maize-main-irrigation-classification",
    "tc-maize-main-maize-classification",
    "tc-maize-second-irrigation-classification",
    "tc-maize-second-maize-classification",
    "tc-springcereals-springcereals-classification",
    "tc-wintercereals-irrigation-classification",
    "tc-wintercereals-wintercereals-classification",
)

# Registry order is the model's modality order (token sequence order, checkpoint layout).
MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in [
        _m("sentinel2_l2a",
           [(["B02", "B03", "B04", "B08"], 10),
            (["B05", "B06", "B07", "B8A", "B11", "B12"], 20),
            (["B01", "B09"], 40)],
           temporal=True, encoder_input=True, native=10, folder="10_sentinel2_l2a_monthly"),
        _m("sentinel1", [(["vv", "vh"], 10)],
           temporal=True, encoder_input=True, native=10, folder="10_sentinel1_monthly"),
        _m("landsat",
           [(["B8"], 10),
            (["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B9", "B10", "B11"], 20)],
           temporal=True, encoder_input=True, native=30, folder="10_landsat_monthly"),
        _m("worldcover", [(["B1"], 10)],
           temporal=False, encoder_input=False, native=10, folder="10_worldcover"),
        _m("srtm", [(["srtm"], 10)],
           temporal=False, encoder_input=False, native=30, folder="10_srtm"),
        _m("openstreetmap_raster", [(list(OSM_FEATURES), 2.5)],
           temporal=False, encoder_input=False, native=2.5, folder="10_openstreetmap_raster"),
        _m("wri_canopy_height_map", [(["B1"], 10)],
           temporal=False, encoder_input=False, native=1, folder="10_wri_canopy_height_map"),
        _m("cdl", [(["cdl"], 10)],
           temporal=False, encoder_input=False, native=30, folder="10_cdl"),
        _m("worldcereal", [(list(WORLDCEREAL_PRODUCTS), 10)],
           temporal=False, encoder_input=False, native=10, folder="10_worldcereal"),
    ]
}  # fmt: skip

ENCODER_MODALITIES = tuple(n for n, m in MODALITIES.items() if m.encoder_input)
MAP_MODALITIES = tuple(n for n, m in MODALITIES.items() if not m.encoder_input)
# (modality, bandset index) pairs in model order: 12 in v1, 67 input channels
ALL_BANDSETS = tuple((n, i) for n, m in MODALITIES.items() for i in range(m.num_bandsets))


def get_modality(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}") from None


# --------------------------------------------------------------------------------------------------
# Normalisation: x' = (x - lo) / (hi - lo) per band, no clipping (as the original). For bands with a
# mean/std the window is mean +/- 2 std; for maps given as min/max (OSM 0..1, WorldCereal 0..100) it is
# that range.


@dataclass(frozen=True)
class NormStats:
    """Per-band (lo, hi) windows for every modality, in each modality's band order."""

    lo: dict[str, np.ndarray]
    hi: dict[str, np.ndarray]

    @classmethod
    def from_dict(cls, stats: dict) -> NormStats:
        """From {modality: {band: {"mean", "std"} | {"min", "max"}}} (the layout of norm_stats.json and of
        the statistics that the corpus build writes). Every band of every registered modality must appear."""
        lo, hi = {}, {}
        for name, mod in MODALITIES.items():
            if name not in stats:
                raise ValueError(f"normalisation stats lack modality {name!r}")
            los, his = [], []
            for band in mod.bands:
                s = stats[name].get(band)
                if s is None:
                    raise ValueError(f"normalisation stats lack band {name}.{band}")
                if "mean" in s:
                    los.append(s["mean"] - 2 * s["std"])
                    his.append(s["mean"] + 2 * s["std"])
                else:
                    los.append(s["min"])
                    his.append(s["max"])
            lo[name] = np.asarray(los, dtype=np.float32)
            hi[name] = np.asarray(his, dtype=np.float32)
        return cls(lo, hi)

    @classmethod
    def default(cls) -> NormStats:
        """The statistics published with the original corpus (olmoearth/data/norm_stats.json)."""
        text = resources.files("olmoearth").joinpath("data/norm_stats.json").read_text()
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_json(cls, path_or_text: str) -> NormStats:
        text = path_or_text if path_or_text.lstrip().startswith("{") else open(path_or_text).read()
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict:
        return {
            name: {
                band: {"min": float(self.lo[name][i]), "max": float(self.hi[name][i])}
                for i, band in enumerate(MODALITIES[name].bands)
            }
            for name in MODALITIES
        }

    def normalise(self, name: str, x):
        """x: (..., C) raw values of modality `name` (numpy or torch); NaN stays NaN."""
        lo, hi = self.lo[name], self.hi[name]
        if not isinstance(x, np.ndarray):  # torch tensor
            import torch

            lo = torch.as_tensor(lo, device=x.device, dtype=x.dtype)
            hi = torch.as_tensor(hi, device=x.device, dtype=x.dtype)
        return (x - lo) / (hi - lo)
