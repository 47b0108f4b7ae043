"""The ORIGINAL OlmoEarth v1 models (PyPI `olmoearth-pretrain-minimal==0.1.5`), built offline for parity tests
and benchmarks: random weights, saved as an original checkpoint folder (`config.json` + `weights.pth`, the layout
that `olmoearth_pretrain_minimal.load_model_from_path` reads), and run on this project's input layout.

Only tests and bench scripts import this module; the project itself never imports the original package.

Input layout (this project's, see olmoearth/layout.py): x[modality] (B, H, W, T, C) normalised, months (B, T),
optional missing[modality] bool (B, T): True where a whole timestep of that modality is absent.

The original's `Encoder.forward` has three behaviours that matter for a comparison (reference §1.5b):
    "fast"   eval mode, fast_pass=True: no token removal, no attention mask; masks are ignored by attention
             (a MISSING token still attends and is attended to). Its output equals ours only without
             missing tokens.
    "eval"   eval mode, fast_pass=False: MISSING tokens are removed, the batch is padded to the longest
             sample, and the padded slots are NOT masked out of attention (the released evaluations ran
             so). Equals ours only when every sample has the same number of visible tokens.
    "masked" the encoder's own `training` flag set (its submodules stay in eval mode, so no drop-path):
             MISSING tokens are removed and padded slots are masked with a key-padding mask (the training
             path). This is "attention over the visible tokens only", the semantics of this project, and
             the mode parity is judged in when tokens are missing.
"""

from __future__ import annotations

import json
import os

import torch
from olmoearth_pretrain_minimal.model_loader import load_model_from_path
from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn import flexi_vit, searchlight
from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn.flexi_vit import (
    EncoderConfig,
    PoolingType,
    PredictorConfig,
)
from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn.latent_mim import LatentMIMConfig
from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.utils.datatypes import MaskedOlmoEarthSample, MaskValue


def _modalities_in_supported_order(available_modalities: list[str], supported_modality_names: list[str]):
    """The original's get_modalities_to_process returns list(set(supported) & set(available)), whose order
    follows PYTHONHASHSEED; parts of its encoder and predictor pair that list with lists in another order, so
    for a few percent of seeds (e.g. 69 and 79 for the predictor, 122 and 346 for the encoder) one modality's
    outputs come back under another's name. Tests and benches use one fixed order: the supported modalities
    that are available, in supported order (the released models' order when no set reorders it)."""
    available = set(available_modalities)
    return [m for m in supported_modality_names if m in available]


flexi_vit.get_modalities_to_process = _modalities_in_supported_order
searchlight.get_modalities_to_process = _modalities_in_supported_order

# v1 sizes (the original's MODEL_SIZE_ARGS "<size>_shallow_decoder"): enc dim, enc depth, enc heads, dec depth
SIZES = {
    "nano": dict(dim=128, depth=4, heads=8, dec_dim=128, dec_depth=4, dec_heads=8),
    "tiny": dict(dim=192, depth=12, heads=3, dec_dim=192, dec_depth=4, dec_heads=3),
    "base": dict(dim=768, depth=12, heads=12, dec_dim=768, dec_depth=4, dec_heads=12),
    "large": dict(dim=1024, depth=24, heads=16, dec_dim=1024, dec_depth=4, dec_heads=16),
}
V1_MODALITIES = [
    "sentinel2_l2a", "sentinel1", "landsat", "worldcover", "srtm", "openstreetmap_raster",
    "wri_canopy_height_map", "cdl", "worldcereal",
]  # fmt: skip
DECODE_ONLY = V1_MODALITIES[3:]


def original_config(size: str) -> LatentMIMConfig:
    """The v1 LatentMIMConfig of one size, from the original's own config classes."""
    s = SIZES[size]
    encoder = EncoderConfig(
        supported_modality_names=list(V1_MODALITIES),
        embedding_size=s["dim"],
        num_heads=s["heads"],
        depth=s["depth"],
        mlp_ratio=4.0,
        max_patch_size=8,
        min_patch_size=1,
        drop_path=0.1,
        max_sequence_length=12,
        use_linear_patch_embed=False,  # v1 checkpoints hold Conv2d patch projections
    )
    decoder = PredictorConfig(
        supported_modality_names=list(V1_MODALITIES),
        encoder_embedding_size=s["dim"],
        decoder_embedding_size=s["dec_dim"],
        depth=s["dec_depth"],
        mlp_ratio=4.0,
        num_heads=s["dec_heads"],
        max_sequence_length=12,
    )
    return LatentMIMConfig(encoder_config=encoder, decoder_config=decoder)


@torch.no_grad()
def build_original(size: str, seed: int = 0, perturb: bool = True) -> torch.nn.Module:
    """A v1 LatentMIM with random weights. With `perturb`, parameters that the original initialises to
    constants (channel embeddings and mask token at 0, LayerNorms at 1/0, biases at 0) get random values
    too, and the frozen target encoder differs from the online one (as in a trained checkpoint), so that a
    name-mapping mistake on any tensor shows up as a parity failure."""
    torch.manual_seed(seed)
    model = original_config(size).build().eval()
    if perturb:
        perturb_weights(model, seed + 1)
    return model


