"""Checkpoint compatibility with the original OlmoEarth v1 (Nano, Tiny, Base, Large).

An original checkpoint is a folder with `config.json` (the training config; the model under "model") and
`weights.pth` (the full LatentMIM state dict: encoder, decoder and the frozen target encoder). This module

    reads such a folder (local path, or any fsspec filesystem passed in),
    checks that the config is a v1 model this project implements (refusing, by key, anything else),
    maps every tensor through an explicit name table onto this project's model (refusing, by key, a
    missing, extra or mis-shaped tensor),
    and `convert` writes the result in this project's format (olmoearth/checkpoint.py).

`olmoearth.load` reads original folders through `from_original`. No Ray and no storage settings here: the
`olmoearth convert` job (ray_jobs/convert.py) passes an fsspec filesystem for s3:// URIs.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import warnings
from dataclasses import dataclass

import torch

from olmoearth.checkpoint import CheckpointError
from olmoearth.modalities import MAX_PATCH_SIZE, MODALITIES

ORIGINAL_CONFIG = "config.json"
ORIGINAL_WEIGHTS = "weights.pth"
# heads some later pretraining checkpoints carry for auxiliary losses; the original's loader drops them too
TRAINING_ONLY_PREFIXES = ("supervision_head.", "location_token_distillation_head.")
# v1 sizes by (dim, depth, heads), for naming only
KNOWN_SIZES = {(128, 4, 8): "nano", (192, 12, 3): "tiny", (768, 12, 12): "base", (1024, 24, 16): "large"}


# --------------------------------------------------------------------------------------------------
# The original's config


@dataclass(frozen=True)
class OriginalSpec:
    """What this project needs to know from an original config.json."""

    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    modalities: tuple[str, ...]  # supported by the checkpoint, in this project's registry order
    encoder_modalities: tuple[str, ...]  # the ones its encoder was trained to ingest
    projection_only_target: bool = False

    @property
    def size(self) -> str:
        return KNOWN_SIZES.get((self.dim, self.depth, self.num_heads), "custom")


# (field, value this project implements, default in the original's config class when the key is absent)
_ENCODER_FIXED = [
    ("max_patch_size", MAX_PATCH_SIZE, 8),
    ("num_register_tokens", 0, 0),
    ("qk_norm", False, False),
    ("use_linear_patch_embed", False, False),
    ("patch_embed_hidden_sizes", None, None),
    ("post_proj_hidden_sizes", None, None),
    ("num_projection_layers", 1, 1),
    ("aggregate_then_project", True, True),
    ("use_flash_attn", None, None),  # either value computes the same function; accepted below
    ("attention_pooler_config", None, None),
]
_DECODER_FIXED = [
    ("qk_norm", False, False),
    ("output_embedding_size", None, None),
    ("use_attention_pooler", False, False),
]


def _need(section: dict, key: str, where: str):
    if key not in section:
        raise CheckpointError(f"{where}: missing key {key!r}")
    return section[key]


def _check_fixed(section: dict, fixed, where: str) -> None:
    for key, ours, default in fixed:
        if key == "use_flash_attn":
            continue
        value = section.get(key, default)
        if key.endswith("_sizes") and value == []:
            value = None
        if value != ours:
            raise CheckpointError(
                f"{where}.{key} = {value!r}: only {ours!r} is implemented (this is an OlmoEarth v1 converter; "
                "v1.1+ checkpoints with linear/MLP patch embeds, RoPE or attention poolers are not supported)"
            )
    pos = section.get("position_encoding", section.get("spatial_pos_encoding", "absolute")) or "absolute"
    if pos != "absolute":
        raise CheckpointError(f"{where}.position_encoding = {pos!r}: only 'absolute' (v1) is implemented")
    tok = section.get("tokenization_config")
    if tok and (tok.get("overrides") if isinstance(tok, dict) else True):
        raise CheckpointError(f"{where}.tokenization_config has band-group overrides: only v1 bandsets are implemented")


def parse_original_config(config: dict, where: str = ORIGINAL_CONFIG) -> OriginalSpec:
    """The model facts of an original config.json (the whole training config, or just its "model" part)."""
    model = config.get("model", config)
    enc = _need(model, "encoder_config", f"{where}: model")
    dec = _need(model, "decoder_config", f"{where}: model")
    if model.get("reconstructor_config"):
        raise CheckpointError(f"{where}: model.reconstructor_config is set: MAE-style reconstructors are not supported")
    w_enc, w_dec = f"{where}: model.encoder_config", f"{where}: model.decoder_config"
    _check_fixed(enc, _ENCODER_FIXED, w_enc)
    _check_fixed(dec, _DECODER_FIXED, w_dec)

    names = list(_need(enc, "supported_modality_names", w_enc))
    unknown = [m for m in names if m not in MODALITIES]
    if unknown:
        raise CheckpointError(f"{w_enc}.supported_modality_names: {unknown} not in this project's registry")
    if list(dec.get("supported_modality_names", names)) != names:
        raise CheckpointError(f"{w_dec}.supported_modality_names differs from the encoder's")
    dim = int(_need(enc, "embedding_size", w_enc))
    if int(dec.get("encoder_embedding_size", dim)) != dim:
        raise CheckpointError(f"{w_dec}.encoder_embedding_size != encoder embedding_size {dim}")

    decode_only = _decode_only(config)
    modalities = tuple(m for m in MODALITIES if m in names)  # registry order
    encoder_modalities = tuple(m for m in modalities if m not in decode_only and MODALITIES[m].encoder_input)
    return OriginalSpec(
        dim=dim,
        depth=int(_need(enc, "depth", w_enc)),
        num_heads=int(_need(enc, "num_heads", w_enc)),
        mlp_ratio=float(_need(enc, "mlp_ratio", w_enc)),
        decoder_dim=int(_need(dec, "decoder_embedding_size", w_dec)),
        decoder_depth=int(_need(dec, "depth", w_dec)),
        decoder_heads=int(_need(dec, "num_heads", w_dec)),
        modalities=modalities,
        encoder_modalities=encoder_modalities,
        projection_only_target=bool(model.get("projection_only_target", False)),
    )


def _decode_only(config: dict) -> set[str]:
    for section in ("train_module", "data_loader"):
        s = config.get(section, {}).get("masking_config", {}).get("strategy_config", {})
        if s.get("only_decode_modalities") is not None:
            return set(s["only_decode_modalities"])
    # not recorded (e.g. a bare model config): v1 encoded only Sentinel-2, Sentinel-1 and Landsat
    return {m for m in MODALITIES if not MODALITIES[m].encoder_input}


# --------------------------------------------------------------------------------------------------
# Reading an original folder


def _join(src: str, name: str) -> str:
    return posixpath.join(src.rstrip("/"), name) if "://" in src else os.path.join(src, name)


def _open(path: str, fs, mode: str = "rb"):
    if fs is None:
        return open(path, mode)
    return fs.open(path, mode)


def is_original_folder(src: str, fs=None) -> bool:
    exists = (lambda p: fs.exists(p)) if fs is not None else os.path.exists
    return exists(_join(src, ORIGINAL_CONFIG)) and exists(_join(src, ORIGINAL_WEIGHTS))


def read_original(src: str, fs=None) -> tuple[OriginalSpec, dict[str, torch.Tensor]]:
    """(spec, state dict) of an original folder `src` (a local path, or a path on fsspec filesystem `fs`)."""
    cfg_path, w_path = _join(src, ORIGINAL_CONFIG), _join(src, ORIGINAL_WEIGHTS)
    try:
        with _open(cfg_path, fs, "rb") as fh:
            config = json.loads(fh.read().decode())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: not found (an original checkpoint folder holds config.json + weights.pth)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    spec = parse_original_config(config, where=cfg_path)
    try:
        with _open(w_path, fs, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"{w_path}: not found") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{w_path}: not a PyTorch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{w_path}: expected a flat state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    return spec, state


# --------------------------------------------------------------------------------------------------
# The name table and the state-dict conversion


def model_config(spec: OriginalSpec):
    """This project's ModelConfig for an original spec."""
    from olmoearth.model import SIZES, ModelConfig

    fields = dict(
        encoder_dim=spec.dim, encoder_depth=spec.depth, encoder_heads=spec.num_heads,
        decoder_dim=spec.decoder_dim, decoder_depth=spec.decoder_depth, decoder_heads=spec.decoder_heads,
        mlp_ratio=spec.mlp_ratio, modalities=list(spec.modalities),
    )  # fmt: skip
    size = spec.size
    if size in SIZES and tuple(SIZES[size]) == (spec.dim, spec.depth, spec.num_heads, spec.decoder_dim,
                                                 spec.decoder_depth, spec.decoder_heads):
        return ModelConfig.preset(size, **{k: v for k, v in fields.items() if k in ("mlp_ratio", "modalities")})
    return ModelConfig(size="custom", **fields)


