"""The project's base pieces: modality registry, normalisation stats, typed configs, object storage."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import typing

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
from pipelines.common.config import field_descriptions, from_dict, load_config
from pipelines.common.ray_start import storage_env
from pipelines.common.storage import Storage, join
from ray_jobs.cli import COMMANDS


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


@dataclasses.dataclass
class _Described:
    lr: float = 1e-4  # learning rate  # noqa: E501
    # steps of warm-up,
    # then cosine
    warmup: int = 10
    name: str = dataclasses.field(
        default="x"
    )  # the run's name
    bare: int = 0


def test_field_descriptions_come_from_the_comments():
    assert field_descriptions(_Described) == {
        "lr": "learning rate", "warmup": "steps of warm-up, then cosine", "name": "the run's name", "bare": "",
    }  # fmt: skip


def test_s3_endpoint_flag_or_yaml_key_sets_the_one_storage_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert load_config(_Job, ["--s3_endpoint", "http://127.0.0.1:1", "--steps", "3"]).steps == 3
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"
    path = tmp_path / "job.yaml"
    path.write_text("s3_endpoint: http://127.0.0.1:2\nsteps: 4\n")
    assert load_config(_Job, ["--config", str(path)]) == _Job(steps=4)
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:2"
    assert Storage().endpoint == "http://127.0.0.1:2"


def test_workers_get_the_drivers_aws_variables_except_those_a_submitted_job_sets(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = storage_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:3" and env["AWS_ACCESS_KEY_ID"] == "key"
    assert not [k for k in env if not k.startswith("AWS_")]
    job = {"runtime_env": {"env_vars": {"AWS_ACCESS_KEY_ID": "from-job"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert "AWS_ACCESS_KEY_ID" not in storage_env() and "AWS_ENDPOINT_URL" in storage_env()


def _job_config_classes() -> dict:
    from pipelines.corpus.build import BuildConfig
    from pipelines.corpus.materialize_config import MaterializeConfig
    from pipelines.evaluation.run import EvalConfig
    from pipelines.finetune.config import FinetuneConfig
    from pipelines.pretrain.config import PretrainConfig
    from pipelines.selection.config import SelectCellsConfig
    from ray_jobs.convert import ConvertConfig
    from ray_jobs.demo import DemoConfig
    from ray_jobs.export import ExportConfig
    from ray_jobs.synth import SynthJobConfig
    from serve.app import ServeConfig
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.predict_config import PredictConfig

    return {"predict": PredictConfig, "synth": SynthJobConfig, "build-corpus": BuildConfig, "pretrain": PretrainConfig,
            "export": ExportConfig, "convert": ConvertConfig, "serve": ServeConfig, "embed": EmbedAreaConfig,
            "eval": EvalConfig, "demo": DemoConfig, "materialize": MaterializeConfig,
            "select-cells": SelectCellsConfig, "finetune": FinetuneConfig}  # fmt: skip


def _described_fields(cls, prefix=""):
    """(dotted flag name, description) of every field, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _described_fields(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, field_descriptions(cls)[f.name]


def test_every_job_field_has_a_description_that_help_prints(capsys):
    classes = _job_config_classes()
    assert set(classes) == set(COMMANDS)
    missing = [f"{cls.__name__}.{name}" for cls in classes.values() for name, text in _described_fields(cls)
               if not text]  # fmt: skip
    assert not missing, f"fields without a description comment: {missing}"
    for command, cls in classes.items():
        with pytest.raises(SystemExit) as done:
            importlib.import_module(COMMANDS[command][0]).main(["--help"])
        assert done.value.code == 0
        out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even at hyphens
        assert "--s3_endpoint" in out
        for name, text in _described_fields(cls):
            assert f"--{name}" in out and "".join(text.split()) in out, (command, name)


def test_atomic_write_leaves_nothing_when_it_fails(tmp_path):
    storage, uri = Storage(), str(tmp_path / "sub" / "big.bin")
    with pytest.raises(RuntimeError, match="mid-write"):
        with storage.open_atomic(uri) as fh:
            fh.write(b"partial")
            raise RuntimeError("mid-write")
    assert os.listdir(tmp_path / "sub") == []  # neither the file nor a temporary one
    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError):
        with storage.open_atomic(uri) as fh:
            fh.write(b"new, but never finished")
            raise RuntimeError("mid-write")
    assert os.listdir(tmp_path / "sub") == ["big.bin"] and storage.read_bytes(uri) == b"old"
    with storage.open_atomic(uri) as fh:
        fh.write(b"new")
    assert os.listdir(tmp_path / "sub") == ["big.bin"] and storage.read_bytes(uri) == b"new"


def test_storage_round_trip_on_s3_and_local(s3_bucket, s3_server, tmp_path):
    storage = Storage()
    for root in (s3_bucket, str(tmp_path)):
        uri = join(root, "a/b/c.txt")
        storage.write_text(uri, "hello")
        assert storage.exists(uri)
        assert storage.read_text(uri) == "hello"
    fs, path = storage.pyarrow_fs(join(s3_bucket, "a/b/c.txt"))
    with fs.open_input_stream(path) as fh:
        assert fh.read() == b"hello"
    # an upload that fails leaves no object, small (one PUT) or multipart (s3fs: parts of 50 MiB)
    for size in (10, 51 * 2**20):
        uri = join(s3_bucket, f"failed-{size}.bin")
        with pytest.raises(RuntimeError):
            with storage.open_atomic(uri) as fh:
                fh.write(b"x" * size)
                raise RuntimeError("mid-write")
        assert not storage.exists(uri)
    with storage.open_atomic(join(s3_bucket, "big.bin")) as fh:
        fh.write(b"y" * (51 * 2**20))
    assert len(storage.read_bytes(join(s3_bucket, "big.bin"))) == 51 * 2**20


def test_cli_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("synth", "build-corpus", "pretrain", "export", "convert", "serve", "embed", "eval", "demo"):
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'nope'" in bad.stderr
