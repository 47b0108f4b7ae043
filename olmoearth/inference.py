"""Embeddings from raw imagery: normalise, mask what is missing, encode, pool.

    out = encode(model.encoder, {"sentinel2_l2a": x}, months=m, patch_size=4)
    x: (B, H, W, T, C) raw sensor units (numpy or torch), NaN where missing; m: (B, T) months 0..11
    out.patches: (B, H/p, W/p, D)  per patch: mean over timesteps and bandsets of its visible tokens,
                                   then mean across the modalities that have any (the original's dense
                                   pooling; it averages the missing slots too, we skip them)
    out.pooled:  (B, D)            mean of all visible tokens (the original's classification pooling)
    out.projected: (B, D)          project_and_aggregate (Linear of pooled), as the GEE embedding job
    out.tokens: {m: (B, h, w, T, S, D)}, out.mask: {m: (B, h, w, T, S)}

`pool_patches` is the per-patch pooling alone, with gradients (olmoearth/finetuned.py trains through it).

precision="bf16" runs the encoder under torch.autocast (bf16 matmuls and attention: GPUs, and CPUs with native
bf16 such as AVX512-BF16 / AMX); normalisation, masks and pooling stay fp32, and every output is fp32.
olmoearth/precision.py says what "auto" means (bf16 on CUDA, fp32 elsewhere); training and serving both use it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from olmoearth.layout import ENCODER, MISSING
from olmoearth.modalities import MAX_PATCH_SIZE, MODALITIES
from olmoearth.precision import autocast, resolve_precision


class Embeddings(NamedTuple):
    patches: torch.Tensor
    pooled: torch.Tensor
    projected: torch.Tensor
    tokens: dict
    mask: dict


def prepare(encoder, x: dict, months, patch_size: int):
    """Validate, normalise and mask raw inputs -> (x normalised with 0 for missing, months, mask)."""
    if not isinstance(x, dict) or not x:
        raise ValueError("encode: x must be a non-empty dict {modality: (B, H, W, T, C) array}")
    if not isinstance(patch_size, (int, np.integer)) or not 1 <= int(patch_size) <= MAX_PATCH_SIZE:
        raise ValueError(f"encode: patch_size must be an integer in 1..{MAX_PATCH_SIZE}, got {patch_size!r}")
    p = int(patch_size)
    device = next(encoder.parameters()).device
    months_t = torch.as_tensor(np.asarray(months) if not torch.is_tensor(months) else months).long().to(device)
    xs, masks, shape = {}, {}, None
    for name, arr in x.items():
        if name not in MODALITIES:
            raise ValueError(f"encode: unknown modality {name!r}; known: {', '.join(MODALITIES)}")
        mod = MODALITIES[name]
        if not mod.encoder_input:
            raise ValueError(f"encode: {name!r} is a decode-only map; the encoder takes "
                             f"{', '.join(n for n, m in MODALITIES.items() if m.encoder_input)}")
        t = torch.as_tensor(arr).to(device=device, dtype=torch.float32)
        if t.ndim != 5 or t.shape[-1] != mod.num_bands:
            raise ValueError(f"encode: {name} must be (B, H, W, T, {mod.num_bands}) in band order "
                             f"{list(mod.bands)}, got shape {tuple(t.shape)}")
        B, H, W, T, _ = t.shape
        if H % p or W % p:
            raise ValueError(f"encode: {name} size {H}x{W} is not a multiple of patch_size {p}")
        if shape is not None and (B, H, W) != shape:
            raise ValueError(f"encode: {name} has (B, H, W) = {(B, H, W)}, other modalities {shape}")
        shape = (B, H, W)
        if months_t.ndim != 2 or months_t.shape[0] != B or months_t.shape[1] < T:
            raise ValueError(f"encode: months must be (B={B}, T={T}), got {tuple(months_t.shape)}")
        if bool(((months_t < 0) | (months_t > 11)).any()):
            raise ValueError("encode: months must be month indices 0..11")
        t = encoder.norm_stats.normalise(name, t)
        finite = torch.isfinite(t).reshape(B, H // p, p, W // p, p, T, mod.num_bands).all(2).all(3)
        present = torch.stack([finite[..., sl].all(-1) for sl in mod.bandset_slices()], -1)  # (B, h, w, T, S)
        masks[name] = torch.where(present, ENCODER, MISSING).to(torch.int8)
        xs[name] = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
    return xs, months_t, masks


@torch.no_grad()
def encode(encoder, x: dict, months, patch_size: int = 4, precision: str = "fp32") -> Embeddings:
    xs, months_t, masks = prepare(encoder, x, months, patch_size)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        with autocast(device, resolve_precision(precision, device)):
            out = encoder(xs, months_t, masks, int(patch_size))
    finally:
        encoder.train(was_training)
    tokens = {m: t.float() for m, t in out.tokens.items()}
    return Embeddings(pool_patches(tokens, masks), out.pooled.float(), out.projected.float(), tokens, masks)


def pool_patches(tokens: dict, masks: dict) -> torch.Tensor:
    """Per-patch features of an encoder output, differentiable (encode and the fine-tuned model share it):
    tokens {m: (B, h, w, T, S, D)}, masks {m: (B, h, w, T, S)} -> (B, h, w, D), the mean over timesteps and
    bandsets of each modality's visible tokens, then the mean across the modalities with any at the patch."""
    sums, counts = 0, 0
    for name, tok in tokens.items():  # (B, h, w, T, S, D)
        vis = (masks[name] == ENCODER).to(tok.dtype)[..., None]
        s = (tok * vis).sum(dim=(3, 4))  # (B, h, w, D)
        n = vis.sum(dim=(3, 4))  # (B, h, w, 1)
        has = (n > 0).to(tok.dtype)
        sums = sums + s / n.clamp(min=1)  # per-modality mean over time and bandsets
        counts = counts + has
    return sums / counts.clamp(min=1)  # mean across modalities with data at the patch
