import numpy as np
import pytest
import torch
import torch.nn.functional as F

import olmoearth
from olmoearth import build_model, encode, load_encoder, save_encoder
from olmoearth.layout import DECODER, ENCODER
from olmoearth.masking import modality_cross_random, token_presence
from olmoearth.model import ModelConfig, load_original_state_dict

# README / reference figures (millions): encoder, decoder
EXPECTED = {"nano": (1.4, 0.8), "tiny": (6.2, 1.9), "base": (89, 30), "large": (308, 53)}
TINY = dict(encoder_dim=32, encoder_depth=2, encoder_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def count(m):
    return sum(p.numel() for p in m.parameters()) / 1e6


def make_batch(rng, B=4, H=16, T=3, p=4, mods=("sentinel2_l2a", "sentinel1", "worldcover")):
    from olmoearth.modalities import MODALITIES

    xs = {n: rng.normal(size=(B, H, H, T if MODALITIES[n].temporal else 1, MODALITIES[n].num_bands))
          .astype(np.float32) for n in mods}

    def masks():
        ms = [modality_cross_random(token_presence({k: v[i] for k, v in xs.items()}, p), rng) for i in range(B)]
        return {k: torch.from_numpy(np.stack([m[k] for m in ms])) for k in xs}

    return {"x": {k: torch.from_numpy(v) for k, v in xs.items()}, "months": torch.randint(0, 12, (B, T)),
            "patch_size": p, "mask_a": masks(), "mask_b": masks()}


@pytest.mark.parametrize("size", ["nano", "tiny", "base", "large"])
def test_sizes_match_the_original_parameter_counts(size):
    torch.manual_seed(0)
    m = build_model(size)
    enc, dec = EXPECTED[size]
    assert abs(count(m.encoder) - enc) / enc < 0.05, count(m.encoder)
    assert abs(count(m.decoder) - dec) / dec < 0.05, count(m.decoder)
    assert m.encoder.embedding_dim == m.config.encoder_dim
    if size in ("base", "large"):  # one tiny forward: 1 sample, 8x8 px, one timestep
        out = encode(m.encoder, {"sentinel2_l2a": np.full((1, 8, 8, 1, 12), 1000.0)}, months=[[3]], patch_size=8)
        assert out.patches.shape == (1, 1, 1, m.config.encoder_dim) and torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("p", range(1, 9))
def test_encode_shapes_for_every_patch_size(p):
    torch.manual_seed(0)
    m = build_model("nano", encoder_depth=1)
    H, W = 3 * p, 2 * p
    rng = np.random.default_rng(p)
    x = rng.uniform(0, 5000, size=(2, H, W, 2, 12)).astype(np.float32)
    s1 = rng.uniform(-25, 0, size=(2, H, W, 2, 2)).astype(np.float32)
    out = encode(m.encoder, {"sentinel2_l2a": x, "sentinel1": s1}, months=np.array([[0, 1], [5, 6]]), patch_size=p)
    assert out.patches.shape == (2, 3, 2, 128)
    assert out.pooled.shape == (2, 128) and out.projected.shape == (2, 128)
    assert out.tokens["sentinel2_l2a"].shape == (2, 3, 2, 2, 3, 128)
    assert torch.isfinite(out.patches).all()


def test_flexi_patch_embed_equals_explicit_resize_then_8x8_projection():
    torch.manual_seed(0)
    pe = build_model("nano", encoder_depth=1).encoder.patch_embeddings
    x = torch.randn(2, 24, 24, 3, 12)  # (B, H, W, T, C)
    for p in range(1, 9):
        if 24 % p:
            continue
        got = pe({"sentinel2_l2a": x}, p)["sentinel2_l2a"]  # (B, h, w, T, S, D)
        img = x.permute(0, 3, 4, 1, 2).reshape(6, 12, 24, 24)
        size = 24 // p * 8
        if p != 8:
            img = F.interpolate(img, size=(size, size), mode="bicubic", antialias=True)
        for s, sl in enumerate([slice(0, 4), slice(4, 10), slice(10, 12)]):
            conv = pe.per_modality_embeddings["sentinel2_l2a"][f"sentinel2_l2a__{s}"].proj
            want = F.conv2d(img[:, sl], conv.weight, conv.bias, stride=8)  # (B*T, D, h, w)
            want = want.reshape(2, 3, 128, 24 // p, 24 // p).permute(0, 3, 4, 1, 2)
            torch.testing.assert_close(got[..., s, :], want, atol=1e-4, rtol=1e-4)


def test_target_projection_is_frozen_and_gets_no_gradient():
    torch.manual_seed(0)
    m = build_model("nano", **TINY)
    before = {k: v.clone() for k, v in m.target_projection.state_dict().items()}
    assert all(not p.requires_grad for p in m.target_projection.parameters())
    group_ids = {id(p) for g in m.param_groups(0.02) for p in g["params"]}
    assert not group_ids & {id(p) for p in m.target_projection.parameters()}
    # at init it equals the encoder's patch embedding
    for k, v in m.encoder.patch_embeddings.state_dict().items():
        assert torch.equal(v, before[k])
    batch = make_batch(np.random.default_rng(0))
    opt = torch.optim.AdamW(m.param_groups(0.02), lr=1e-2)
    for _ in range(3):
        out = m(batch)
        opt.zero_grad()
        out["loss"].backward()
        assert all(p.grad is None for p in m.target_projection.parameters())
        opt.step()
    for k, v in m.target_projection.state_dict().items():
        assert torch.equal(v, before[k])
    k = "per_modality_embeddings.sentinel2_l2a.sentinel2_l2a__0.proj.weight"
    assert not torch.equal(m.encoder.patch_embeddings.state_dict()[k], before[k])  # the online one trains


def test_loss_decreases_over_50_steps_on_a_fixed_batch():
    torch.manual_seed(0)
    m = build_model("nano", encoder_dim=64, encoder_depth=2, encoder_heads=4, decoder_dim=64, decoder_depth=1,
                    decoder_heads=4, drop_path=0.0, augment=False)
    batch = make_batch(np.random.default_rng(1), B=6, H=8, T=3, p=2)
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=2e-3)
    losses = []
    for _ in range(50):
        out = m(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
        assert set(out) == {"loss", "patch_disc", "contrastive"}
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


def test_augmentation_keeps_masks_aligned_with_pixels():
    from olmoearth.model import d4

    x = torch.arange(16.0).reshape(1, 4, 4, 1, 1).repeat_interleave(2, 1).repeat_interleave(2, 2)  # 8x8 px
    mask = torch.arange(16).reshape(1, 4, 4, 1, 1)  # token (i, j) carries the value of its pixels
    for k in range(4):
        for flip in (False, True):
            xa, ma = d4(x, k, flip), d4(mask, k, flip)
            assert torch.equal(xa[:, ::2, ::2], ma.float())


def test_training_forward_refuses_an_encoded_map():
    m = build_model("nano", **TINY)
    batch = make_batch(np.random.default_rng(2))
    batch["mask_a"]["worldcover"][0, 0, 0, 0, 0] = ENCODER
    with pytest.raises(ValueError, match="worldcover"):
        m(batch)


def test_bad_inputs_raise_value_errors_naming_the_problem():
    m = build_model("nano", encoder_depth=1)
    x = np.zeros((1, 8, 8, 2, 12), np.float32)
    months = [[0, 1]]
    with pytest.raises(ValueError, match="unknown modality"):
        encode(m.encoder, {"sentinel9": x}, months=months, patch_size=4)
    with pytest.raises(ValueError, match="decode-only"):
        encode(m.encoder, {"worldcover": np.zeros((1, 8, 8, 1, 1))}, months=[[0]], patch_size=4)
    with pytest.raises(ValueError, match="patch_size"):
        encode(m.encoder, {"sentinel2_l2a": x}, months=months, patch_size=9)
    with pytest.raises(ValueError, match="patch_size"):
        encode(m.encoder, {"sentinel2_l2a": x}, months=months, patch_size=0)
    with pytest.raises(ValueError, match=r"sentinel2_l2a must be \(B, H, W, T, 12\)"):
        encode(m.encoder, {"sentinel2_l2a": x[..., :10]}, months=months, patch_size=4)
    with pytest.raises(ValueError, match="not a multiple"):
        encode(m.encoder, {"sentinel2_l2a": x}, months=months, patch_size=3)
    with pytest.raises(ValueError, match="months"):
        encode(m.encoder, {"sentinel2_l2a": x}, months=[[0]], patch_size=4)
    with pytest.raises(ValueError, match="decode-only"):
        m.encoder({"srtm": torch.zeros(1, 8, 8, 1, 1)}, torch.zeros(1, 1), {"srtm": torch.zeros(1, 2, 2, 1, 1)}, 4)
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        build_model("nano", depth=3)


def test_missing_data_is_masked_not_faked():
    torch.manual_seed(0)
    m = build_model("nano", encoder_depth=2)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 4000, size=(1, 16, 16, 3, 12)).astype(np.float32)
    full = encode(m.encoder, {"sentinel2_l2a": x}, months=[[0, 1, 2]], patch_size=4)
    x_missing = x.copy()
    x_missing[:, :, :, 2] = np.nan  # a missing timestep
    x_missing[:, :4, :4, 0, 0] = np.nan  # one missing pixel in one patch
    out = encode(m.encoder, {"sentinel2_l2a": x_missing}, months=[[0, 1, 2]], patch_size=4)
    assert torch.isfinite(out.patches).all() and torch.isfinite(out.pooled).all()
    assert (out.mask["sentinel2_l2a"][0, :, :, 2] != ENCODER).all()
    assert out.mask["sentinel2_l2a"][0, 0, 0, 0, 0] != ENCODER and out.mask["sentinel2_l2a"][0, 0, 0, 0, 1] == ENCODER
    # dropping the timestep equals encoding only the first two timesteps
    two = encode(m.encoder, {"sentinel2_l2a": x[:, :, :, :2]}, months=[[0, 1]], patch_size=4)
    x2 = x.copy()
    x2[:, :, :, 2] = np.nan
    dropped = encode(m.encoder, {"sentinel2_l2a": x2}, months=[[0, 1, 2]], patch_size=4)
    torch.testing.assert_close(dropped.pooled, two.pooled, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(full.pooled, two.pooled, atol=1e-4)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_model("nano", encoder_depth=1)
    path = tmp_path / "enc.safetensors"
    save_encoder(m.encoder, str(path), extra_meta={"step": 7})
    for src in (str(path), path.read_bytes()):
        enc = load_encoder(src)
        assert enc.checkpoint_meta == {"step": 7} and enc.config.encoder_depth == 1
        x = np.random.default_rng(0).uniform(0, 3000, size=(1, 8, 8, 1, 12))
        a = encode(m.encoder, {"sentinel2_l2a": x}, months=[[4]], patch_size=2)
        b = encode(enc, {"sentinel2_l2a": x}, months=[[4]], patch_size=2)
        torch.testing.assert_close(a.patches, b.patches)
    with pytest.raises(ValueError, match="safetensors"):
        load_encoder(b"garbage!!garbage")


def test_load_random_is_seeded_and_leaves_the_global_rng_alone():
    rng = torch.random.get_rng_state()
    a, b, c = olmoearth.load("random:nano:3"), olmoearth.load("random:nano:3"), olmoearth.load("random:nano")
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert a.config.size == "nano" and not a.training and a.checkpoint_meta == {}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.blocks[0].attn.q.weight, c.blocks[0].attn.q.weight)  # seed 0 by default
    with pytest.raises(ValueError, match="integer seed"):
        olmoearth.load("random:nano:x")


def test_import_olmoearth_is_light():
    import subprocess
    import sys

    code = "import sys, olmoearth; assert 'torch' not in sys.modules; print(olmoearth.MODALITIES is not None)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert olmoearth.ModelConfig is ModelConfig


def test_parity_with_the_original_implementation():
    """Our encoder / decoder on the original's weights (via the name table) give the original's outputs."""
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn.flexi_vit import EncoderConfig, PredictorConfig
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn.latent_mim import LatentMIMConfig
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.utils.datatypes import MaskedOlmoEarthSample

    from olmoearth import tokens as tk
    from olmoearth.modalities import MODALITIES

    torch.manual_seed(0)
    mods = list(MODALITIES)
    d, heads = 64, 4
    enc_cfg = EncoderConfig(supported_modality_names=mods, embedding_size=d, num_heads=heads, depth=2,
                            mlp_ratio=4.0, drop_path=0.0)
    dec_cfg = PredictorConfig(supported_modality_names=mods, encoder_embedding_size=d, decoder_embedding_size=d,
                              depth=2, mlp_ratio=4.0, num_heads=heads, output_embedding_size=d)
    orig = LatentMIMConfig(encoder_config=enc_cfg, decoder_config=dec_cfg).build()
    ours = build_model("nano", encoder_dim=d, encoder_depth=2, encoder_heads=heads, decoder_dim=d,
                       decoder_depth=2, decoder_heads=heads, drop_path=0.0, augment=False)
    osd = orig.state_dict()
    for k in osd:  # make the zero-initialised parameters matter
        if "channel_embeddings" in k or "mask_token" in k:
            osd[k].normal_()
    load_original_state_dict(ours, osd)
    with pytest.raises(ValueError, match="lacks"):
        load_original_state_dict(ours, {k: v for k, v in osd.items() if not k.startswith("decoder.norm")})

    batch = make_batch(np.random.default_rng(0), B=3, H=16, T=4, p=4,
                       mods=("sentinel2_l2a", "sentinel1", "landsat", "worldcover", "srtm"))
    x, mask, months, p = batch["x"], batch["mask_a"], batch["months"], 4
    d_in = {"timestamps": torch.stack([torch.ones_like(months), months, torch.full_like(months, 2020)], -1)}
    for k, v in x.items():
        pix = mask[k].repeat_interleave(p, 1).repeat_interleave(p, 2)
        static = not MODALITIES[k].temporal
        d_in[k], d_in[k + "_mask"] = (v[:, :, :, 0], pix[:, :, :, 0]) if static else (v, pix)
    orig.train()
    ours.train()
    with torch.no_grad():
        latent, decoded, projected, _, _ = orig(MaskedOlmoEarthSample(**d_in), patch_size=p)
        enc_x = {k: v for k, v in x.items() if MODALITIES[k].encoder_input}
        out = ours.encoder(enc_x, months, {k: mask[k] for k in enc_x}, p)
        for k in enc_x:
            vis = mask[k] == ENCODER
            torch.testing.assert_close(out.tokens[k][vis], getattr(latent, k)[vis], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.projected, projected, atol=1e-4, rtol=1e-4)
        tgt = ours.target_projection(x, p)
        dec_in = {n: out.tokens.get(n, torch.zeros_like(tgt[n])) for n in tgt}
        pred, qi, qv, shapes = ours.decoder(dec_in, mask, months, p)
        full = tk.expand(tk.unpack(pred, qi, qv, sum(int(np.prod(s)) for s in shapes.values())), shapes)
        for k in x:
            a, b, dm = getattr(decoded, k), full[k], mask[k] == DECODER
            if not MODALITIES[k].temporal:
                b, dm = b[:, :, :, 0], dm[:, :, :, 0]
            assert dm.any()
            torch.testing.assert_close(b[dm], a[dm], atol=1e-4, rtol=1e-4)
