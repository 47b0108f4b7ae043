"""Masking by bandset (`modality_cross_random`), per sample, in numpy, so data workers can run it.

    present = token_presence(x_sample, patch_size)                  # {modality: bool (h, w, T, S)}
    mask = modality_cross_random(present, np.random.default_rng())  # {modality: int8 (h, w, T, S)}

Mask values are those of `olmoearth.layout` (ENCODER, IGNORED, DECODER, MISSING). Decode-only modalities
(the maps) are never ENCODER. The recipe is the original's (reference section 3.4):

1. a base random mask per modality: its present tokens are shuffled and split encode_ratio / decode_ratio
   (ENCODER / DECODER; the rest, if the ratios sum below 1, IGNORED);
2. the present (modality, bandset) pairs are listed; a number of encoded bandsets is drawn uniformly from
   [min(min_encoded_bandsets, n_encodable), n_encodable] among the present encodable ones, and a number of
   decoded bandsets uniformly from [1, n_present] among all present ones (maps included);
3. a bandset chosen for both keeps its base split; encode-only: its DECODER tokens become IGNORED;
   decode-only: its ENCODER tokens become IGNORED; chosen for neither: all IGNORED;
4. special cases as the original: 1 present bandset -> plain random; 2 present -> the first is encoded and
   the second decoded; a sample left with no ENCODER or no DECODER token falls back to the plain random mask.
"""

from __future__ import annotations

import numpy as np

from olmoearth.layout import DECODER, ENCODER, IGNORED, MISSING
from olmoearth.modalities import get_modality


def token_presence(x: dict[str, np.ndarray], patch_size: int) -> dict[str, np.ndarray]:
    """x: {modality: (H, W, T, C) float, NaN where missing} -> {modality: bool (H/p, W/p, T, S)}.

    A token is present iff every pixel of every band of its bandset inside the patch is finite."""
    p = int(patch_size)
    out = {}
    for name, arr in x.items():
        mod = get_modality(name)
        arr = np.asarray(arr)
        if arr.ndim != 4 or arr.shape[-1] != mod.num_bands:
            raise ValueError(
                f"token_presence: {name} must be (H, W, T, {mod.num_bands}), got shape {tuple(arr.shape)}"
            )
        H, W, T, _ = arr.shape
        if H % p or W % p:
            raise ValueError(f"token_presence: {name} size {H}x{W} is not a multiple of patch size {p}")
        finite = np.isfinite(arr).reshape(H // p, p, W // p, p, T, mod.num_bands)
        finite = finite.all(axis=(1, 3))  # (h, w, T, C)
        out[name] = np.stack([finite[..., sl].all(axis=-1) for sl in mod.bandset_slices()], axis=-1)
    return out


def random_mask(
    present: dict[str, np.ndarray], rng: np.random.Generator, encode_ratio: float, decode_ratio: float
) -> dict[str, np.ndarray]:
    """The base mask: per modality, shuffle the present tokens and split them ENCODER / DECODER / IGNORED."""
    out = {}
    for name, pres in present.items():
        pres = np.asarray(pres, dtype=bool)
        mask = np.full(pres.shape, MISSING, dtype=np.int8)
        idx = np.flatnonzero(pres)
        n = len(idx)
        n_enc, n_dec = int(n * encode_ratio), int(n * decode_ratio)
        roles = np.full(n, IGNORED, dtype=np.int8)
        roles[:n_enc] = ENCODER
        roles[n_enc : n_enc + n_dec] = DECODER
        flat = mask.reshape(-1)
        flat[idx] = rng.permutation(roles)
        out[name] = mask
    return out


def _never_encode_maps(mask: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for name, m in mask.items():
        if not get_modality(name).encoder_input:
            m[m == ENCODER] = IGNORED
    return mask


def _counts(mask: dict[str, np.ndarray]) -> tuple[int, int]:
    n_enc = sum(int((m == ENCODER).sum()) for m in mask.values())
    n_dec = sum(int((m == DECODER).sum()) for m in mask.values())
    return n_enc, n_dec


def modality_cross_random(
    present: dict[str, np.ndarray],
    rng: np.random.Generator,
    encode_ratio: float = 0.5,
    decode_ratio: float = 0.5,
    min_encoded_bandsets: int = 2,
) -> dict[str, np.ndarray]:
    """present: {modality: bool (h, w, T, S)} for one sample -> {modality: int8 (h, w, T, S)} mask."""
    if encode_ratio < 0 or decode_ratio < 0 or encode_ratio + decode_ratio > 1:
        raise ValueError(f"encode_ratio {encode_ratio} + decode_ratio {decode_ratio} must lie in [0, 1]")
    for name, pres in present.items():
        mod = get_modality(name)
        if np.ndim(pres) != 4 or np.shape(pres)[-1] != mod.num_bandsets:
            raise ValueError(
                f"modality_cross_random: presence of {name} must be (h, w, T, {mod.num_bandsets}), "
                f"got shape {np.shape(pres)}"
            )
    base = random_mask(present, rng, encode_ratio, decode_ratio)

    # present (modality, bandset) pairs in model order
    pairs = [(n, s) for n, pres in present.items() for s in range(np.shape(pres)[-1]) if np.any(pres[..., s])]
    encodable = [(n, s) for n, s in pairs if get_modality(n).encoder_input]
    if len(pairs) <= 1 or not encodable:
        return _never_encode_maps(base)
    if len(pairs) == 2:
        enc_set, dec_set = {pairs[0]}, {pairs[1]}
        if not get_modality(pairs[0][0]).encoder_input:  # keep maps decode-only
            enc_set, dec_set = {pairs[1]}, {pairs[0]}
    else:
        lo = min(min_encoded_bandsets, len(encodable))
        n_enc = int(rng.integers(lo, len(encodable) + 1))
        n_dec = int(rng.integers(1, len(pairs) + 1))
        enc_set = {encodable[i] for i in rng.choice(len(encodable), n_enc, replace=False)}
        dec_set = {pairs[i] for i in rng.choice(len(pairs), n_dec, replace=False)}

    out = {}
    for name, m in base.items():
        m = m.copy()
        for s in range(m.shape[-1]):
            ms = m[..., s]  # a view
            if (name, s) not in enc_set:
                ms[ms == ENCODER] = IGNORED
            if (name, s) not in dec_set:
                ms[ms == DECODER] = IGNORED
        out[name] = m
    out = _never_encode_maps(out)
    n_enc_tok, n_dec_tok = _counts(out)
    if n_enc_tok == 0 or n_dec_tok == 0:  # the original's refill: a plain random mask
        return _never_encode_maps(base)
    return out


def mask_batch(
    presents: list[dict[str, np.ndarray]], rng: np.random.Generator, **kwargs
) -> dict[str, np.ndarray]:
    """Mask every sample of a batch independently and stack: {modality: int8 (B, h, w, T, S)}."""
    masks = [modality_cross_random(p, rng, **kwargs) for p in presents]
    return {name: np.stack([m[name] for m in masks]) for name in masks[0]}
