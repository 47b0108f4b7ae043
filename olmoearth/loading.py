"""`olmoearth.load`: a ready encoder from any source this project knows, the one loader that serving,
evaluation and export use.

    load("enc.safetensors") / load(data)       an encoder export or a whole-model file (checkpoint.py), by path
                                               or as bytes
    load("s3://bucket/models/enc.safetensors") any fsspec URI; s3:// reaches the endpoint and credentials of
                                               the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)
    load("runs/x/checkpoint_000100")           a pretraining checkpoint folder (train_state.json + ds/), or a
                                               fine-tuning one (its train_state.json says run_kind "finetune")
    load("OlmoEarth-v1-Nano")                  an original v1 folder (config.json + weights.pth, convert.py)
    load("random:nano") / load("random:nano:7")  random init of a size, with a seed (default 0)

`load_model` reads the same sources and returns the whole LatentMIM where the source holds one (all but an
encoder export), or the FineTunedModel of a fine-tuned file or fine-tuning checkpoint folder; `load` returns the encoder, in eval mode on the
CPU (a fine-tuned file gives its fine-tuned encoder); `load_finetuned` returns the FineTunedModel (encoder +
head + task) and refuses any other source.

A pretraining checkpoint keeps its corpus's normalisation statistics in train_state.json under
"norm_stats"; a checkpoint without them loads with the v1 statistics (NormStats.default) and a warning,
since the corpus it names can only be read by the pipelines.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import warnings

import torch

from olmoearth.checkpoint import DS_TAG, STATE_FILE, CheckpointError, load_file, load_weights
from olmoearth.modalities import NormStats

RANDOM_PREFIX = "random:"


def load(source, map_location: str = "cpu"):
    """The Encoder of `source` (see the module docstring), in eval mode on `map_location`."""
    model = load_model(source)
    return getattr(model, "encoder", model).to(map_location).eval()


def load_finetuned(source, map_location: str = "cpu", fs=None):
    """The FineTunedModel of a fine-tuned model file (path, URI or bytes), in eval mode on `map_location`."""
    from olmoearth.finetuned import FineTunedModel

    model = load_model(source, fs=fs)
    if not isinstance(model, FineTunedModel):
        name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
        raise CheckpointError(f"{name}: not a fine-tuned model (it holds a {type(model).__name__}); "
                              "write one with olmoearth export of a fine-tuning run (checkpoint.save_finetuned)")
    return model.to(map_location).eval()


def load_model(source, fs=None):
    """The model of `source`: a LatentMIM, or the Encoder for an encoder export; in eval mode.
    `fs`: an fsspec filesystem for `source`; by default the one its URI names (or the local one)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return load_file(bytes(source))
    source = os.fspath(source)
    if source.startswith(RANDOM_PREFIX):
        return random_model(*_parse_random(source))
    if fs is None:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(source)
    if fs.isdir(source):
        return _load_folder(source, fs)
    try:
        with fs.open(source, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"{source}: not found") from None
    return load_file(data, source)


def random_model(size: str = "nano", seed: int = 0, **overrides):
    """A randomly initialised model of `size` (ModelConfig `overrides` as build_model's), seeded, without
    touching the global RNG."""
    from olmoearth.model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(size, **overrides).eval()


def _parse_random(spec: str) -> tuple[str, int]:
    """`random:<size>[:<seed>]` -> (size, seed)."""
    parts = spec[len(RANDOM_PREFIX) :].split(":")
    try:
        return parts[0], int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise CheckpointError(f"{spec!r}: expected random:<size>[:<seed>] with an integer seed") from None


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder.rstrip("/"), name) if "://" in folder else os.path.join(folder, name)


def _load_folder(folder: str, fs):
    from olmoearth import convert

    if convert.is_original_folder(folder, fs):
        return convert.from_original(folder, fs)
    if fs.exists(_join(folder, STATE_FILE)) and fs.isdir(_join(folder, DS_TAG)):
        return _load_pretraining(folder, fs)
    raise CheckpointError(f"{folder}: a folder, but not an original OlmoEarth checkpoint ({convert.ORIGINAL_CONFIG} "
                          f"+ {convert.ORIGINAL_WEIGHTS}) nor a pretraining checkpoint ({STATE_FILE} + {DS_TAG}/)")


FINETUNE_RUN_KIND = "finetune"  # train_state.json "run_kind" of a fine-tuning checkpoint (pipelines/finetune)


def _load_pretraining(folder: str, fs):
    """A pretraining checkpoint folder -> its LatentMIM; a fine-tuning one -> its FineTunedModel (fp32
    weights consolidated from any ZeRO stage)."""
    from olmoearth.model import LatentMIM, ModelConfig

    with fs.open(_join(folder, STATE_FILE), "rb") as fh:
        state = json.loads(fh.read().decode())
    if state.get("run_kind") == FINETUNE_RUN_KIND:
        return _load_finetuning(folder, fs, state)
    size = state["config"]["model"]["size"]
    if "norm_stats" in state:
        norm_stats = NormStats.from_dict(state["norm_stats"])
    else:
        warnings.warn(f"{folder}: {STATE_FILE} holds no norm_stats; the encoder uses the v1 statistics "
                      "(NormStats.default), not those of the corpus it was trained on", stacklevel=3)
        norm_stats = NormStats.default()
    model = LatentMIM(ModelConfig.preset(size), norm_stats)
    load_weights(model, _folder_weights(folder, fs), folder)
    model.encoder.checkpoint_meta = {"size": size, "step": int(state["step"]), "source": folder}
    return model.eval()


def _load_finetuning(folder: str, fs, state: dict):
    """A fine-tuning checkpoint folder -> its FineTunedModel: the encoder config, norm stats and task come
    from train_state.json, encoder + head weights from the DeepSpeed files."""
    from olmoearth.encoder import Encoder
    from olmoearth.finetuned import FineTunedModel, TaskSpec
    from olmoearth.model import ModelConfig

    missing = [k for k in ("encoder_config", "norm_stats", "task") if k not in state]
    if missing:
        raise CheckpointError(f"{folder}: fine-tuning {STATE_FILE} lacks {missing}")
    encoder = Encoder(ModelConfig.from_dict(state["encoder_config"]), NormStats.from_dict(state["norm_stats"]))
    model = FineTunedModel(encoder, TaskSpec.from_dict(state["task"]))
    load_weights(model, _folder_weights(folder, fs), folder)
    encoder.checkpoint_meta = {"kind": "finetuned", "step": int(state["step"]), "epoch": int(state["epoch"]),
                               "source": folder}  # fmt: skip
    return model.eval()


def _folder_weights(folder: str, fs) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint folder, local or behind fsspec (copied to a temp dir)."""
    from olmoearth.checkpoint import consolidated_state_dict

    if "://" not in folder:
        return consolidated_state_dict(folder)
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(folder.rstrip("/") + "/", tmp, recursive=True)
        return consolidated_state_dict(tmp)
