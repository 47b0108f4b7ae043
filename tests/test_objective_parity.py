"""The training objective against the original's own training code (olmoearth-pretrain 0.1.2, loaded by
tests/original_training.py; its model from olmoearth-pretrain-minimal, tests/original_models.py).

- One training step on identical weights, batch and masks: our LatentMIM vs the original's model (built by
  olmoearth-pretrain-minimal, loaded into the training package's own LatentMIM) driven by its
  ContrastiveLatentMIMTrainModule (its `train_batch`: two views, ModalityPatchDiscriminationLoss,
  InfoNCE weight 0.1; its `optim_step`: clipping to 1.0, then AdamW with its single parameter group).
  The patch-discrimination, contrastive and total losses agree to 1e-5, every trainable parameter's
  gradient to 1e-4 relative, and the weights after the step to 1e-5.
- Masking: our `modality_cross_random` and the original's ModalityCrossRandomMaskingStrategy, 20,000 draws
  each on the same token grids; the per-bandset role probabilities (encoded only, decoded only, both,
  neither) agree within 0.01 and the mean encoded / decoded token counts within 1%.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from original_models import perturb_weights
from original_training import original_latent_mim, original_train_module, original_training

from olmoearth import build_model
from olmoearth.layout import DECODER, ENCODER
from olmoearth.masking import modality_cross_random, token_presence
from olmoearth.modalities import MAP_MODALITIES, MODALITIES
from olmoearth.model import load_original_state_dict, original_name

DIM, HEADS, DEPTH = 64, 4, 2
MODS = ("sentinel2_l2a", "sentinel1", "landsat", "worldcover", "srtm")
# the v1 recipe's AdamW at its peak lr, with a weight decay large enough (v1: 0.02) that a parameter decayed on
# one side only moves by more than the step tolerance
OPTIM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def models():
    """(original LatentMIM with perturbed weights, ours with the same weights)."""
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn.flexi_vit import EncoderConfig, PredictorConfig
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn.latent_mim import LatentMIMConfig

    torch.manual_seed(0)
    mods = list(MODALITIES)
    enc = EncoderConfig(supported_modality_names=mods, embedding_size=DIM, num_heads=HEADS, depth=DEPTH,
                        mlp_ratio=4.0, drop_path=0.0)
    dec = PredictorConfig(supported_modality_names=mods, encoder_embedding_size=DIM, decoder_embedding_size=DIM,
                          depth=DEPTH, mlp_ratio=4.0, num_heads=HEADS, output_embedding_size=DIM)
    orig = perturb_weights(LatentMIMConfig(encoder_config=enc, decoder_config=dec).build(), seed=1)
    ours = build_model("nano", encoder_dim=DIM, encoder_depth=DEPTH, encoder_heads=HEADS, decoder_dim=DIM,
                       decoder_depth=DEPTH, decoder_heads=HEADS, drop_path=0.0, augment=False)
    load_original_state_dict(ours, orig.state_dict())
    return orig, ours


def make_batch(seed=0, B=4, H=8, T=2, p=2):
    rng = np.random.default_rng(seed)
    xs = {n: rng.normal(size=(B, H, H, T if MODALITIES[n].temporal else 1, MODALITIES[n].num_bands))
          .astype(np.float32) for n in MODS}
    presents = [token_presence({k: v[i] for k, v in xs.items()}, p) for i in range(B)]

    def masks():
        ms = [modality_cross_random(pr, rng) for pr in presents]
        return {k: torch.from_numpy(np.stack([m[k] for m in ms])) for k in xs}

    return {"x": {k: torch.from_numpy(v) for k, v in xs.items()},
            "months": torch.as_tensor(rng.integers(0, 12, (B, T))), "mask_a": masks(), "mask_b": masks(),
            "patch_size": p}


def original_view(batch: dict, view: str):
    """Our batch and one view's token mask as the original's MaskedOlmoEarthSample (pixel-level masks)."""
    original_training()
    from olmoearth_pretrain.datatypes import MaskedOlmoEarthSample

    months, p = batch["months"], batch["patch_size"]
    fields = {"timestamps": torch.stack([torch.ones_like(months), months, torch.full_like(months, 2020)], -1)}
    for k, v in batch["x"].items():
        pix = batch[view][k].long().repeat_interleave(p, 1).repeat_interleave(p, 2)
        static = not MODALITIES[k].temporal
        fields[k], fields[k + "_mask"] = (v[:, :, :, 0], pix[:, :, :, 0]) if static else (v, pix)
    return MaskedOlmoEarthSample(**fields)


def ours_step(model, **group_options):
    """Our optimiser step: clip the gradients' global norm to 1.0 (the engine's gradient_clipping), AdamW."""
    groups = model.param_groups(OPTIM["weight_decay"], **group_options)
    opt = torch.optim.AdamW(groups, **{k: v for k, v in OPTIM.items() if k != "weight_decay"})
    torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
    opt.step()


def test_one_training_step_equals_the_original_train_module():
    minimal, ours = models()
    orig = original_latent_mim(minimal)  # the training package's own model, the same weights
    batch = make_batch()
    assert all(bool((m == DECODER).any()) for m in batch["mask_a"].values())
    p, B = batch["patch_size"], batch["months"].shape[0]
    trainable = [q for q in orig.parameters() if q.requires_grad]
    tm = original_train_module(orig, torch.optim.AdamW(trainable, **OPTIM), rank_microbatch_size=B)
    view_a, view_b = original_view(batch, "mask_a"), original_view(batch, "mask_b")

    # the original's losses: per view through its own model_forward, the total through its train_batch
    orig.train()
    with torch.no_grad():
        pd_orig = (tm.model_forward(view_a, p, tm.token_exit_cfg)[0]
                   + tm.model_forward(view_b, p, tm.token_exit_cfg)[0]) / 2
    tm.zero_grads()
    tm.train_batch((p, view_a, view_b))
    total_orig = tm.trainer.metrics["train/ModalityPatchDisc"]
    contrastive_orig = tm.trainer.metrics["train/InfoNCE"]  # already weighted by 0.1

    ours.train()
    out = ours(batch)
    ours.zero_grad(set_to_none=True)
    out["loss"].backward()
    diffs = {"patch_disc": abs(float(out["patch_disc"]) - float(pd_orig)),
             "contrastive": abs(0.1 * float(out["contrastive"]) - contrastive_orig),
             "total": abs(float(out["loss"]) - total_orig)}
    assert max(diffs.values()) <= 1e-5, diffs

    # gradients of every trainable parameter (and the original has no trainable parameter we lack)
    named = dict(orig.named_parameters())
    ours_trainable = {original_name(k): q for k, q in ours.named_parameters() if q.requires_grad}
    assert {k for k, q in named.items() if q.requires_grad} == set(ours_trainable)
    worst, unused, noise = 0.0, set(), set()
    for k, q in ours_trainable.items():
        go, gr = named[k].grad, q.grad
        if gr is None:  # unused here (e.g. the encoder's map projections): the original's gradient is 0
            assert go is None or float(go.abs().max()) == 0.0, k
            unused.add(k)
            continue
        if k.endswith("attn.k.bias"):  # analytically zero (softmax ignores a shift): float noise both sides
            assert max(float(go.abs().max()), float(gr.abs().max())) < 1e-7, k
            noise.add(k)
            continue
        rel = float((go - gr).abs().max()) / max(float(go.abs().max()), 1e-12)
        worst = max(worst, rel)
    assert worst <= 1e-4, worst
    assert len(unused) < 0.2 * len(ours_trainable)

    # one optimiser step: the original's optim_step (clip to 1.0, AdamW one group) vs ours
    tm.optim_step()
    before = {k: (q.detach().clone(), None if q.grad is None else q.grad.clone()) for k, q in ours_trainable.items()}
    ours_step(ours, exempt_norms_and_biases=True)
    exempt = max(float((named[k] - q).abs().max()) for k, q in ours_trainable.items() if k not in unused | noise)
    with torch.no_grad():
        for k, q in ours_trainable.items():
            q.copy_(before[k][0])
            q.grad = before[k][1]
    ours_step(ours)
    step = max(float((named[k] - q).abs().max()) for k, q in ours_trainable.items() if k not in unused | noise)
    assert step <= 1e-5, step
    assert exempt > 1e-5, exempt  # the comparison sees the weight-decay groups
    # Adam divides the key biases' noise by its own size (plus eps): they move by up to lr * |g| / eps
    bound = OPTIM["lr"] * 1e-7 / OPTIM["eps"] * 2
    assert max(float((named[k] - ours_trainable[k]).abs().max()) for k in noise) <= bound
    # parameters no loss reaches: the original (zero gradient, not None) still applies the weight decay
    decay = 1 - OPTIM["lr"] * OPTIM["weight_decay"]
    for k in unused:
        if named[k].grad is not None:
            torch.testing.assert_close(named[k].detach(), ours_trainable[k].detach() * decay, atol=1e-7, rtol=0)


# --------------------------------------------------------------------------------------------------
# masking statistics

N_DRAWS = 20_000
ROLES = ("encoded only", "decoded only", "both", "neither")


def grid(h, w, T, mods, missing=()):
    """Presence {modality: bool (h, w, T, S)}: all present except the (modality, bandset) pairs in missing."""
    out = {}
    for n in mods:
        m = MODALITIES[n]
        pres = np.ones((h, w, T if m.temporal else 1, m.num_bandsets), bool)
        for name, s in missing:
            if name == n:
                pres[..., s] = False
        out[n] = pres
    return out


CASES = {
    "all 12 bandsets, 4x4, T=2": grid(4, 4, 2, list(MODALITIES)),
    "missing bandsets, 2x3, T=3": grid(2, 3, 3, ["sentinel2_l2a", "sentinel1", "landsat", "worldcover", "srtm"],
                                       missing=[("sentinel2_l2a", 1), ("landsat", 0)]),
    "tiny grid 1x1, T=1": grid(1, 1, 1, ["sentinel2_l2a", "sentinel1", "srtm"]),
    "1 present bandset": grid(4, 4, 2, ["sentinel1"]),
    "2 present: sensor + map": grid(4, 4, 2, ["sentinel1", "worldcover"]),
    "2 present: two sensors": grid(3, 3, 2, ["sentinel2_l2a", "landsat"],
                                   missing=[("sentinel2_l2a", 0), ("sentinel2_l2a", 1), ("landsat", 1)]),
}


def role_stats(masks: list[dict[str, np.ndarray]]) -> tuple[dict, float, float]:
    """{(modality, bandset): {role: probability}}, mean encoded and mean decoded tokens per sample."""
    stats = {}
    for n in masks[0]:
        stacked = np.stack([m[n] for m in masks])  # (N, h, w, T, S)
        flat = stacked.reshape(len(masks), -1, stacked.shape[-1])
        enc, dec = (flat == ENCODER).any(1), (flat == DECODER).any(1)  # (N, S)
        for s in range(flat.shape[-1]):
            e, d = enc[:, s], dec[:, s]
            stats[(n, s)] = dict(zip(ROLES, [float(np.mean(x)) for x in (e & ~d, d & ~e, e & d, ~e & ~d)], strict=True))
    n_enc = np.mean([sum(int((m == ENCODER).sum()) for m in ms.values()) for ms in masks])
    n_dec = np.mean([sum(int((m == DECODER).sum()) for m in ms.values()) for ms in masks])
    return stats, float(n_enc), float(n_dec)


def ours_masks(present: dict, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [modality_cross_random(present, rng) for _ in range(n)]


def original_masks(present: dict, n: int, seed: int) -> list[dict]:
    """The original's strategy on a batch of n identical samples at patch size 1 (a token is a pixel)."""
    masking, _, _ = original_training()
    from olmoearth_pretrain.data.constants import MISSING_VALUE
    from olmoearth_pretrain.datatypes import OlmoEarthSample

    np.random.seed(seed)
    torch.manual_seed(seed)
    strategy = masking.ModalityCrossRandomMaskingStrategy(
        encode_ratio=0.5, decode_ratio=0.5, allow_encoding_decoding_same_bandset=True, min_encoded_bandsets=2,
        only_decode_modalities=list(MAP_MODALITIES))
    T = max(p.shape[2] for p in present.values())
    fields = {"timestamps": torch.ones(n, T, 3, dtype=torch.long)}
    for name, pres in present.items():
        mod = MODALITIES[name]
        data = torch.zeros(n, *pres.shape[:3], mod.num_bands)
        for s, sl in enumerate(mod.bandset_slices()):
            data[..., sl][torch.from_numpy(~pres[..., s])[None].expand(n, *pres.shape[:3])] = MISSING_VALUE
        fields[name] = data if mod.temporal else data[:, :, :, 0]
    out = strategy.apply_mask(OlmoEarthSample(**fields), patch_size=1)
    masks = {}
    for name in present:
        m = getattr(out, name + "_mask").numpy().astype(np.int8)
        masks[name] = m if MODALITIES[name].temporal else m[:, :, :, None]
    return [{name: masks[name][i] for name in present} for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_masking_statistics_equal_the_original(case):
    present = CASES[case]
    ours, n_enc, n_dec = role_stats(ours_masks(present, N_DRAWS, seed=1))
    orig, o_enc, o_dec = role_stats(original_masks(present, N_DRAWS, seed=2))
    worst = max(abs(ours[k][r] - orig[k][r]) for k in orig for r in ROLES)
    assert worst <= 0.01, (case, worst, {k: (ours[k], orig[k]) for k in orig})
    assert abs(n_enc - o_enc) <= 0.01 * max(o_enc, 1.0), (n_enc, o_enc)
    assert abs(n_dec - o_dec) <= 0.01 * max(o_dec, 1.0), (n_dec, o_dec)


def test_param_groups_decay_every_trainable_parameter_unless_asked_to_exempt():
    model = build_model("nano", encoder_dim=32, encoder_depth=1, encoder_heads=2, decoder_dim=32,
                        decoder_depth=1, decoder_heads=2)
    trainable = {id(q) for q in model.parameters() if q.requires_grad}
    frozen = {id(q) for q in model.target_projection.parameters()}
    (group,) = model.param_groups(0.02)  # the original: one group, every trainable parameter decayed
    assert group["weight_decay"] == 0.02 and {id(q) for q in group["params"]} == trainable
    assert not trainable & frozen
    decay, no_decay = model.param_groups(0.02, exempt_norms_and_biases=True)
    assert no_decay["weight_decay"] == 0.0 and {id(q) for q in decay["params"] + no_decay["params"]} == trainable
    assert all(q.ndim >= 2 for q in decay["params"]) and any(q.ndim == 1 for q in no_decay["params"])
