"""The project's base pieces: modality registry, normalisation stats, typed configs, object storage."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from olmoearth.modalities import (
    ALL_BANDSETS,
    ENCODER_MODALITIES,
    MAP_MODALITIES,
    MODALITIES,
    NormStats,
    get_modality,
)
from pipelines.common.config import from_dict, load_config
from pipelines.common.storage import Storage, join


def test_registry_matches_the_original_v1():
    assert len(ALL_BANDSETS) == 12
    assert sum(m.num_bands for m in MODALITIES.values()) == 67
    assert ENCODER_MODALITIES == ("sentinel2_l2a", "sentinel1", "landsat")
    assert set(MAP_MODALITIES) == {
        "worldcover", "srtm", "openstreetmap_raster", "wri_canopy_height_map", "cdl", "worldcereal",
    }  # fmt: skip
    s2 = get_modality("sentinel2_l2a")
    assert s2.bands[:4] == ("B02", "B03", "B04", "B08")  # model order, not alphabetical
    assert [bs.resolution for bs in s2.bandsets] == [10, 20, 40]
    assert [bs.resolution for bs in get_modality("landsat").bandsets] == [10, 20]
    assert get_modality("openstreetmap_raster").bandsets[0].resolution == 2.5
    assert all(MODALITIES[m].temporal for m in ENCODER_MODALITIES)
    assert not any(MODALITIES[m].temporal for m in MAP_MODALITIES)
    with pytest.raises(ValueError, match="unknown modality 'sentinel3'"):
        get_modality("sentinel3")


def test_norm_stats_window_is_mean_plus_minus_two_std():
    stats = NormStats.default()
    # B02: mean 1188.941, std 1859.192 -> lo = mean - 2 std maps to 0, hi = mean + 2 std maps to 1
    x = np.full((2, 12), np.nan, dtype=np.float32)
    x[0, 0] = 1188.941 - 2 * 1859.192
    x[1, 0] = 1188.941 + 2 * 1859.192
    out = stats.normalise("sentinel2_l2a", x)
    assert out[0, 0] == pytest.approx(0.0, abs=1e-4) and out[1, 0] == pytest.approx(1.0, abs=1e-4)
    assert np.isnan(out[0, 2])  # missing stays missing
    # OSM and WorldCereal use min/max windows
    assert stats.lo["worldcereal"][0] == 0 and stats.hi["worldcereal"][0] == 100
    again = NormStats.from_dict(stats.to_dict())
    np.testing.assert_allclose(again.lo["sentinel1"], stats.lo["sentinel1"])


def test_norm_stats_name_a_missing_band():
    d = NormStats.default().to_dict()
    del d["sentinel1"]["vh"]
    with pytest.raises(ValueError, match="sentinel1.vh"):
        NormStats.from_dict(d)


@dataclasses.dataclass
class _Inner:
    lr: float = 1e-4
    stages: list = dataclasses.field(default_factory=lambda: [1, 2])


@dataclasses.dataclass
class _Job:
    name: str = "run"
    steps: int = 10
    use_gpu: bool = False
    optim: _Inner = dataclasses.field(default_factory=_Inner)


def test_config_yaml_then_flags(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: from-yaml\nsteps: 20\noptim:\n  lr: 3e-4\n")
    cfg = load_config(_Job, ["--config", str(path), "--steps", "30", "--use_gpu", "true"])
    assert cfg == _Job(name="from-yaml", steps=30, use_gpu=True, optim=_Inner(lr=3e-4))
    cfg = load_config(_Job, ["--optim.lr", "0.5", "--optim.stages", "[3]"])
    assert cfg.optim.lr == 0.5 and cfg.optim.stages == [3]
    with pytest.raises(ValueError, match="optim.momentum"):
        from_dict(_Job, {"optim": {"momentum": 0.9}})
    with pytest.raises(ValueError, match="'steps'"):
        from_dict(_Job, {"steps": "many"})


def test_storage_round_trip_on_s3_and_local(s3_bucket, s3_server, tmp_path):
    storage = Storage(s3_server.endpoint)
    for root in (s3_bucket, str(tmp_path)):
        uri = join(root, "a/b/c.txt")
        storage.write_text(uri, "hello")
        assert storage.exists(uri)
        assert storage.read_text(uri) == "hello"
    fs, path = storage.pyarrow_fs(join(s3_bucket, "a/b/c.txt"))
    with fs.open_input_stream(path) as fh:
        assert fh.read() == b"hello"


def test_cli_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("synth", "build-corpus", "pretrain", "export", "convert", "serve", "embed", "eval", "demo"):
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr
