"""Every fast path of the encoder and decoder equals the reference path it replaces (float32).

The encoder runs the visible tokens without padding in training and eval (Encoder.encode_unpadded: sequences
back to back, one unmasked attention per sample); the reference is the padded batch with its key-padding mask
(Encoder.encode_padded). The decoder's queries and context run back to back too (Decoder.forward); its
reference is Decoder.forward_padded. Checked on random and real inputs, with and without padding, with
missing timesteps, a missing modality, samples with nothing visible or nothing decoded; in training on
outputs, losses and the gradient of every parameter, and with drop path, whose one draw per sample must drop
or keep a sample whole and match the padded batch's draws.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_model import make_batch  # noqa: E402

from olmoearth import build_model  # noqa: E402
from olmoearth import tokens as tk  # noqa: E402
from olmoearth.attention import Attention, DropPath  # noqa: E402
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
    y = torch.randn(1, 7, 32)
    with pytest.raises(ValueError, match="seq_lengths"):
        attn(x, y, seq_lengths=[4, 6])  # cross-attention without key_lengths
    with pytest.raises(ValueError, match="seq_lengths"):
        attn(x, y, seq_lengths=[4, 6], key_lengths=[7])  # not one key sequence per query sequence
    with pytest.raises(ValueError, match="seq_lengths"):
        attn(x, y, seq_lengths=[4, 6], key_lengths=[3, 3])  # does not sum to M
    with pytest.raises(ValueError, match="seq_lengths"):
        attn(x, seq_lengths=[4, 6], key_lengths=[4, 6])  # key_lengths without keys


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


def test_only_the_original_eval_mode_keeps_the_padded_path(monkeypatch):
    enc = small_encoder(4)
    x, months = random_x(2, 8, 2, seed=4), torch.randint(0, 12, (2, 2))
    masks = full_masks(2, 8, 2, 4)
    masks["sentinel2_l2a"][0, :, :, 1] = MISSING
    calls = []
    monkeypatch.setattr(enc, "encode_padded", lambda *a: calls.append(a) or type(enc).encode_padded(enc, *a))
    with torch.no_grad():
        enc(x, months, masks, 4)
        enc.train()
        enc(x, months, masks, 4)  # training: back to back too (drop path draws per sample)
        enc.mask_padding_in_eval = False
        enc(x, months, masks, 4)  # training always masks the padding: the flag is about eval
        assert not calls
        enc.eval()
        unmasked = enc(x, months, masks, 4)  # the original's eval mode attends to padding
    assert len(calls) == 1
    enc.mask_padding_in_eval = True
    monkeypatch.undo()
    with torch.no_grad():
        masked = enc(x, months, masks, 4)
    assert not torch.allclose(unmasked.pooled[0], masked.pooled[0], atol=1e-4)


# ------------------------------------------------------------------------------------------ training
def random_roles(B, H, T, p, seed, empty=()):
    """Random ENCODER / IGNORED / DECODER / MISSING masks; samples in `empty` have nothing visible."""
    g = torch.Generator().manual_seed(seed)
    roles = torch.tensor([ENCODER, IGNORED, DECODER, MISSING], dtype=torch.int8)
    masks = {n: roles[torch.randint(0, 4, m.shape, generator=g)] for n, m in full_masks(B, H, T, p).items()}
    for m in masks.values():
        for i in empty:
            m[i][m[i] == ENCODER] = DECODER
    return masks


def training_masks(kind, B, H, T, p):
    if kind == "all_visible":
        return full_masks(B, H, T, p)
    return random_roles(B, H, T, p, seed=5, empty=(1, 3) if kind == "some_empty" else ())


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(fast, ref, absent_is_zero=False):
    """Same gradient for every parameter, to ATOL relative to that parameter's largest entry (the sums over
    thousands of tokens differ in order). absent_is_zero: a parameter one path never reached must have a
    zero gradient in the other."""
    if absent_is_zero:
        names = fast.keys() | ref.keys()
        fast, ref = ({n: g.get(n, torch.zeros_like((fast | ref)[n])) for n in names} for g in (fast, ref))
    assert fast.keys() == ref.keys()
    for n in ref:
        atol = ATOL * max(1.0, float(ref[n].abs().max()))
        torch.testing.assert_close(fast[n], ref[n], atol=atol, rtol=0, msg=lambda m, n=n: f"{n}: {m}")


def encoder_training_pass(enc, x, months, masks, p, seed):
    """Forward + backward of a training-mode encoder under a fixed RNG -> (output, gradients)."""
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = enc(x, months, masks, p)
    g = torch.Generator().manual_seed(seed)  # a fixed random read-out of every output
    loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in out.tokens.values())
    loss = loss + (out.pooled * torch.randn(out.pooled.shape, generator=g)).sum() + out.projected.pow(2).sum()
    loss.backward()
    return out, grads(enc)


@pytest.mark.parametrize("kind", ["random", "all_visible", "some_empty"])
def test_training_encoder_equals_the_padded_reference_outputs_and_gradients(kind, monkeypatch):
    enc = small_encoder(6).train()
    for blk in enc.blocks:  # drop path has its own test below
        blk.drop_path.p = 0.0
    B, H, T, p = 4, 8, 3, 4
    x, months = random_x(B, H, T, seed=6), torch.randint(0, 12, (B, T))
    masks = training_masks(kind, B, H, T, p)
    counts = visible_counts(masks)
    assert (len(set(counts)) == 1) == (kind == "all_visible") and (0 in counts) == (kind == "some_empty")
    calls = []
    monkeypatch.setattr(enc, "encode_padded", lambda *a: calls.append(a) or type(enc).encode_padded(enc, *a))
    fast, g_fast = encoder_training_pass(enc, x, months, masks, p, seed=0)
    assert not calls  # training ran the unpadded path
    monkeypatch.setattr(enc, "encode_unpadded", enc.encode_padded)
    ref, g_ref = encoder_training_pass(enc, x, months, masks, p, seed=0)
    assert calls
    assert_same(fast, ref)
    assert_same_grads(g_fast, g_ref)
    assert any("blocks.0.attn" in n for n in g_ref) and any("channel_embeddings" in n for n in g_ref)


def test_training_encoder_with_drop_path_draws_the_padded_batch_draws(monkeypatch):
    """One draw per sample, empty samples included, in sample order: under the same RNG state the
    unpadded path drops exactly the samples the padded reference drops."""
    torch.manual_seed(7)
    enc = build_model("nano", encoder_depth=3, drop_path=0.5).encoder.train()
    B, H, T, p = 6, 8, 3, 4
    x, months = random_x(B, H, T, seed=7), torch.randint(0, 12, (B, T))
    masks = random_roles(B, H, T, p, seed=7, empty=(2,))
    fast, g_fast = encoder_training_pass(enc, x, months, masks, p, seed=1)
    with monkeypatch.context() as m:
        m.setattr(enc, "encode_unpadded", enc.encode_padded)
        ref, g_ref = encoder_training_pass(enc, x, months, masks, p, seed=1)
    assert_same(fast, ref)
    assert_same_grads(g_fast, g_ref)
    other, _ = encoder_training_pass(enc, x, months, masks, p, seed=2)  # other draws: other outputs
    assert not torch.allclose(other.pooled, fast.pooled, atol=1e-3)


def test_drop_path_keeps_or_drops_each_back_to_back_sample_whole():
    dp = DropPath(0.4).train()
    lengths = [5, 0, 3, 7, 1, 4]
    x = torch.ones(1, sum(lengths), 8)
    kept, draws = [], 2000
    torch.manual_seed(0)
    for _ in range(draws):
        state = torch.get_rng_state()
        out = dp(x, seq_lengths=lengths)[0]  # (N, 8)
        torch.set_rng_state(state)
        per_row = dp(torch.ones(len(lengths), 1, 8))[:, 0, 0]  # the padded batch's draws, same RNG state
        for j, part in enumerate(out.split(lengths)):
            assert torch.all(part == per_row[j])  # the whole sample shares the sample's draw
        kept.append(per_row > 0)
        assert set(per_row.tolist()) <= {0.0, float(torch.tensor(1 / 0.6))}  # dropped, or kept scaled 1/(1-p)
    rate = torch.stack(kept).float().mean(0)  # (B,)
    assert torch.all((rate - 0.6).abs() < 0.05), rate  # 2000 draws: sd 0.011
    assert torch.equal(DropPath(0.4).eval()(x, seq_lengths=lengths), x)


def test_cross_attention_over_back_to_back_sequences_equals_the_masked_padded_batch():
    torch.manual_seed(1)
    attn = Attention(32, 4).eval()
    with torch.no_grad():
        attn.k.bias.normal_()  # a non-zero key and value of the zero slot
        attn.v.bias.normal_()
    q_lengths, k_lengths = [4, 0, 6, 3], [5, 2, 0, 7]  # sample 1: no queries; sample 2: no keys
    Q, M, D = max(q_lengths), max(k_lengths), 32
    q_valid = torch.arange(Q)[None] < torch.tensor(q_lengths)[:, None]  # (B, Q)
    k_valid = torch.arange(M)[None] < torch.tensor(k_lengths)[:, None]  # (B, M)
    queries = torch.randn(4, Q, D) * q_valid[..., None]
    keys = torch.randn(4, M, D) * k_valid[..., None]
    with torch.no_grad():
        ref = attn(queries, keys, key_mask=tk.key_padding_mask(k_valid))  # (B, Q, D)
        fast = attn(queries[q_valid][None], keys[k_valid][None], seq_lengths=q_lengths, key_lengths=k_lengths)
    torch.testing.assert_close(fast[0], ref[q_valid], atol=1e-6, rtol=0)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, num_splits=None):
    """The contract of torch.nn.attention.varlen.varlen_attn (CUDA-only) on the CPU: (tokens, H, hd) rows,
    int32 cumulative offsets, one unmasked attention per segment; it also checks what the caller passes."""
    assert q.ndim == k.ndim == v.ndim == 3 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q[0] == cu_k[0] == 0
    assert cu_q[-1] == q.shape[0] and cu_k[-1] == k.shape[0] and len(cu_q) == len(cu_k)
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    assert num_splits == 1  # batch-invariant results
    out = torch.empty_like(q)
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:], strict=True):
        if b > a:
            assert d > c, "a query segment without keys reached the kernel"
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)).transpose(0, 1)
    return out


@pytest.mark.parametrize("cross", [False, True])
def test_varlen_kernel_path_gets_offsets_and_zero_keys_as_the_loop(cross, monkeypatch):
    """The GPU path (one variable-length flash call, CUDA bf16 only) is fed exactly what the per-sequence loop
    computes: here its kernel is a CPU stand-in with the kernel's contract, and both paths must agree."""
    import olmoearth.attention as attention

    torch.manual_seed(2)
    attn = Attention(32, 4).eval()
    with torch.no_grad():
        attn.k.bias.normal_()
        attn.v.bias.normal_()
    q_lengths = [4, 0, 6, 3, 5]
    k_lengths = [5, 2, 0, 7, 1] if cross else q_lengths  # sample 1: no queries; sample 2: no keys
    x = torch.randn(1, sum(q_lengths), 32)
    y = torch.randn(1, sum(k_lengths), 32) if cross else None
    with torch.no_grad():
        loop = attn(x, y, seq_lengths=q_lengths, key_lengths=k_lengths if cross else None)
        monkeypatch.setattr(attention, "varlen_kernel", lambda q: reference_varlen)
        varlen = attn(x, y, seq_lengths=q_lengths, key_lengths=k_lengths if cross else None)
    torch.testing.assert_close(varlen, loop, atol=1e-6, rtol=0)


