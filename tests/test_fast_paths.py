"""Every fast path of the encoder equals the reference path it replaces (float32).

The eval forward encodes the visible tokens without padding (Encoder.encode_unpadded: sequences back to
back, one unmasked attention per sample); the reference is the padded batch with its key-padding mask
(Encoder.encode_padded, which training still runs). Checked on random and real inputs, with and without
padding, with missing timesteps, a missing modality and a sample with nothing visible.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from olmoearth import build_model  # noqa: E402
from olmoearth import tokens as tk  # noqa: E402
from olmoearth.attention import Attention, Block  # noqa: E402
from olmoearth.layout import DECODER, ENCODER, IGNORED, MISSING  # noqa: E402
from olmoearth.modalities import MODALITIES, NormStats  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODS = ("sentinel2_l2a", "sentinel1", "landsat")
ATOL = 1e-5  # float32: the two paths differ only in summation order


def small_encoder(seed=0):
    torch.manual_seed(seed)
    enc = build_model("nano", encoder_depth=2).encoder.eval()
    with torch.no_grad():  # non-zero channel embeddings, so a token placed at the wrong slot shows
        for p in enc.composite_encodings.per_modality_channel_embeddings.values():
            p.normal_()
    return enc


def full_masks(B, H, T, p, mods=MODS):
    return {n: torch.full((B, H // p, H // p, T, MODALITIES[n].num_bandsets), ENCODER, dtype=torch.int8)
            for n in mods}


def random_x(B, H, T, mods=MODS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(B, H, H, T, MODALITIES[n].num_bands, generator=g) for n in mods}


def both_paths(enc, x, months, masks, p, monkeypatch):
    """(fast output, reference output) of the same encoder on the same inputs."""
    with torch.no_grad():
        fast = enc(x, months, masks, p)
        with monkeypatch.context() as m:
            m.setattr(enc, "encode_unpadded", enc.encode_padded)
            ref = enc(x, months, masks, p)
    return fast, ref


def assert_same(fast, ref, atol=ATOL):
    assert fast.tokens.keys() == ref.tokens.keys()
    for n in ref.tokens:
        torch.testing.assert_close(fast.tokens[n], ref.tokens[n], atol=atol, rtol=0)
        assert torch.equal(fast.mask[n], ref.mask[n])
    torch.testing.assert_close(fast.pooled, ref.pooled, atol=atol, rtol=0)
    torch.testing.assert_close(fast.projected, ref.projected, atol=atol, rtol=0)


def visible_counts(masks):
    return torch.stack([(m == ENCODER).flatten(1).sum(1) for m in masks.values()]).sum(0).tolist()


@pytest.mark.parametrize("p", [4, 1])
def test_unpadded_equals_padded_without_missing_tokens(p, monkeypatch):
    enc = small_encoder()
    H, T = 2 * p if p > 1 else 3, 12
    x, months = random_x(2, H, T), torch.randint(0, 12, (2, T))
    masks = full_masks(2, H, T, p)
    assert len(set(visible_counts(masks))) == 1  # equal lengths: the batched, unmasked branch
    assert_same(*both_paths(enc, x, months, masks, p, monkeypatch))


@pytest.mark.parametrize("p", [4, 1])
def test_unpadded_equals_padded_with_missing_timesteps_and_modalities(p, monkeypatch):
    enc = small_encoder(1)
    B, T = 4, 12
    H = 2 * p if p > 1 else 3
    x, months = random_x(B, H, T, seed=1), torch.randint(0, 12, (B, T))
    masks = full_masks(B, H, T, p)
    masks["sentinel2_l2a"][0, :, :, 3] = MISSING  # one missing month
    masks["sentinel2_l2a"][1, ..., 2] = MISSING  # one bandset missing everywhere
    masks["landsat"][1] = MISSING  # a whole modality missing
    masks["sentinel1"][2, 0, 0, 5:] = MISSING  # some patches of some months
    counts = visible_counts(masks)
    assert len(set(counts)) > 1 and min(counts) > 0  # padding in the reference path
    fast, ref = both_paths(enc, x, months, masks, p, monkeypatch)
    assert_same(fast, ref)
    # what is not encoded comes back as zeros in both
    hidden = masks["landsat"][1] != ENCODER
    assert (fast.tokens["landsat"][1][hidden] == 0).all()


def test_unpadded_equals_padded_with_random_view_masks_and_an_empty_sample(monkeypatch):
    enc = small_encoder(2)
    B, H, T, p = 5, 8, 6, 4
    x, months = random_x(B, H, T, seed=2), torch.randint(0, 12, (B, T))
    g = torch.Generator().manual_seed(2)
    roles = torch.tensor([ENCODER, IGNORED, DECODER, MISSING], dtype=torch.int8)
    masks = {n: roles[torch.randint(0, 4, m.shape, generator=g)] for n, m in full_masks(B, H, T, p).items()}
    for m in masks.values():
        m[3] = DECODER  # sample 3: nothing visible
    counts = visible_counts(masks)
    assert counts[3] == 0 and len(set(counts)) > 2
    fast, ref = both_paths(enc, x, months, masks, p, monkeypatch)
    assert_same(fast, ref)
    assert (fast.pooled[3] == 0).all()
    nothing = {n: torch.full_like(m, MISSING) for n, m in masks.items()}  # no sample has a visible token
    fast, ref = both_paths(enc, x, months, nothing, p, monkeypatch)
    assert_same(fast, ref)
    assert (fast.pooled == 0).all()


def test_unpadded_equals_padded_on_real_sentinel2(monkeypatch):
    from test_encode_real import _read_crop

    crop, _, _ = _read_crop()  # (64, 64, 12) real Sentinel-2, raw units
    enc = small_encoder(3)
    T, p = 3, 4
    raw = np.stack([crop[None, :32, :32], crop[None, 32:, 32:]])  # two samples (2, 1, 32, 32, 12)
    raw = np.repeat(raw.transpose(0, 2, 3, 1, 4), T, axis=3)  # (2, 32, 32, T, 12)
    x = {"sentinel2_l2a": torch.from_numpy(NormStats.default().normalise("sentinel2_l2a", raw)).float()}
    masks = full_masks(2, 32, T, p, mods=("sentinel2_l2a",))
    masks["sentinel2_l2a"][1, :, :, 0] = MISSING  # the second sample lacks its first month
    months = torch.tensor([[5, 6, 7], [5, 6, 7]])
    fast, ref = both_paths(enc, x, months, masks, p, monkeypatch)
    assert_same(fast, ref)


def test_attention_over_back_to_back_sequences_equals_the_masked_padded_batch():
    torch.manual_seed(0)
    attn = Attention(64, 4).eval()
    lengths = [7, 3, 12]
    L, D = max(lengths), 64
    padded = torch.randn(len(lengths), L, D)
    valid = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    with torch.no_grad():
        ref = attn(padded, key_mask=valid)  # (B, L, D)
        flat = padded[valid][None]  # (1, K, D)
        fast = attn(flat, seq_lengths=lengths)[0]  # (K, D)
    torch.testing.assert_close(fast, ref[valid], atol=1e-6, rtol=0)
    # each sequence attends only within itself: changing one leaves the others alone
    flat2 = flat.clone()
    flat2[0, :7] += 1.0
    with torch.no_grad():
        fast2 = attn(flat2, seq_lengths=lengths)[0]
    assert not torch.allclose(fast2[:7], fast[:7])
    torch.testing.assert_close(fast2[7:], fast[7:], atol=0, rtol=0)


def test_seq_lengths_refused_where_they_would_change_the_math():
    attn = Attention(32, 2)
    x = torch.randn(1, 10, 32)
    with pytest.raises(ValueError, match="seq_lengths"):
        attn(x, seq_lengths=[4, 5])  # does not sum to N
    with pytest.raises(ValueError, match="seq_lengths"):
        attn(x.expand(2, -1, -1), seq_lengths=[4, 6])  # not one row
    with pytest.raises(ValueError, match="seq_lengths"):
        attn(x, key_mask=torch.ones(1, 10, dtype=torch.bool), seq_lengths=[4, 6])
    blk = Block(32, 2, drop_path=0.1).train()
    with pytest.raises(ValueError, match="drop path"):
        blk(x, seq_lengths=[4, 6])


def test_select_place_segment_mean_equal_pack_unpack_masked_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 5, generator=g)
    keep = torch.rand(4, 9, generator=g) > 0.5
    keep[2] = False  # an empty sample
    flat, lengths = tk.select(x, keep)
    packed, idx, valid = tk.pack(x, keep)
    assert lengths == keep.sum(1).tolist()
    assert torch.equal(flat, packed[valid])  # same tokens in the same order
    torch.testing.assert_close(tk.place(flat, keep), tk.unpack(packed, idx, valid, 9), atol=0, rtol=0)
    torch.testing.assert_close(tk.segment_mean(flat, lengths), tk.masked_mean(packed, valid),
                               atol=1e-6, rtol=0)
    assert (tk.segment_mean(flat, lengths)[2] == 0).all()


def test_training_and_original_eval_mode_keep_the_padded_path(monkeypatch):
    enc = small_encoder(4)
    x, months = random_x(2, 8, 2, seed=4), torch.randint(0, 12, (2, 2))
    masks = full_masks(2, 8, 2, 4)
    masks["sentinel2_l2a"][0, :, :, 1] = MISSING
    calls = []
    monkeypatch.setattr(enc, "encode_unpadded", lambda *a: calls.append(a) or enc.encode_padded(*a))
    with torch.no_grad():
        enc(x, months, masks, 4)
        assert len(calls) == 1
        enc.train()
        enc(x, months, masks, 4)  # drop path is per sample: padded batch
        enc.eval()
        enc.mask_padding_in_eval = False
        unmasked = enc(x, months, masks, 4)  # the original's eval mode attends to padding
    assert len(calls) == 1
    enc.mask_padding_in_eval = True
    monkeypatch.undo()
    with torch.no_grad():
        masked = enc(x, months, masks, 4)
    assert not torch.allclose(unmasked.pooled[0], masked.pooled[0], atol=1e-4)
