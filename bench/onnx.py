"""ONNX export benchmark: the exported encoder under onnxruntime (CPU) beside the PyTorch forward it replaces
(serve/embedder.py `Embedder.embed`), same inputs, same thread count; plus the export time and the largest
difference between the two.

    python bench/onnx.py [--model random:nano] [--tile 64] [--timesteps 12] [--patch 4] [--batch 4] [--threads 1]
Prints `NAME: VALUE UNIT` and `ratio NAME: VALUE` lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# the repo root instead of bench/ itself: this file's name would shadow the onnx package
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_of(fn, repeats: int) -> float:
    """Smallest wall time of `repeats` calls (after one warm-up): the least disturbed by other load."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:nano")
    ap.add_argument("--modalities", default="sentinel2_l2a")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--timesteps", type=int, default=12)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from olmoearth.onnx_export import OnnxSignature, export_onnx
    from serve.embedder import Embedder

    torch.set_num_threads(args.threads)
    sig = OnnxSignature(tuple(args.modalities.split(",")), args.tile, args.timesteps, args.patch, args.batch)
    embedder = Embedder(args.model, device="cpu", num_threads=args.threads)
    t = time.perf_counter()
    data = export_onnx(embedder.encoder, sig)
    print(f"onnx_export_seconds: {time.perf_counter() - t:.2f} s ({len(data) / 2**20:.1f} MB)")
    ex = {k: v.numpy() for k, v in sig.example(seed=1).items()}
    months = ex.pop("months")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = args.threads
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    feed = {**ex, "months": months}
    torch_s = best_of(lambda: embedder.embed(ex, months, args.patch), args.repeats)
    ort_s = best_of(lambda: sess.run(["patches", "pooled"], feed), args.repeats)
    ref, got = embedder.embed(ex, months, args.patch), sess.run(["patches", "pooled"], feed)
    diff = max(float(np.nanmax(np.abs(ref[0] - got[0]))), float(np.abs(ref[1] - got[1]).max()))
    toks = args.batch * (args.tile // args.patch) ** 2 * args.timesteps
    print(f"onnx_signature: B={args.batch} H=W={args.tile} T={args.timesteps} p={args.patch} {args.modalities}")
    print(f"pytorch_forward: {torch_s * 1000:.1f} ms ({toks / torch_s:.0f} tokens/s per bandset)")
    print(f"onnxruntime_forward: {ort_s * 1000:.1f} ms ({toks / ort_s:.0f} tokens/s per bandset)")
    print(f"onnx_max_abs_diff: {diff:.2e}")
    print(f"load_average: {os.getloadavg()[0]:.2f}")
    print(f"ratio onnxruntime_vs_pytorch_speed: {torch_s / ort_s:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
