"""Training metrics: throughput, an estimate of model FLOP utilisation (MFU), memory, and the running means
that the training loop logs every N steps.

MFU = achieved model FLOPs per second / the device's peak FLOPs per second. Model FLOPs are counted
analytically from the transformer's shapes (matmuls only, as nanoGPT and PaLM do): forward + backward = 3 x
forward for the trained parts, forward only for the frozen target projection. Peak: a datasheet table for
known GPUs (dense bf16 / tf32), else (CPU, unknown GPU) a measured large-matmul rate on this process's threads.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

# Dense (no sparsity) peak FLOP/s per device from vendor datasheets: (bf16, fp32 via tf32).
GPU_PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "A10G": (70e12, 35e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "V100": (125e12, 15.7e12),  # fp16 tensor cores; no bf16
    "T4": (65e12, 8.1e12),
}


def measure_matmul_flops(device: torch.device | str = "cpu", dtype=torch.float32, n: int = 512,
                         seconds: float = 0.3) -> float:
    """FLOP/s of repeated n x n matmuls on this device and thread count: the practical peak used as the
    MFU denominator where no datasheet figure applies."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm up
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda":
            sync()
    elapsed = time.perf_counter() - start
    return 2.0 * n**3 * count / elapsed


def peak_flops(device: torch.device | str, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for one device at the training precision."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in GPU_PEAK_FLOPS.items():
            if key in name:
                return (bf16 if precision == "bf16" else fp32), f"datasheet {key}"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return measure_matmul_flops(device, dtype, n=4096), f"measured matmul on {name}"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # the best of a few sizes: one size alone read below what base's own GEMMs reach (cache effects)
    best = max(measure_matmul_flops(device, dtype, n=n, seconds=0.2) for n in (256, 512, 768))
    return best, f"best measured matmul, {torch.get_num_threads()} CPU thread(s)"


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a Latent MIM step's FLOPs (read from the model)."""

    enc_dim: int
    enc_depth: int
    dec_dim: int
    dec_depth: int
    mlp_ratio: float = 4.0
    patch_pixels: int = 64  # the fixed 8 x 8 patch projection's kernel
    channels_per_token: float = 67 / 12  # mean input channels of a bandset (67 channels, 12 bandsets)


def view_forward_flops(shape: ModelShape, n_enc: np.ndarray, n_dec: np.ndarray) -> float:
    """Forward FLOPs of one masked view, summed over samples (arrays hold per-sample token counts).

    Patch projection of the visible tokens (the encoder's input). Encoder: pre-norm ViT blocks
    over the visible tokens (qkv + out projections 8D^2, MLP 2*r*D^2 multiply-adds per token; attention
    2 * n^2 * D for QK^T and AV). Decoder: cross-attention blocks, queries = decoded tokens, keys/values
    = the visible tokens projected to the decoder width.
    """
    D, E, r = shape.enc_dim, shape.dec_dim, shape.mlp_ratio
    n_enc, n_dec = (np.asarray(a, dtype=np.float64) for a in (n_enc, n_dec))
    dec_in = 2 * D * E * n_enc.sum()  # encoder width -> decoder width
    dec_block = 2 * (2 * E * E * n_dec + 2 * E * E * n_enc + 2 * r * E * E * n_dec) + 2 * 2 * n_dec * n_enc * E
    decoder = shape.dec_depth * dec_block.sum() + 2 * E * D * n_dec.sum()  # + output projection
    return encoder_forward_flops(shape, n_enc) + float(dec_in + decoder)


def encoder_forward_flops(shape: ModelShape, n_enc) -> float:
    """Forward FLOPs of the encoder alone over visible tokens (n_enc: per-sample counts): the patch projection,
    the ViT blocks, project_and_aggregate. An embedding forward's MFU counts these."""
    D, r = shape.enc_dim, shape.mlp_ratio
    n_enc = np.asarray(n_enc, dtype=np.float64)
    embed = 2 * shape.channels_per_token * shape.patch_pixels * D * n_enc.sum()
    enc_block = 2 * (4 + 2 * r) * D * D * n_enc + 2 * 2 * n_enc**2 * D
    pooled = 2 * D * D * n_enc.size  # project_and_aggregate
    return float(embed + shape.enc_depth * enc_block.sum() + pooled)


def train_step_flops(shape: ModelShape, n_tokens: np.ndarray, views: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Training FLOPs of one microbatch: the frozen target projection of every present token (forward
    only), plus forward + backward (= 3 x forward) of each masked view given as (n_enc, n_dec) per sample."""
    target = 2 * shape.channels_per_token * shape.patch_pixels * shape.enc_dim * float(np.sum(n_tokens))
    return target + 3.0 * sum(view_forward_flops(shape, *v) for v in views)


def memory_bytes(device: torch.device | str) -> int:
    """Peak device memory allocated by torch (GPU) or the process's resident set size (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except ImportError:  # pragma: no cover - psutil ships with ray
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RunningMeter:
    """Sums over one logging interval; `record()` turns them into a metrics row and starts a new interval."""

    def __init__(self, peak: float):
        self.peak = peak
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.samples = 0
        self.tokens = 0
        self.flops = 0.0
        self.data_wait = 0.0  # seconds this worker waited for its input stream
        self.report_wait = 0.0  # seconds in ray.train.report (metrics and checkpoints handed to the driver)
        self.start = time.perf_counter()

    def add_losses(self, **values: float) -> None:
        for k, v in values.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def add_work(self, samples: int, tokens: int, flops: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.flops += flops

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def add_report_wait(self, seconds: float) -> None:
        self.report_wait += seconds

    def record(self, world_size: int = 1, sum_over_workers=None) -> dict[str, float]:
        """Means of the losses, throughput of all workers and per worker, MFU against one worker's peak,
        and the fraction of the interval spent waiting for data. `sum_over_workers(list[float]) ->
        list[float]` adds the workers' counts and interval lengths (an all-reduce); without it this
        worker's counts stand for every worker's (workers run in lockstep, but their batches differ in
        tokens)."""
        counts = [float(self.samples), float(self.tokens), self.flops, self.data_wait,
                  max(time.perf_counter() - self.start, 1e-9)]  # fmt: skip
        if sum_over_workers is not None and world_size > 1:
            samples, tokens, flops, wait, elapsed = sum_over_workers(counts)
            elapsed /= world_size  # the workers' mean interval
        else:
            samples, tokens, flops, wait = (c * world_size for c in counts[:4])
            elapsed = counts[4]
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        out["samples_per_s"] = samples / elapsed
        out["tokens_per_s"] = tokens / elapsed
        out["tokens_per_s_per_worker"] = tokens / world_size / elapsed
        out["mfu"] = flops / world_size / elapsed / self.peak if self.peak > 0 else float("nan")
        out["data_wait_frac"] = wait / world_size / elapsed
        out["report_frac"] = self.report_wait / elapsed  # this worker's (rank 0 also saves the history)
        out["interval_s"] = elapsed
        out["time"] = time.time()  # wall clock at the end of the interval
        self.reset()
        return out
