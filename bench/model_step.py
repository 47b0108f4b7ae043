"""Training-step throughput: this model vs the original implementation vs a bare transformer.

One step = both masked views forward + backward + AdamW step, batch 16, every sample one token budget:
all 12 bandsets (S2 x3, S1, Landsat x2 and the six maps), patch 4, 6x6 tokens per side, 9 timesteps
-> 36 * (6 * 9 + 6) = 2160 tokens (budget 2250). Masks: `modality_cross_random`, the same for (a), (b), (c).

Each implementation runs with two sets of masks from the same draws: the corrected masking
(olmoearth/masking.py today, the original's own rule: a bandset that is not encoded keeps its DECODER
tokens, so every present map and non-encoded sensor bandset is decoded in every view) and the previous one
(a bandset not drawn for decoding had its DECODER tokens ignored). The corrected masks give the decoder
more queries (`decoded_queries_*` per step); the plain figure names (`nano_ours_tokens_per_s`, `ratio
nano_ours/original`) are the previous masking's, as before; `*_corrected` the same with the corrected masks,
and `ratio {size}_ours_step_time_corrected/previous` what the extra queries cost our step.

    (a) ours: `model(batch)` (encoder, decoder, frozen target projection, patch-disc + InfoNCE, D4 augment);
        the encoder's visible tokens and the decoder's queries and context run back to back, without padding
    (a') ours_padded: the same model on its padded reference paths (Encoder.encode_padded,
        Decoder.forward_padded: every sample padded to the longest, key-padding masks), as ours ran before
    (b) the original (`olmoearth_pretrain_minimal`, random weights, from its EncoderConfig / PredictorConfig /
        LatentMIMConfig), same sizes, same inputs and masks; its target = target_encoder exit 0; its outputs
        go through the same loss functions as ours (the loss code is not in the minimal package)
    (c) a bare pre-norm transformer (our Block, fused SDPA) of the same width: encoder depth on exactly the
        visible tokens of each view, decoder depth on exactly its decoded tokens; MSE loss. The pure
        transformer compute of the same step; a/c = our overhead (tokenising, encodings, packing, target,
        losses, cross- instead of self-attention).

tokens/s counts the 2160 sample tokens x 16 per step for all of them; `ratio {size}_ours_unpadded/padded`
is what running without padding buys (a / a'). Runs are interleaved (a, a', b, c, a, a', b, c, ... over both
mask sets) so load from other processes hits all alike; the median step time is reported.

`--precision bf16` (the default on CUDA) runs every forward under bf16 autocast (olmoearth.precision.autocast,
as pretraining does on GPUs); `{size}_ours{suffix}_mfu` is our step's model FLOPs
(pipelines/pretrain/throughput.train_step_flops over the views' visible and decoded tokens) per second over
the device's peak at that precision (datasheet for known GPUs, else a measured matmul rate).

    python bench/model_step.py [--sizes nano,tiny] [--steps 1] [--device cpu] [--precision auto]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from functools import partial

import numpy as np
import torch

from olmoearth import build_model
from olmoearth.attention import Block
from olmoearth.layout import DECODER, ENCODER, IGNORED
from olmoearth.losses import info_nce, patch_discrimination
from olmoearth.masking import (
    apply_bandset_rules,
    candidates,
    draw_bandsets,
    modality_cross_random,
    random_mask,
)
from olmoearth.modalities import MODALITIES
from olmoearth.precision import autocast, resolve_precision
from pipelines.pretrain.throughput import peak_flops, train_step_flops
from pipelines.pretrain.worker import model_shape

B, P, HW, T = 16, 4, 6, 9


def previous_masking(present, rng):
    """The masking before the correction, from the same draws: a bandset not drawn for decoding also lost its
    DECODER tokens when it was not encoded (the samples here are whole, so the fallback never applies)."""
    base = random_mask(present, rng, 0.5, 0.5)
    pairs = candidates(base)
    enc_set, dec_set = draw_bandsets(pairs, rng, 2)
    out = apply_bandset_rules(base, pairs, enc_set, dec_set)
    for name, m in out.items():
        if not MODALITIES[name].encoder_input:
            m[m == ENCODER] = IGNORED
        for s in range(m.shape[-1]):
            if (name, s) not in dec_set:
                m[..., s][m[..., s] == DECODER] = IGNORED
    return out


def make_batches(rng, device):
    """{"corrected": batch, "previous": batch}: the same inputs, masks from the same random draws."""
    H = HW * P
    x, present = {}, {}
    for n, m in MODALITIES.items():
        t = T if m.temporal else 1
        x[n] = torch.from_numpy(rng.normal(size=(B, H, H, t, m.num_bands)).astype(np.float32)).to(device)
        present[n] = np.ones((HW, HW, t, m.num_bandsets), bool)
    months = torch.randint(0, 12, (B, T), device=device)
    seeds = rng.integers(0, 2**31, size=(2, B))

    def masks(masking, view):
        ms = [masking(present, np.random.default_rng(int(s))) for s in seeds[view]]
        return {n: torch.from_numpy(np.stack([m[n] for m in ms])).to(device) for n in MODALITIES}

    return {name: {"x": x, "months": months, "patch_size": P, "mask_a": masks(fn, 0), "mask_b": masks(fn, 1)}
            for name, fn in (("corrected", modality_cross_random), ("previous", previous_masking))}


def decoded_queries(batch) -> int:
    return sum(int((m == DECODER).sum()) for key in ("mask_a", "mask_b") for m in batch[key].values())


# ------------------------------------------------------------------------------------------------ (b)
def build_original(cfg, device):
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn.flexi_vit import EncoderConfig, PredictorConfig
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.nn.latent_mim import LatentMIMConfig

    mods = list(MODALITIES)
    enc = EncoderConfig(supported_modality_names=mods, embedding_size=cfg.encoder_dim, num_heads=cfg.encoder_heads,
                        depth=cfg.encoder_depth, mlp_ratio=cfg.mlp_ratio, drop_path=cfg.drop_path)
    dec = PredictorConfig(supported_modality_names=mods, encoder_embedding_size=cfg.encoder_dim,
                          decoder_embedding_size=cfg.decoder_dim, depth=cfg.decoder_depth,
                          mlp_ratio=cfg.mlp_ratio, num_heads=cfg.decoder_heads, output_embedding_size=cfg.encoder_dim)
    return LatentMIMConfig(encoder_config=enc, decoder_config=dec).build().to(device)


def original_samples(batch):
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.utils.datatypes import MaskedOlmoEarthSample

    months = batch["months"]
    ts = torch.stack([torch.ones_like(months), months, torch.full_like(months, 2020)], -1)
    out = []
    for key in ("mask_a", "mask_b"):
        d = {"timestamps": ts}
        for n, v in batch["x"].items():
            m = batch[key][n].repeat_interleave(P, 1).repeat_interleave(P, 2)
            d[n], d[n + "_mask"] = (v, m) if MODALITIES[n].temporal else (v[:, :, :, 0], m[:, :, :, 0])
        out.append(MaskedOlmoEarthSample(**d))
    full = {k: (torch.zeros_like(v) if k.endswith("_mask") else v) for k, v in out[0]._asdict().items()
            if v is not None}
    return out, MaskedOlmoEarthSample(**full)


def original_step(model, opt, samples, full, amp):
    with amp():
        loss = original_loss(model, samples, full)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def original_loss(model, samples, full):
    from olmoearth_pretrain_minimal.olmoearth_pretrain_v1.utils.datatypes import MaskedOlmoEarthSample

    views, losses, pooled = samples, [], []
    with torch.no_grad():
        tgt = model.target_encoder(full, patch_size=P, token_exit_cfg={n: 0 for n in MODALITIES})["tokens_and_masks"]
    for s in views:
        _, decoded, proj, _, _ = model(s, patch_size=P)
        preds, tgts, keep, group = [], [], [], []
        for i, n in enumerate(MODALITIES):
            mask = getattr(s, MaskedOlmoEarthSample.get_masked_modality_name(n))[:, ::P, ::P]
            pr, tg = getattr(decoded, n), getattr(tgt, n)
            preds.append(pr.reshape(B, -1, pr.shape[-1]))
            tgts.append(tg.reshape(B, -1, tg.shape[-1]))
            keep.append(mask.reshape(B, -1) == DECODER)
            group.append(torch.full_like(keep[-1], i, dtype=torch.long))
        losses.append(patch_discrimination(torch.cat(preds, 1), torch.cat(tgts, 1), torch.cat(keep, 1),
                                           torch.cat(group, 1)))
        pooled.append(proj)
    return (losses[0] + losses[1]) / 2 + 0.1 * info_nce(pooled[0].float(), pooled[1].float())


# ------------------------------------------------------------------------------------------------ (c)
class Bare(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.enc = torch.nn.ModuleList([Block(cfg.encoder_dim, cfg.encoder_heads) for _ in range(cfg.encoder_depth)])
        self.dec = torch.nn.ModuleList([Block(cfg.decoder_dim, cfg.decoder_heads) for _ in range(cfg.decoder_depth)])

    def forward(self, enc_tokens, dec_tokens):
        for b in self.enc:
            enc_tokens = b(enc_tokens)
        for b in self.dec:
            dec_tokens = b(dec_tokens)
        return enc_tokens.pow(2).mean() + dec_tokens.pow(2).mean()


def bare_inputs(batch, cfg, device):
    out = []
    for key in ("mask_a", "mask_b"):
        n_enc = max(sum(int((m[i] == ENCODER).sum()) for m in batch[key].values()) for i in range(B))
        n_dec = max(sum(int((m[i] == DECODER).sum()) for m in batch[key].values()) for i in range(B))
        out.append((torch.randn(B, n_enc, cfg.encoder_dim, device=device),
                    torch.randn(B, n_dec, cfg.decoder_dim, device=device)))
    return out


def bare_step(model, opt, inputs, amp):
    with amp():
        loss = sum(model(e, d) for e, d in inputs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


# ------------------------------------------------------------------------------------------------
def padded_reference(model):
    """A copy of `model` (same weights) that runs the padded reference paths of encoder and decoder."""
    model = copy.deepcopy(model)
    model.encoder.encode_unpadded = model.encoder.encode_padded
    model.decoder.forward = model.decoder.forward_padded
    return model


def ours_step(model, opt, batch, amp):
    with amp():
        out = model(batch)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    opt.step()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="nano,tiny")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per implementation (after 1 warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 avoids stalls on a shared, loaded machine")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 (autocast) | fp32")
    args = ap.parse_args()
    dev = args.device
    precision = resolve_precision(args.precision, dev, field="--precision")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = make_batches(np.random.default_rng(0), dev)
    tokens = B * HW * HW * (6 * T + 6)
    print(f"tokens per step: {tokens} (batch {B}, {tokens // B} per sample), device {dev}, "
          f"threads {torch.get_num_threads()}, precision {precision}")
    peak, peak_source = peak_flops(dev, precision)
    queries = {k: decoded_queries(b) for k, b in batches.items()}
    print(f"decoded_queries_per_step: {queries['previous']} queries")
    print(f"decoded_queries_per_step_corrected: {queries['corrected']} queries")
    print(f"ratio decoded_queries_corrected/previous: {queries['corrected'] / queries['previous']:.2f}")
    for size in args.sizes.split(","):
        times, shape = measure(size, batches, dev, args.steps, partial(autocast, dev, precision))
        tps = {k: tokens / statistics.median(v) for k, v in times.items()}
        for suffix in ("", "_corrected"):
            for k in ("ours", "ours_padded", "original", "bare"):
                print(f"{size}_{k}{suffix}_tokens_per_s: {tps[k + suffix]:.0f} tokens/s")
            flops = step_flops(shape, batches["corrected" if suffix else "previous"])
            print(f"{size}_ours{suffix}_mfu: {100 * flops * tps['ours' + suffix] / tokens / peak:.2f} % "
                  f"(of {peak / 1e12:.2f} TFLOP/s, {peak_source})")
            print(f"ratio {size}_ours/original{suffix}: {tps['ours' + suffix] / tps['original' + suffix]:.2f}")
            print(f"ratio {size}_ours/bare{suffix}: {tps['ours' + suffix] / tps['bare' + suffix]:.2f}")
            print(f"ratio {size}_ours_unpadded/padded{suffix}: "
                  f"{tps['ours' + suffix] / tps['ours_padded' + suffix]:.2f}")
        for k in ("ours", "original"):
            print(f"ratio {size}_{k}_step_time_corrected/previous: {tps[k] / tps[k + '_corrected']:.2f}")


def step_flops(shape, batch) -> float:
    """Model FLOPs of one of our steps on `batch` (forward + backward of both views, the target projection)."""
    def per_sample(mask, role):
        return sum((m == role).flatten(1).sum(1) for m in mask.values()).cpu().numpy()

    n_tokens = sum(torch.ones_like(m).flatten(1).sum(1) for m in batch["mask_a"].values()).cpu().numpy()
    views = [(per_sample(batch[k], ENCODER), per_sample(batch[k], DECODER)) for k in ("mask_a", "mask_b")]
    return train_step_flops(shape, n_tokens, views)


def measure(size, batches, dev, steps, amp):
    """Step times of every implementation under both mask sets ("ours", "ours_corrected", ...), interleaved;
    and our model's shape (for its FLOPs). amp: the autocast context factory every forward runs in."""
    ours = build_model(size).to(dev).train()
    padded = padded_reference(ours)
    cfg = ours.config
    orig = build_original(cfg, dev).train()
    bare = Bare(cfg).to(dev).train()
    opts = {"ours": torch.optim.AdamW(ours.param_groups(0.02), lr=1e-4),
            "ours_padded": torch.optim.AdamW(padded.param_groups(0.02), lr=1e-4),
            "original": torch.optim.AdamW([p for p in orig.parameters() if p.requires_grad], lr=1e-4),
            "bare": torch.optim.AdamW(bare.parameters(), lr=1e-4)}
    runs = {}
    for masking, suffix in (("previous", ""), ("corrected", "_corrected")):
        batch = batches[masking]
        samples, full = original_samples(batch)
        runs["ours" + suffix] = partial(ours_step, ours, opts["ours"], batch, amp)
        runs["ours_padded" + suffix] = partial(ours_step, padded, opts["ours_padded"], batch, amp)
        runs["original" + suffix] = partial(original_step, orig, opts["original"], samples, full, amp)
        runs["bare" + suffix] = partial(bare_step, bare, opts["bare"], bare_inputs(batch, cfg, dev), amp)
    times = {k: [] for k in runs}
    for i in range(steps + 1):
        for name, fn in runs.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            dt = time.perf_counter() - t0
            print(f"  {size} {name} step {i}: {dt:.2f} s", file=sys.stderr, flush=True)
            if i > 0:
                times[name].append(dt)
    return times, model_shape(ours)

if __name__ == "__main__":
    main()