@torch.no_grad()
def perturb_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values for the parameters the original initialises to constants (channel embeddings and mask
    token at 0, LayerNorms at 1/0, biases at 0) and a small random change to every other one (so a frozen
    target encoder differs from the online one, as in a trained checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "month_embed" in name:  # fixed sin-cos table, not learned
            continue
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight") or ".norm1.weight" in name or ".norm2.weight" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif "channel_embeddings" in name or name.endswith("mask_token"):
            p.copy_(0.5 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.02 * noise)
        else:
            p.add_(0.01 * noise)
    return model


def original_folder_config(size: str) -> dict:
    """config.json content in the original's layout: the model config under "model" (with `_CLASS_` names, as
    the released checkpoints carry them) and the decode-only modalities under the masking config."""
    return {
        "model": original_config(size).as_config_dict(),
        "train_module": {
            "masking_config": {
                "strategy_config": {"type": "modality_cross_random", "only_decode_modalities": DECODE_ONLY}
            }
        },
    }


def write_original_folder(model: torch.nn.Module, size: str, folder: str) -> str:
    """Save `model` as an original checkpoint folder: config.json + weights.pth (the full state dict)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(original_folder_config(size), fh, indent=1)
    torch.save(model.state_dict(), os.path.join(folder, "weights.pth"))
    return folder


def load_original_folder(folder: str) -> torch.nn.Module:
    """Load a folder back through the original's own loader (strict state-dict load)."""
    return load_model_from_path(folder).eval()


def original_sample(
    x: dict[str, torch.Tensor], months: torch.Tensor, missing: dict[str, torch.Tensor] | None = None
) -> MaskedOlmoEarthSample:
    """This project's inputs as the original's MaskedOlmoEarthSample: per-pixel masks (B, H, W, T, S) with
    ONLINE_ENCODER everywhere except MISSING on missing timesteps; timestamps (B, T, 3) = (day, month, year)."""
    from olmoearth.modalities import get_modality

    fields = {}
    B, T = months.shape
    day = torch.ones(B, T, dtype=torch.long)
    year = torch.full((B, T), 2022, dtype=torch.long)
    fields["timestamps"] = torch.stack([day, months.long(), year], dim=-1)  # (B, T, 3)
    for name, v in x.items():
        b, h, w, t, c = v.shape
        S = get_modality(name).num_bandsets
        mask = torch.full((b, h, w, t, S), MaskValue.ONLINE_ENCODER.value, dtype=torch.long)
        if missing is not None and name in missing:
            m = missing[name].bool()[:, None, None, :, None].expand(b, h, w, t, S)
            mask = torch.where(m, torch.full_like(mask, MaskValue.MISSING.value), mask)
        fields[name] = v.float()
        fields[name + "_mask"] = mask
    return MaskedOlmoEarthSample(**fields)


@torch.no_grad()
def original_encode(
    model: torch.nn.Module,
    x: dict[str, torch.Tensor],
    months: torch.Tensor,
    patch_size: int,
    missing: dict[str, torch.Tensor] | None = None,
    mode: str = "fast",
) -> dict:
    """Run the original encoder. Returns {"tokens": {m: (B, h, w, T, S, D)}, "masks": {m: (B, h, w, T, S)},
    "pooled": (B, D) mean of visible tokens, "projected": (B, D) project_and_aggregate}. `mode`: see the
    module docstring ("fast", "eval" or "masked")."""
    encoder = model.encoder if hasattr(model, "encoder") else model
    encoder.eval()
    if mode == "masked":
        encoder.training = True  # only the encoder's own flag: key-padding mask on, drop-path stays off
    elif mode not in ("fast", "eval"):
        raise ValueError(f"unknown mode {mode!r}")
    try:
        sample = original_sample(x, months, missing)
        out = encoder(sample, patch_size=patch_size, fast_pass=(mode == "fast"))
    finally:
        encoder.eval()
    tm = out["tokens_and_masks"]
    tokens = {m: getattr(tm, m) for m in x}
    masks = {m: getattr(tm, m + "_mask") for m in x}
    pooled = tm.pool_unmasked_tokens(PoolingType.MEAN, spatial_pooling=False)
    projected = encoder.project_and_aggregate(tm)
    return {"tokens": tokens, "masks": masks, "pooled": pooled, "projected": projected}


def random_inputs(
    B: int, H: int, T: int, modalities=("sentinel2_l2a", "sentinel1", "landsat"), seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random normalised inputs (roughly the [0, 1] range of real normalised data) and random months."""
    from olmoearth.modalities import get_modality

    g = torch.Generator().manual_seed(seed)
    x = {m: torch.rand(B, H, H, T, get_modality(m).num_bands, generator=g) for m in modalities}
    months = torch.randint(0, 12, (B, T), generator=g)
    return x, months