def name_table(our_keys, spec: OriginalSpec) -> dict[str, str]:
    """{our state-dict key: the original's key}, for every tensor of our model.

    The table (olmoearth.model.original_name): identical names under encoder. and decoder.;
    target_projection.<rest> <- target_encoder.patch_embeddings.<rest> (the frozen random projection
    that makes the Latent MIM Lite targets). Original tensors with no counterpart here are listed by
    `dropped_original_keys` and checked there."""
    from olmoearth.model import original_name

    table = {}
    for k in our_keys:
        src = original_name(k)
        if src is None:
            raise CheckpointError(f"no original counterpart for this project's tensor {k!r}")
        table[k] = src
    return table


def _fixed_tables(prefix: str, dim: int) -> dict[str, torch.Tensor]:
    """Fixed (non-learned) tables that the original stores and this project rebuilds: they must agree."""
    from olmoearth.encodings import month_table, sincos_1d

    q = int(dim * 0.25)
    return {
        f"{prefix}composite_encodings.month_embed.weight": month_table(q),
        # legacy checkpoints: the timestep-index table, 12 rows
        f"{prefix}composite_encodings.pos_embed": sincos_1d(torch.arange(12), q),
    }


def dropped_original_keys(state: dict[str, torch.Tensor], spec: OriginalSpec, used: set[str], where: str) -> list[str]:
    """Original tensors this project does not load. Allowed: the fixed encoding tables (checked equal to
    ours) and the rest of the frozen target encoder (a copy of the encoder at init, whose only use in
    v1 is its patch projection). Anything else is an error naming the key."""
    fixed = {}
    for prefix, dim in (("encoder.", spec.dim), ("decoder.", spec.decoder_dim), ("target_encoder.", spec.dim)):
        fixed.update(_fixed_tables(prefix, dim))
    dropped = []
    for k in state:
        if k in used:
            continue
        if k in fixed:
            ref = fixed[k]
            v = state[k]
            same = tuple(v.shape) == tuple(ref.shape) and torch.allclose(v.float(), ref, atol=1e-5)
            if not same and k.endswith("pos_embed"):
                # legacy table that the original itself drops on load (it recomputes the encoding): not used
                warnings.warn(f"{where}: legacy {k!r} differs from the recomputed table; ignored, as the "
                              "original ignores it", stacklevel=2)
            elif not same:
                # month_embed: the original LOADS this table from the checkpoint, so it must equal ours
                raise CheckpointError(f"{where}: fixed table {k!r} differs from the v1 encoding this project "
                                      f"computes (shape {tuple(v.shape)} vs {tuple(ref.shape)})")
        elif not k.startswith("target_encoder."):
            raise CheckpointError(f"{where}: extra tensor {k!r} {tuple(state[k].shape)} has no place in the "
                                  f"{spec.size} model of this project")
        dropped.append(k)
    return dropped


