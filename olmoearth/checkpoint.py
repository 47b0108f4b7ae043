"""The encoder checkpoint: ONE safetensors file = encoder weights + its ModelConfig, NormStats and the
modality registry in the metadata (string -> JSON string).

    save_encoder(model.encoder, "enc.safetensors", extra_meta={"step": 1000})
    encoder = load_encoder("enc.safetensors")    # or load_encoder(open(..., "rb").read())
    encoder.norm_stats, encoder.config, encoder.checkpoint_meta
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from olmoearth.modalities import MODALITIES, NormStats

FORMAT = "olmoearth-encoder/1"

# A pretraining checkpoint folder (one per saved step): the DeepSpeed checkpoint under tag DS_TAG, the
# training state (step, config, metrics history) and, in the final one, a reference batch with the
# encoder's output on it (export checks that the exported encoder reproduces it).
DS_TAG = "ds"
STATE_FILE = "train_state.json"
REFERENCE_FILE = "reference.pt"


def modality_registry() -> dict:
    return {
        n: {"bandsets": [list(bs.bands) for bs in m.bandsets], "temporal": m.temporal,
            "encoder_input": m.encoder_input}
        for n, m in MODALITIES.items()
    }


def save_encoder(encoder, path: str, extra_meta: dict | None = None) -> None:
    """Write encoder weights + config + norm stats + modality registry to one safetensors file."""
    config = getattr(encoder, "config", None)
    if config is None:
        raise ValueError("save_encoder: encoder has no .config (build it with build_model)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    meta = {
        "format": FORMAT,
        "config": json.dumps(dataclasses.asdict(config)),
        "norm_stats": json.dumps(encoder.norm_stats.to_dict()),
        "modalities": json.dumps(modality_registry()),
        "extra": json.dumps(extra_meta or {}),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_metadata(data: bytes) -> dict:
    """The __metadata__ of a safetensors blob (8-byte little-endian header length, then JSON)."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not a safetensors file: bad header ({e})") from None
    return header.get("__metadata__", {})


def load_encoder(path_or_bytes, map_location: str = "cpu"):
    """Rebuild the Encoder saved by save_encoder (from a local path or the file's bytes)."""
    from olmoearth.model import ModelConfig, build_encoder

    name = "<bytes>"
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
    else:
        name = str(path_or_bytes)
        with open(name, "rb") as fh:
            data = fh.read()
    meta = read_metadata(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{name}: not an OlmoEarth encoder checkpoint (format {meta.get('format')!r})")
    saved_mods = json.loads(meta["modalities"])
    if saved_mods != modality_registry():
        raise ValueError(f"{name}: saved with a different modality registry than this code's")
    config = ModelConfig.from_dict(json.loads(meta["config"]))
    encoder = build_encoder(config)
    tensors = load_bytes(data)
    missing, unexpected = encoder.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{name}: weights do not fit the encoder (missing {missing}, unexpected {unexpected})")
    encoder.norm_stats = NormStats.from_dict(json.loads(meta["norm_stats"]))
    encoder.config = config
    encoder.checkpoint_meta = json.loads(meta.get("extra", "{}"))
    return encoder.to(map_location)


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
    states = torch.load(os.path.join(ds_dir, names[0]), map_location="cpu", weights_only=False)
    sd = {k: v for k, v in (states.get("module") or {}).items() if v.numel() > 0}
    sd.update(get_fp32_state_dict_from_zero_checkpoint(local_dir, tag=DS_TAG))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
