"""Features of labelled chips: a frozen encoder's embeddings, or the raw-band baseline.

Feature sources (each a small dict, so Ray can ship it to actors):
    {"kind": "checkpoint", "uri": "s3://.../encoder.safetensors"}   a trained encoder (any source olmoearth.load takes)
    {"kind": "random", "size": "nano", "seed": 0, "overrides": {}}  a randomly initialised encoder
                                                                    (overrides: ModelConfig fields)
    {"kind": "band_stats"}                                          per-band mean and std of the chip
    {"kind": "encoder", "encoder": <nn.Module>}                     in-process only (the training hook)

Pooling: "mean" = the encoder's pooled output (mean over all tokens: space, time, bandsets, modalities,
as the original's kNN embeddings); "max" = max over space of the per-patch embeddings. dense=True keeps
the per-patch map (B, H/p, W/p, D) for segmentation (mean over time/bandsets/modalities per patch)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from olmoearth.modalities import ENCODER_MODALITIES, MODALITIES, NormStats


def load_source(spec: dict):
    """A feature source spec -> an encoder module in eval mode (or None for band_stats)."""
    kind = spec["kind"]
    if kind == "band_stats":
        return None
    if kind == "encoder":
        return spec["encoder"]
    if kind == "checkpoint":
        import olmoearth

        return olmoearth.load(spec["uri"])
    if kind == "random":
        from olmoearth.loading import random_model

        return random_model(spec.get("size", "nano"), int(spec.get("seed", 0)), **spec.get("overrides", {})).encoder
    raise ValueError(f"unknown feature source kind {kind!r} (checkpoint, random, band_stats)")


def encoder_shape(encoder) -> dict:
    """ModelConfig overrides that rebuild `encoder`'s architecture (for a random twin of the same size)."""
    out = {"encoder_dim": int(encoder.embedding_dim), "encoder_depth": len(encoder.blocks),
           "encoder_heads": int(encoder.blocks[0].attn.num_heads) if len(encoder.blocks) else 1}
    if hasattr(encoder, "modalities"):
        out["modalities"] = list(encoder.modalities)
    return out


@torch.no_grad()
def encoder_features(encoder, x: dict[str, np.ndarray], months: np.ndarray, patch_size: int = 4,
                     pooling: str = "mean", dense: bool = False) -> np.ndarray:
    """x: {modality: (B, H, W, T, C)} raw units, NaN missing; months (B, T).
    Returns (B, D), or (B, H/p, W/p, D) when dense."""
    from olmoearth import encode

    was_training = encoder.training
    encoder.eval()
    try:
        xt = {m: torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32)
              for m, v in x.items() if m in ENCODER_MODALITIES}
        out = encode(encoder, xt, months=torch.as_tensor(months, dtype=torch.long), patch_size=patch_size)
    finally:
        encoder.train(was_training)
    if dense:
        return out.patches.float().numpy()  # (B, h, w, D)
    if pooling == "mean":
        return out.pooled.float().numpy()  # (B, D)
    if pooling == "max":
        return out.patches.float().amax(dim=(1, 2)).numpy()  # (B, D)
    raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}")


_NORM = None


def band_stat_features(x: dict[str, np.ndarray], patch_size: int = 4, dense: bool = False) -> np.ndarray:
    """The raw-band baseline: per band, the mean and std of the normalised chip over space and time
    (bands with no data give 0). x: {modality: (B, H, W, T, C)} -> (B, 2C) or, dense, per p x p patch
    (B, H/p, W/p, 2C). Modalities in registry order."""
    global _NORM
    _NORM = _NORM or NormStats.default()
    present = [n for n in ENCODER_MODALITIES if n in x]
    if not present:
        raise ValueError(f"band_stats: no encoder modality in the chip (got {sorted(x)})")
    B, H, W = np.asarray(x[present[0]]).shape[:3]
    lead = (B, H // patch_size, W // patch_size) if dense else (B,)
    feats = []
    for name in ENCODER_MODALITIES:
        if name not in x:  # an absent modality: zeros, so every chip has the same feature layout
            zeros = np.zeros((*lead, MODALITIES[name].num_bands), np.float32)
            feats += [zeros, zeros]
            continue
        v = _NORM.normalise(name, np.asarray(x[name], np.float32))  # (B, H, W, T, C)
        if dense:
            B, H, W, T, C = v.shape
            p = patch_size
            v = v[:, : H // p * p, : W // p * p].reshape(B, H // p, p, W // p, p, T, C)
            v = v.transpose(0, 1, 3, 2, 4, 5, 6).reshape(B, H // p, W // p, p * p * T, C)
            axis = 3
        else:
            v = v.reshape(v.shape[0], -1, v.shape[-1])  # (B, H*W*T, C)
            axis = 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bands -> 0 below
            mean, std = np.nanmean(v, axis=axis), np.nanstd(v, axis=axis)
        feats += [np.nan_to_num(mean), np.nan_to_num(std)]
    return np.concatenate(feats, axis=-1).astype(np.float32)


def chip_features(sources: dict[str, object], x: dict[str, np.ndarray], months: np.ndarray, patch_size: int,
                  pooling: str, dense: bool) -> dict[str, np.ndarray]:
    """Features of one batch from every loaded source ({name: encoder module or None for band_stats})."""
    out = {}
    for name, enc in sources.items():
        if enc is None:
            out[name] = band_stat_features(x, patch_size, dense)
        else:
            out[name] = encoder_features(enc, x, months, patch_size, pooling, dense)
    return out
