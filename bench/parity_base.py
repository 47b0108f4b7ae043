"""Base-size (or any size) checkpoint parity and encoder speed, this project vs the original OlmoEarth v1 code.

Builds the ORIGINAL v1 model of `--size` (PyPI olmoearth-pretrain-minimal) with random weights, saves it as an
original folder (config.json + weights.pth), converts it with `olmoearth.convert`, and on the same inputs
(Sentinel-2 + Sentinel-1 + Landsat, one missing Sentinel-2 timestep) measures side by side:

    max |diff| of per-patch tokens, pooled and projected embeddings (pass mark 1e-4, float32)
    encoder forward time of each implementation (median of --repeats), and their ratio

    .venv/bin/python bench/parity_base.py                 # base, CPU
    .venv/bin/python bench/parity_base.py --size large --device cuda

Prints `NAME: VALUE UNIT` per figure and `ratio NAME: VALUE`. Exit status 1 if parity fails.
The original runs its key-padding path (see tests/original_models.py, mode "masked"): attention over
visible tokens only, the semantics of this project.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from original_models import build_original, original_encode, random_inputs, write_original_folder  # noqa: E402

from olmoearth.convert import convert  # noqa: E402
from olmoearth.layout import ENCODER, MISSING  # noqa: E402
from olmoearth.loading import load_model  # noqa: E402
from olmoearth.modalities import MODALITIES  # noqa: E402
from pipelines.common.config import load_config  # noqa: E402


@dataclass
class BenchConfig:
    size: str = "base"  # v1 model size: nano | tiny | base | large
    batch: int = 2  # samples per forward
    pixels: int = 32  # H = W
    timesteps: int = 4  # timesteps per sample
    patch_size: int = 4  # encoder patch size, 1..8
    repeats: int = 3  # timed forwards per side (after one warm-up)
    device: str = "cpu"  # torch device of both models
    threshold: float = 1e-4  # largest max |diff| that counts as parity


def timed(fn, repeats: int, device: str) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats + 1):  # first call warms up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]), out


def main(argv=None) -> int:
    cfg = load_config(BenchConfig, argv, description=__doc__)
    dev = torch.device(cfg.device)
    t0 = time.perf_counter()
    orig = build_original(cfg.size, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_original_folder(orig, cfg.size, os.path.join(tmp, f"OlmoEarth-v1-{cfg.size}"))
        size_mb = os.path.getsize(os.path.join(folder, "weights.pth")) / 2**20
        t = time.perf_counter()
        convert(folder, os.path.join(tmp, "model.safetensors"))
        convert_s = time.perf_counter() - t
        ours = load_model(os.path.join(tmp, "model.safetensors"))
    setup_s = time.perf_counter() - t0
    orig, ours = orig.to(dev), ours.to(dev)

    mods = ("sentinel2_l2a", "sentinel1", "landsat")
    x, months = random_inputs(cfg.batch, cfg.pixels, cfg.timesteps, mods, seed=1)
    missing = {"sentinel2_l2a": torch.zeros(cfg.batch, cfg.timesteps, dtype=torch.bool)}
    missing["sentinel2_l2a"][0, 1] = True
    x = {k: v.to(dev) for k, v in x.items()}
    months = months.to(dev)
    p = cfg.patch_size
    masks = {}
    for n, v in x.items():
        B, H, W, T, _ = v.shape
        m = torch.full((B, H // p, W // p, T, MODALITIES[n].num_bandsets), ENCODER, dtype=torch.int8, device=dev)
        if n in missing:
            m[missing[n].to(dev)[:, None, None, :, None].expand_as(m)] = MISSING
        masks[n] = m
    miss_dev = {k: v.to(dev) for k, v in missing.items()}

    def run_orig():
        return original_encode(orig, x, months, p, missing=miss_dev, mode="masked")

    def run_ours():
        with torch.no_grad():
            return ours.encoder(x, months, masks, p)

    t_orig, o = timed(run_orig, cfg.repeats, cfg.device)
    t_ours, r = timed(run_ours, cfg.repeats, cfg.device)
    tok = 0.0
    for n in mods:
        vis = (o["masks"][n] == ENCODER)[..., None]
        tok = max(tok, float(((o["tokens"][n] - r.tokens[n]).abs() * vis).max()))
    pooled = float((o["pooled"] - r.pooled).abs().max())
    projected = float((o["projected"] - r.projected).abs().max())
    n_tokens = sum(int((m == ENCODER).sum()) for m in masks.values())

    print(f"# parity_base: OlmoEarth v1 {cfg.size}, device {cfg.device}, B={cfg.batch} {cfg.pixels}x{cfg.pixels} px "
          f"T={cfg.timesteps} p={p}, S2+S1+Landsat, one missing S2 timestep")
    print(f"encoder_params: {sum(p.numel() for p in ours.encoder.parameters()) / 1e6:.2f} M")
    print(f"original_weights_file: {size_mb:.1f} MiB")
    print(f"convert_time: {convert_s:.2f} s")
    print(f"setup_time: {setup_s:.2f} s")
    print(f"visible_tokens_per_batch: {n_tokens} tokens")
    print(f"max_abs_diff_tokens: {tok:.3e} abs")
    print(f"max_abs_diff_pooled: {pooled:.3e} abs")
    print(f"max_abs_diff_projected: {projected:.3e} abs")
    print(f"original_encoder_forward: {t_orig * 1e3:.1f} ms")
    print(f"ours_encoder_forward: {t_ours * 1e3:.1f} ms")
    print(f"original_tokens_per_s: {n_tokens / t_orig:.0f} tokens/s")
    print(f"ours_tokens_per_s: {n_tokens / t_ours:.0f} tokens/s")
    print(f"ratio ours_over_original_forward_time: {t_ours / t_orig:.3f}")
    ok = max(tok, pooled, projected) <= cfg.threshold
    print(f"parity_pass: {int(ok)} bool")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
