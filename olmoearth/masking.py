"""Masking by bandset (`modality_cross_random`), per sample, in numpy, so data workers can run it.

    present = token_presence(x_sample, patch_size)                  # {modality: bool (h, w, T, S)}
    mask = modality_cross_random(present, np.random.default_rng())  # {modality: int8 (h, w, T, S)}

Mask values are those of `olmoearth.layout` (ENCODER, IGNORED, DECODER, MISSING). Decode-only modalities
(the maps) are never ENCODER. The recipe is the original's own code (train/masking.py of olmoearth-pretrain,
reference section 3.4; tests/test_objective_parity.py compares the two over many draws):

1. a base random mask per modality: its whole token grid (missing tokens included, as the original) is
   shuffled and split encode_ratio / decode_ratio (ENCODER / DECODER; the rest IGNORED), then missing
   tokens become MISSING;
2. the candidate bandsets: a sensor bandset that got at least one ENCODER token in the base mask, and every
   bandset of a present map; a number of encoded bandsets is drawn uniformly from
   [min(min_encoded_bandsets, n_encodable), n_encodable] among the encodable candidates, and a number of
   decoded bandsets uniformly from [1, n_candidates] among all candidates (maps included);
3. per bandset of a modality having a candidate: not encoded -> its ENCODER tokens become IGNORED and it KEEPS
   its DECODER tokens, whether drawn for decoding or not; encoded but not drawn for decoding -> its DECODER
   tokens become IGNORED; encoded and drawn keeps its base split. So every present map and every
   non-encoded sensor bandset is decoded in every view; the decoded draw matters for encoded bandsets only;
4. special cases as the original: 1 candidate -> it is encoded, nothing drawn for decoding; 2 candidates ->
   the first is encoded and the second drawn for decoding. A sample left with no ENCODER or no DECODER token
   gets a fresh random split of the present tokens of its sensor modalities (maps keep their mask).

One deliberate difference: with 2 candidates the original encodes the first in its modality order even when
that is a map (its encoder would then see map tokens); here a map is never encoded, so the sensor is (and
a sample whose only encoded tokens would be map tokens gets the fallback split).
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


def _split(n: int, encode_ratio: float, decode_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """n roles, int(n * encode_ratio) ENCODER and int(n * decode_ratio) DECODER, the rest IGNORED, shuffled."""
    n_enc, n_dec = int(n * encode_ratio), int(n * decode_ratio)
    roles = np.full(n, IGNORED, dtype=np.int8)
    roles[:n_enc] = ENCODER
    roles[n_enc : n_enc + n_dec] = DECODER
    return rng.permutation(roles)


def random_mask(
    present: dict[str, np.ndarray], rng: np.random.Generator, encode_ratio: float, decode_ratio: float
) -> dict[str, np.ndarray]:
    """The base mask: per modality, split its whole token grid ENCODER / DECODER / IGNORED, then mark the
    missing tokens MISSING (the original splits before marking, so missing tokens take their share)."""
    out = {}
    for name, pres in present.items():
        pres = np.asarray(pres, dtype=bool)
        mask = _split(pres.size, encode_ratio, decode_ratio, rng).reshape(pres.shape)
        mask[~pres] = MISSING
        out[name] = mask
    return out


def _refill(mask: dict[str, np.ndarray], rng: np.random.Generator, encode_ratio: float,
            decode_ratio: float) -> dict[str, np.ndarray]:
    """The original's fallback: a fresh split of the present tokens of every sensor modality (a single
    present token is encoded); maps keep their mask."""
    out = {}
    for name, m in mask.items():
        m = m.copy()
        if get_modality(name).encoder_input:
            idx = np.flatnonzero(m != MISSING)
            if len(idx) == 1:
                m.reshape(-1)[idx] = ENCODER
            else:
                m.reshape(-1)[idx] = _split(len(idx), encode_ratio, decode_ratio, rng)
        out[name] = m
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


def _check(present: dict[str, np.ndarray], encode_ratio: float, decode_ratio: float) -> None:
    if encode_ratio < 0 or decode_ratio < 0 or encode_ratio + decode_ratio > 1:
        raise ValueError(f"encode_ratio {encode_ratio} + decode_ratio {decode_ratio} must lie in [0, 1]")
    for name, pres in present.items():
        mod = get_modality(name)
        if np.ndim(pres) != 4 or np.shape(pres)[-1] != mod.num_bandsets:
            raise ValueError(
                f"modality_cross_random: presence of {name} must be (h, w, T, {mod.num_bandsets}), "
                f"got shape {np.shape(pres)}"
            )


def candidates(base: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    """(modality, bandset) pairs that take part in the draw, in model order: a sensor bandset with an
    ENCODER token in the base mask, every bandset of a map that is not wholly missing."""
    out = []
    for name, m in base.items():
        is_map = not get_modality(name).encoder_input
        if is_map and bool((m == MISSING).all()):
            continue
        out += [(name, s) for s in range(m.shape[-1]) if is_map or bool((m[..., s] == ENCODER).any())]
    return out


def draw_bandsets(pairs: list[tuple[str, int]], rng: np.random.Generator, min_encoded_bandsets: int
                  ) -> tuple[set, set]:
    """(encoded set, drawn-for-decoding set) of one sample, as the original's select_encoded_decoded_bandsets
    with allow_encoding_decoding_same_bandset=True."""
    if len(pairs) == 1:
        return {pairs[0]}, set()
    if len(pairs) == 2:
        first, second = pairs
        if not get_modality(first[0]).encoder_input and get_modality(second[0]).encoder_input:
            first, second = second, first  # a map is never encoded (see the module docstring)
        return {first}, {second}
    encodable = [(n, s) for n, s in pairs if get_modality(n).encoder_input]
    lo = min(min_encoded_bandsets, len(encodable))
    n_enc = int(rng.integers(lo, len(encodable) + 1))
    n_dec = int(rng.integers(1, len(pairs) + 1))
    enc_set = {encodable[i] for i in rng.choice(len(encodable), n_enc, replace=False)}
    dec_set = {pairs[i] for i in rng.choice(len(pairs), n_dec, replace=False)}
    return enc_set, dec_set


def apply_bandset_rules(base: dict[str, np.ndarray], pairs: list[tuple[str, int]], enc_set: set, dec_set: set
                        ) -> dict[str, np.ndarray]:
    """Step 3 of the module docstring; a modality with no candidate bandset keeps its base mask."""
    involved = {n for n, _ in pairs}
    out = {}
    for name, m in base.items():
        m = m.copy()
        if name in involved:
            for s in range(m.shape[-1]):
                ms = m[..., s]  # a view
                if (name, s) not in enc_set:
                    ms[ms == ENCODER] = IGNORED
                elif (name, s) not in dec_set:
                    ms[ms == DECODER] = IGNORED
        out[name] = m
    return out


def modality_cross_random(
    present: dict[str, np.ndarray],
    rng: np.random.Generator,
    encode_ratio: float = 0.5,
    decode_ratio: float = 0.5,
    min_encoded_bandsets: int = 2,
) -> dict[str, np.ndarray]:
    """present: {modality: bool (h, w, T, S)} for one sample -> {modality: int8 (h, w, T, S)} mask."""
    _check(present, encode_ratio, decode_ratio)
    base = random_mask(present, rng, encode_ratio, decode_ratio)
    pairs = candidates(base)
    out = base
    if pairs:
        out = apply_bandset_rules(base, pairs, *draw_bandsets(pairs, rng, min_encoded_bandsets))
    out = _never_encode_maps(out)
    n_enc_tok, n_dec_tok = _counts(out)
    if n_enc_tok == 0 or n_dec_tok == 0:
        out = _never_encode_maps(_refill(out, rng, encode_ratio, decode_ratio))
    return out


def mask_batch(
    presents: list[dict[str, np.ndarray]], rng: np.random.Generator, **kwargs
) -> dict[str, np.ndarray]:
    """Mask every sample of a batch independently and stack: {modality: int8 (B, h, w, T, S)}."""
    masks = [modality_cross_random(p, rng, **kwargs) for p in presents]
    return {name: np.stack([m[name] for m in masks]) for name in masks[0]}
