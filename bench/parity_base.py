"""Checkpoint parity and encoder speed, this project vs the original OlmoEarth v1 code, per size and input.

For each size of `--size` (comma-separated) it builds the ORIGINAL v1 model (PyPI olmoearth-pretrain-minimal)
with random weights, saves it as an original folder (config.json + weights.pth), converts it with
`olmoearth.convert`, and on the same inputs measures side by side:

    max |diff| of per-patch tokens, pooled and projected embeddings (pass mark 1e-4, float32)
    encoder forward time of each implementation (best of --repeats, the two run in turns), and their ratio
    this encoder under bf16 autocast (--bf16): its forward time, its ratios to fp32 and to the original, and
    the smallest cosine of its pooled and per-token embeddings to fp32's
    tokens/s and MFU of this encoder (model FLOPs: pipelines/pretrain/throughput.encoder_forward_flops; peak:
    the datasheet for known GPUs, else a measured matmul rate at that precision on this device and threads)

Inputs (issue #18): Sentinel-2 + Sentinel-1 + Landsat, --timesteps months, a --grid x --grid token grid at
each patch size of --patch_sizes (pixels = grid * p), a batch "full" (nothing missing) and "missing"
(sample 0 lacks Sentinel-2 month 1, sample 1 Landsat month 5).

    .venv/bin/python bench/parity_base.py                          # nano, tiny, base on 2 CPU threads
    .venv/bin/python bench/parity_base.py --size large --device cuda

Prints `NAME: VALUE UNIT` per figure and `ratio NAME: VALUE` per size and input, where VALUE is the
original's forward time over ours (above 1: ours is faster). Exit status 1 if parity fails.
The original runs its key-padding path (tests/original_models.py, mode "masked"): attention over visible
tokens only, the semantics of this project. On "full" inputs its eval fast pass (no token removal, no mask)
gives the same output and is timed too (`original_fast`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from original_models import build_original, original_encode, random_inputs, write_original_folder  # noqa: E402

from olmoearth.convert import convert  # noqa: E402
from olmoearth.layout import ENCODER, MISSING  # noqa: E402
from olmoearth.loading import load_model  # noqa: E402
from olmoearth.modalities import MODALITIES  # noqa: E402
from olmoearth.precision import autocast  # noqa: E402
from pipelines.common.config import load_config  # noqa: E402
from pipelines.pretrain.throughput import encoder_forward_flops, peak_flops  # noqa: E402
from pipelines.pretrain.worker import model_shape  # noqa: E402

MODS = ("sentinel2_l2a", "sentinel1", "landsat")


@dataclass
class BenchConfig:
    size: str = "nano,tiny,base"  # v1 model sizes, comma-separated: nano | tiny | base | large
    batch: int = 2  # samples per forward (2 at least: the "missing" batch uses two samples)
    grid: int = 4  # tokens per side of the spatial grid; pixels = grid * patch size
    timesteps: int = 12  # months per sample
    patch_sizes: str = "4,1"  # encoder patch sizes, comma-separated, each 1..8
    repeats: int = 3  # timed forwards per side (after one warm-up); the best counts
    device: str = "cpu"  # torch device of both models
    threads: int = 2  # torch intra-op threads on CPU
    threshold: float = 1e-4  # largest max |diff| that counts as parity
    bf16: bool = True  # also time this encoder under bf16 autocast (native on GPUs, AVX512-BF16 / AMX CPUs)


def timed(fns: dict, repeats: int, device: str) -> tuple[dict[str, float], dict[str, object]]:
    """Best wall time of each function, called in turns (so both sides see the same machine load)."""
    outs, best = {}, {k: float("inf") for k in fns}
    for i in range(repeats + 1):  # first round warms up
        for k, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            outs[k] = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                best[k] = min(best[k], time.perf_counter() - t)
    return best, outs


def bench_inputs(cfg: BenchConfig, p: int, with_missing: bool, dev: torch.device):
    """(x, months, missing {m: (B, T) bool}, masks {m: (B, h, w, T, S)}) for one patch size."""
    x, months = random_inputs(cfg.batch, cfg.grid * p, cfg.timesteps, MODS, seed=1)
    missing = {
        n: torch.zeros(cfg.batch, cfg.timesteps, dtype=torch.bool)
        for n in ("sentinel2_l2a", "landsat")
    }
    if with_missing:
        missing["sentinel2_l2a"][0, min(1, cfg.timesteps - 1)] = True
        missing["landsat"][1, min(5, cfg.timesteps - 1)] = True
    masks = {}
    for n, v in x.items():
        B, H, W, T, _ = v.shape
        m = torch.full((B, H // p, W // p, T, MODALITIES[n].num_bandsets), ENCODER, dtype=torch.int8)
        if n in missing:
            m[missing[n][:, None, None, :, None].expand_as(m)] = MISSING
        masks[n] = m.to(dev)
    return ({k: v.to(dev) for k, v in x.items()}, months.to(dev), {k: v.to(dev) for k, v in missing.items()},
            masks)


def bf16_forward(encoder, x, months, masks, p: int, dev: torch.device):
    """This encoder's forward under bf16 autocast (olmoearth.precision.autocast, as serving runs it)."""
    with autocast(dev, "bf16"):
        return encoder(x, months, masks, p)


