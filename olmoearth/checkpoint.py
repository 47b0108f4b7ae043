"""This project's model files, and the layout of a pretraining checkpoint folder.

A model file is ONE safetensors file: the weights, and in the metadata (string -> JSON string) the ModelConfig,
the NormStats, the modality registry and free `extra` facts (step, source, ...). Two kinds, one writer and one
reader for both:

    olmoearth-encoder/1   the encoder alone (what serving, evaluation and the area job need)
    olmoearth-model/1     the whole LatentMIM: encoder, decoder and the frozen target projection
    olmoearth-finetuned/1 a FineTunedModel (olmoearth/finetuned.py): encoder + head, its TaskSpec (kind,
                          class names, head, patch size, ...) in the metadata under "task"

    save_encoder(model.encoder, "enc.safetensors", extra_meta={"step": 1000})
    encoder = load_encoder("enc.safetensors")    # or the file's bytes; a whole-model file gives its encoder
    encoder.norm_stats, encoder.config, encoder.checkpoint_meta

`olmoearth.load` (loading.py) takes any source: these files, checkpoint folders, original v1 folders.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from olmoearth.modalities import MODALITIES, NormStats

FORMAT = "olmoearth-encoder/1"
MODEL_FORMAT = "olmoearth-model/1"
FINETUNED_FORMAT = "olmoearth-finetuned/1"
FORMATS = (FORMAT, MODEL_FORMAT, FINETUNED_FORMAT)

# A pretraining checkpoint folder (one per saved step): the DeepSpeed checkpoint under tag DS_TAG, the
# training state (step, config, metrics history) and, in the final one, a reference batch with the
# encoder's output on it (export checks that the exported encoder reproduces it).
DS_TAG = "ds"
STATE_FILE = "train_state.json"
REFERENCE_FILE = "reference.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the file and the key."""


def modality_registry() -> dict:
    return {
        n: {"bandsets": [list(bs.bands) for bs in m.bandsets], "temporal": m.temporal,
            "encoder_input": m.encoder_input}
        for n, m in MODALITIES.items()
    }


# --------------------------------------------------------------------------------------------------
# Writing