def convert_state_dict(state: dict[str, torch.Tensor], spec: OriginalSpec, model: torch.nn.Module,
                       where: str = ORIGINAL_WEIGHTS) -> dict[str, torch.Tensor]:
    """Map an original LatentMIM state dict onto `model` (this project's LatentMIM): every tensor of ours
    must be found with the same shape; every original tensor must be used or be an allowed drop."""
    ours = model.state_dict()
    table = name_table(ours.keys(), spec)
    out = {}
    for k, src in table.items():
        if src not in state:
            raise CheckpointError(f"{where}: missing tensor {src!r} (for this project's {k!r})")
        v = state[src]
        if tuple(v.shape) != tuple(ours[k].shape):
            raise CheckpointError(f"{where}: tensor {src!r} has shape {tuple(v.shape)}, this project's {k!r} "
                                  f"needs {tuple(ours[k].shape)}")
        if not v.is_floating_point():
            raise CheckpointError(f"{where}: tensor {src!r} has dtype {v.dtype}, expected floating point")
        out[k] = v.to(ours[k].dtype)
    dropped_original_keys(state, spec, set(table.values()), where)
    return out


def from_original(src: str, fs=None):
    """An original checkpoint folder -> this project's LatentMIM with its weights (eval mode). Its encoder
    normalises with NormStats.default(), the original's computed.json statistics."""
    from olmoearth.model import LatentMIM

    spec, state = read_original(src, fs)
    model = LatentMIM(model_config(spec))
    model.load_state_dict(convert_state_dict(state, spec, model, where=_join(src, ORIGINAL_WEIGHTS)), strict=True)
    model.encoder.checkpoint_meta = {"source": src, "size": spec.size,
                                     "encoder_modalities": list(spec.encoder_modalities)}
    return model.eval()


def convert(src: str, dst: str, src_fs=None, dst_fs=None, encoder_only: bool = False) -> dict:
    """Convert the original folder `src` to this project's format at `dst` (full model, or with
    `encoder_only` the encoder export that serving loads). Returns a summary dict."""
    from olmoearth.checkpoint import MODEL_FORMAT, save_encoder, save_model

    model = from_original(src, src_fs)
    meta = dict(model.encoder.checkpoint_meta)
    if encoder_only:
        save_encoder(model.encoder, dst, extra_meta=meta, fs=dst_fs)
    else:
        save_model(model, dst, extra_meta=meta, fs=dst_fs)
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    return dict(meta, dst=dst, format="encoder" if encoder_only else MODEL_FORMAT, encoder_params=n_enc,
                params=sum(p.numel() for p in model.parameters()))