def test_varlen_kernel_only_for_half_precision_cuda_tensors():
    from olmoearth.attention import varlen_kernel

    assert varlen_kernel(torch.zeros(1, 2, 3, 4)) is None
    assert varlen_kernel(torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)) is None  # CPU: the loop


def decoder_inputs(B, H, T, p, seed, no_context=(), no_queries=()):
    g = torch.Generator().manual_seed(seed)
    masks = random_roles(B, H, T, p, seed, empty=no_context)
    for m in masks.values():
        for i in no_queries:
            m[i][m[i] == DECODER] = IGNORED
    tokens = {n: torch.randn(*m.shape, 128, generator=g) for n, m in masks.items()}
    return tokens, masks


def decoder_pass(dec, forward, tokens, masks, months, p):
    dec.zero_grad(set_to_none=True)
    tokens = {n: t.clone().requires_grad_() for n, t in tokens.items()}
    pred, idx, valid, shapes = forward(tokens, masks, months, p)
    g = torch.Generator().manual_seed(0)
    (pred[valid] * torch.randn(pred[valid].shape, generator=g)).sum().backward()
    grads_in = {n: t.grad for n, t in tokens.items() if t.grad is not None}
    return pred, idx, valid, shapes, grads(dec), grads_in


@pytest.mark.parametrize("case", ["random", "some_empty", "no_context_at_all"])
def test_decoder_back_to_back_equals_the_padded_reference(case):
    torch.manual_seed(8)
    dec = build_model("nano", decoder_depth=2).decoder.train()
    with torch.no_grad():
        dec.mask_token.normal_()
        for prm in dec.composite_encodings.per_modality_channel_embeddings.values():
            prm.normal_()
        for blk in dec.blocks:
            blk.attn.k.bias.normal_()
            blk.attn.v.bias.normal_()
    B, H, T, p = 4, 8, 3, 4
    empty = {"random": {}, "some_empty": {"no_context": (1,), "no_queries": (2,)},
             "no_context_at_all": {"no_context": range(B)}}[case]
    tokens, masks = decoder_inputs(B, H, T, p, seed=8, **empty)
    months = torch.randint(0, 12, (B, T))
    fast = decoder_pass(dec, dec.forward, tokens, masks, months, p)
    ref = decoder_pass(dec, dec.forward_padded, tokens, masks, months, p)
    pred, idx, valid = fast[:3]
    assert torch.equal(idx, ref[1]) and torch.equal(valid, ref[2]) and fast[3] == ref[3]
    torch.testing.assert_close(pred[valid], ref[0][valid], atol=ATOL, rtol=0)
    assert (pred[~valid] == 0).all()
    no_context = case == "no_context_at_all"  # then the context's layers (and the inputs) get no gradient
    assert_same_grads(fast[4], ref[4], absent_is_zero=no_context)
    assert_same_grads(fast[5], ref[5], absent_is_zero=no_context)
    assert no_context or fast[5].keys() == tokens.keys()
    if case == "some_empty":  # the sample without context still gets predictions
        assert valid[1].any() and not valid[2].any()