def bench_size(cfg: BenchConfig, size: str, dev: torch.device, peaks: dict) -> bool:
    t0 = time.perf_counter()
    orig = build_original(size, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_original_folder(orig, size, os.path.join(tmp, f"OlmoEarth-v1-{size}"))
        size_mb = os.path.getsize(os.path.join(folder, "weights.pth")) / 2**20
        t = time.perf_counter()
        convert(folder, os.path.join(tmp, "model.safetensors"))
        convert_s = time.perf_counter() - t
        ours = load_model(os.path.join(tmp, "model.safetensors"))
    orig, ours = orig.to(dev), ours.to(dev).eval()
    print(f"# parity_base: OlmoEarth v1 {size}, device {cfg.device}, {torch.get_num_threads()} threads, "
          f"B={cfg.batch} T={cfg.timesteps} grid {cfg.grid}x{cfg.grid}, S2+S1+Landsat")
    print(f"{size}_encoder_params: {sum(p.numel() for p in ours.encoder.parameters()) / 1e6:.2f} M")
    print(f"{size}_original_weights_file: {size_mb:.1f} MiB")
    print(f"{size}_convert_time: {convert_s:.2f} s")
    print(f"{size}_setup_time: {time.perf_counter() - t0:.2f} s")
    ok = True
    for p in (int(v) for v in cfg.patch_sizes.split(",")):
        for with_missing in (False, True):
            x, months, missing, masks = bench_inputs(cfg, p, with_missing, dev)
            fns = {
                "original": partial(original_encode, orig, x, months, p, missing=missing, mode="masked"),
                "ours": partial(ours.encoder, x, months, masks, p),
            }
            if cfg.bf16:
                fns["ours_bf16"] = partial(bf16_forward, ours.encoder, x, months, masks, p, dev)
            if not with_missing:  # the original's fastest mode, equal to ours only without missing tokens
                fns["original_fast"] = partial(original_encode, orig, x, months, p, mode="fast")
            with torch.no_grad():
                best, outs = timed(fns, cfg.repeats, cfg.device)
            o, r = outs["original"], outs["ours"]
            tok = 0.0
            for n in MODS:
                vis = (o["masks"][n] == ENCODER)[..., None]
                tok = max(tok, float(((o["tokens"][n] - r.tokens[n]).abs() * vis).max()))
            pooled = float((o["pooled"] - r.pooled).abs().max())
            projected = float((o["projected"] - r.projected).abs().max())
            visible = torch.cat([(m == ENCODER).flatten(1) for m in masks.values()], 1).sum(1)  # (B,) per sample
            n_tokens = int(visible.sum())
            name = f"{size}_p{p}_{'missing' if with_missing else 'full'}"
            print(f"# {name}: {cfg.grid * p}x{cfg.grid * p} px, {n_tokens} visible tokens per batch")
            print(f"{name}_max_abs_diff_tokens: {tok:.3e} abs")
            print(f"{name}_max_abs_diff_pooled: {pooled:.3e} abs")
            print(f"{name}_max_abs_diff_projected: {projected:.3e} abs")
            for k, v in best.items():
                print(f"{name}_{k}_forward: {v * 1e3:.1f} ms")
            flops = encoder_forward_flops(model_shape(ours), visible.tolist())
            for k, prec in (("ours", "fp32"), ("ours_bf16", "bf16")):
                if k in best:
                    if prec not in peaks:
                        peaks[prec] = peak_flops(dev, prec)
                    peak, source = peaks[prec]
                    print(f"{name}_{k}_tokens_per_s: {n_tokens / best[k]:.0f} tokens/s")
                    print(f"{name}_{k}_mfu: {100 * flops / best[k] / peak:.2f} % (of {peak / 1e12:.2f} TFLOP/s, {source})")
            print(f"ratio {name}_original_over_ours: {best['original'] / best['ours']:.3f}")
            if "ours_bf16" in best:
                b = outs["ours_bf16"]
                cos = torch.nn.functional.cosine_similarity
                tok_cos = min(float(cos(b.tokens[n].float(), r.tokens[n], dim=-1)[o["masks"][n] == ENCODER].min())
                              for n in MODS)  # fmt: skip
                print(f"{name}_bf16_min_cosine_pooled: {float(cos(b.pooled.float(), r.pooled, dim=-1).min()):.6f}")
                print(f"{name}_bf16_min_cosine_tokens: {tok_cos:.6f}")
                print(f"ratio {name}_ours_fp32_over_bf16: {best['ours'] / best['ours_bf16']:.3f}")
                print(f"ratio {name}_original_over_ours_bf16: {best['original'] / best['ours_bf16']:.3f}")
            if "original_fast" in best:
                print(f"ratio {name}_original_fast_over_ours: {best['original_fast'] / best['ours']:.3f}")
            passed = max(tok, pooled, projected) <= cfg.threshold
            print(f"{name}_parity_pass: {int(passed)} bool")
            ok = ok and passed
    return ok


def main(argv=None) -> int:
    cfg = load_config(BenchConfig, argv, description=__doc__)
    if cfg.batch < 2:
        raise ValueError("--batch must be 2 or more (the missing-token batch differs between two samples)")
    dev = torch.device(cfg.device)
    if dev.type == "cpu":
        torch.set_num_threads(cfg.threads)
    ok, peaks = True, {}  # peaks: {precision: (FLOP/s, source)}, measured once
    for size in cfg.size.split(","):
        ok = bench_size(cfg, size.strip(), dev, peaks) and ok
    print(f"parity_pass: {int(ok)} bool")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