def write_file(fmt: str, module: torch.nn.Module, encoder, path: str, extra_meta: dict | None, fs=None,
               task: dict | None = None) -> None:
    """The one writer: `module`'s weights + `encoder`'s config and norm stats (+ a fine-tuned model's `task`)
    as a `fmt` file at `path` (local: written aside and renamed, so a reader never sees half a file; or
    through fsspec `fs`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {
        "format": fmt,
        "config": json.dumps(dataclasses.asdict(encoder.config)),
        "norm_stats": json.dumps(encoder.norm_stats.to_dict()),
        "modalities": json.dumps(modality_registry()),
        "extra": json.dumps(extra_meta or {}),
    }
    if task is not None:
        meta["task"] = json.dumps(task)
    data = save(tensors, metadata=meta)
    if fs is not None:
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def save_encoder(encoder, path: str, extra_meta: dict | None = None, fs=None) -> None:
    """Write encoder weights + config + norm stats + modality registry to one safetensors file."""
    write_file(FORMAT, encoder, encoder, path, extra_meta, fs)


def save_model(model, path: str, extra_meta: dict | None = None, fs=None) -> None:
    """Write the whole model (encoder + decoder + frozen target projection) to one safetensors file."""
    write_file(MODEL_FORMAT, model, model.encoder, path, extra_meta, fs)


def save_finetuned(model, path: str, extra_meta: dict | None = None, fs=None) -> None:
    """Write a FineTunedModel (encoder + head + its TaskSpec) to one safetensors file."""
    write_file(FINETUNED_FORMAT, model, model.encoder, path, extra_meta, fs, task=model.task.to_dict())


# --------------------------------------------------------------------------------------------------
# Reading


def read_metadata(data: bytes, name: str = "<bytes>") -> dict:
    """The __metadata__ of a safetensors blob (8-byte little-endian header length, then JSON)."""
    if len(data) < 8:
        raise CheckpointError(f"{name}: not a safetensors file: shorter than its 8-byte header")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{name}: not a safetensors file: bad header ({e})") from None
    return header.get("__metadata__", {})


def load_file(data: bytes, name: str = "<bytes>"):
    """The module of a model file's bytes: an Encoder (olmoearth-encoder/1), a LatentMIM (olmoearth-model/1)
    or a FineTunedModel (olmoearth-finetuned/1), in eval mode, its encoder carrying the file's config, norm
    stats and extra facts."""
    from safetensors.torch import load

    from olmoearth.encoder import Encoder
    from olmoearth.model import LatentMIM, ModelConfig

    meta = read_metadata(data, name)
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(f"{name}: unknown checkpoint format {fmt!r} (expected one of {FORMATS} "
                              "or an original folder)")
    if json.loads(meta.get("modalities", "null")) != modality_registry():
        raise CheckpointError(f"{name}: saved with a different modality registry than this code's")
    config = ModelConfig.from_dict(json.loads(meta["config"]))
    norm_stats = NormStats.from_dict(json.loads(meta["norm_stats"]))
    if fmt == FORMAT:
        module = Encoder(config, norm_stats)
    elif fmt == MODEL_FORMAT:
        module = LatentMIM(config, norm_stats)
    else:
        module = _finetuned_module(Encoder(config, norm_stats), meta, name)
    load_weights(module, load(data), name)
    encoder = module if fmt == FORMAT else module.encoder
    encoder.checkpoint_meta = json.loads(meta.get("extra", "{}"))
    return module.eval()


def _finetuned_module(encoder, meta: dict, name: str):
    from olmoearth.finetuned import FineTunedModel, TaskSpec

    if "task" not in meta:
        raise CheckpointError(f"{name}: a {FINETUNED_FORMAT} file without its 'task' metadata")
    try:
        task = TaskSpec.from_dict(json.loads(meta["task"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: bad 'task' metadata: {e}") from None
    return FineTunedModel(encoder, task)


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Load `tensors` strictly, naming the first tensor that is missing, extra or mis-shaped."""
    ours = module.state_dict()
    for k in ours:
        if k not in tensors:
            raise CheckpointError(f"{name}: missing tensor {k!r}")
        if tuple(tensors[k].shape) != tuple(ours[k].shape):
            raise CheckpointError(f"{name}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                                  f"the model needs {tuple(ours[k].shape)}")
    extra = sorted(set(tensors) - set(ours))
    if extra:
        raise CheckpointError(f"{name}: extra tensor {extra[0]!r} (and {len(extra) - 1} more)")
    module.load_state_dict(tensors, strict=True)


def load_encoder(path_or_bytes, map_location: str = "cpu"):
    """The Encoder of a model file (a local path or the file's bytes), on `map_location`, in eval mode."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, name = bytes(path_or_bytes), "<bytes>"
    else:
        name = str(path_or_bytes)
        with open(name, "rb") as fh:
            data = fh.read()
    module = load_file(data, name)
    return getattr(module, "encoder", module).to(map_location)


# --------------------------------------------------------------------------------------------------
# Pretraining checkpoint folders


def consolidated_state_dict(local_dir: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a DeepSpeed checkpoint of any ZeRO stage: the trained parameters
    are the fp32 master weights of the optimiser shards (zero_to_fp32); frozen parameters and buffers come
    from rank 0's model states (ZeRO 1 leaves frozen parameters out of the optimiser shards; under ZeRO 3
    the model states hold only empty placeholders, and zero_to_fp32 restores frozen ones itself)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = os.path.join(local_dir, DS_TAG)
    names = sorted(f for f in os.listdir(ds_dir) if f.endswith("model_states.pt"))
    if not names:
        raise FileNotFoundError(f"no DeepSpeed model states in {ds_dir}")
    # tensors and plain values only, so a pickle from run storage cannot run code here; zero_to_fp32 below
    # unpickles the optimiser shards with weights_only=False itself (they hold DeepSpeed objects)
    states = torch.load(os.path.join(ds_dir, names[0]), map_location="cpu", weights_only=True)
    sd = {k: v for k, v in (states.get("module") or {}).items() if v.numel() > 0}
    sd.update(get_fp32_state_dict_from_zero_checkpoint(local_dir, tag=DS_TAG))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