def model_training_pass(model, batch, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the D4 augmentation draws
    out = model(batch)
    out["loss"].backward()
    return out, grads(model)


@pytest.mark.parametrize("empty_view", [False, True])
def test_training_step_equals_the_padded_reference_losses_and_gradients(empty_view, monkeypatch):
    torch.manual_seed(9)
    # an empty sample pools to zeros, projected to the zero-initialised bias: InfoNCE's normalize would
    # blow its gradient up to 1 / eps, so that case leaves the contrastive term out
    model = build_model("nano", encoder_depth=2, decoder_depth=2, drop_path=0.0,
                        contrastive_weight=0.0 if empty_view else 0.1).train()
    with torch.no_grad():
        model.decoder.mask_token.normal_()
    batch = make_batch(np.random.default_rng(9), mods=(*MODS, "worldcover"))
    if empty_view:  # sample 2 of view b: nothing visible, so no context for its queries either
        for m in batch["mask_b"].values():
            m[2][m[2] == ENCODER] = DECODER
    counts = [sum(int((m[i] == ENCODER).sum()) for m in batch["mask_a"].values()) for i in range(4)]
    assert len(set(counts)) > 1  # the reference pads
    fast, g_fast = model_training_pass(model, batch, seed=3)
    monkeypatch.setattr(model.encoder, "encode_unpadded", model.encoder.encode_padded)
    monkeypatch.setattr(model.decoder, "forward", model.decoder.forward_padded)
    ref, g_ref = model_training_pass(model, batch, seed=3)
    for k in ("loss", "patch_disc", "contrastive"):
        torch.testing.assert_close(fast[k], ref[k], atol=ATOL, rtol=0)
    assert_same_grads(g_fast, g_ref)
    used = {"encoder.blocks.1.mlp.fc2.weight", "encoder.patch_embeddings.per_modality_embeddings.landsat."
            "landsat__0.proj.weight", "decoder.blocks.1.attn.k.weight", "decoder.mask_token",
            "decoder.encoder_to_decoder_embed.weight", "encoder.project_and_aggregate.projection.0.weight"}
    assert used <= g_ref.keys()
