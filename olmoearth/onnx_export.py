"""ONNX export of an encoder for one fixed input signature, so it runs outside PyTorch (onnxruntime, ...).

    data = export_onnx(encoder, OnnxSignature(("sentinel2_l2a",), tile=64, timesteps=12, patch_size=4))
    graph inputs:  one per modality, named by it: float32 (B, H, W, T, C) raw units, NaN where missing;
                   months int64 (B, T), 0..11
    graph outputs: patches float32 (B, H/p, W/p, D), NaN where a patch has no visible token;
                   pooled float32 (B, D)
    the same values as `olmoearth.encode` -> (patches, pooled) and serve/embedder.py's `Embedder.embed`.

Why a module of its own: the eager encoder packs each sample's visible tokens to the front (`tokens.pack`),
whose length depends on the data; a traced graph would bake one mask's length in. `OnnxEncoder` instead runs
the blocks over the whole token sequence with the visibility as the attention key mask: masked keys take no
part in the softmax, so a visible token's output is the same sum, and the invisible ones are dropped by the
pooling as before. Normalisation and the missing-data mask (`inference.prepare`) are part of the graph, so a
user feeds raw pixels.

Export uses the TorchScript-based exporter (`dynamo=False`): seconds instead of minutes, and the opset is that
of the installed onnx, capped at the highest the exporter writes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from olmoearth import tokens as tk
from olmoearth.inference import pool_patches
from olmoearth.layout import ENCODER, MISSING
from olmoearth.modalities import MAX_PATCH_SIZE, MAX_TIMESTEPS, MODALITIES


@dataclass(frozen=True)
class OnnxSignature:
    """The one input shape an exported graph takes (batch size included)."""

    modalities: tuple[str, ...]  # encoder input modalities, in graph-input order
    tile: int = 64  # H = W in px
    timesteps: int = 12  # T
    patch_size: int = 4  # p: H must be a multiple
    batch: int = 1  # B

    def check(self, encoder) -> None:
        if not self.modalities:
            raise ValueError("onnx export: give at least one modality")
        for m in self.modalities:
            if m not in MODALITIES or not MODALITIES[m].encoder_input:
                raise ValueError(f"onnx export: {m!r} is not an encoder input modality")
            if m not in encoder.modalities:
                raise ValueError(f"onnx export: the encoder has no {m!r} (it takes {', '.join(encoder.modalities)})")
        if not 1 <= self.patch_size <= MAX_PATCH_SIZE or self.tile <= 0 or self.tile % self.patch_size:
            raise ValueError(f"onnx export: tile {self.tile} must be a positive multiple of patch_size "
                             f"{self.patch_size} (1..{MAX_PATCH_SIZE})")  # fmt: skip
        if not 1 <= self.timesteps <= MAX_TIMESTEPS or self.batch < 1:
            raise ValueError(f"onnx export: need 1 <= timesteps <= {MAX_TIMESTEPS} and batch >= 1")

    def example(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random raw inputs of this signature, {modality: (B, H, W, T, C)} plus "months" (B, T)."""
        g = torch.Generator().manual_seed(seed)
        b, s, t = self.batch, self.tile, self.timesteps
        out = {m: torch.rand(b, s, s, t, MODALITIES[m].num_bands, generator=g) * 3000 for m in self.modalities}
        out["months"] = torch.randint(0, 12, (b, t), generator=g)
        return out


class OnnxEncoder(nn.Module):
    """raw inputs (one tensor per modality of `sig`, then months) -> (patches (B, h, w, D), pooled (B, D))."""

    def __init__(self, encoder, sig: OnnxSignature):
        super().__init__()
        sig.check(encoder)
        self.encoder, self.sig = encoder.eval(), sig
        for m in sig.modalities:  # the normalisation windows as constants of the graph
            self.register_buffer(f"lo_{m}", torch.as_tensor(encoder.norm_stats.lo[m], dtype=torch.float32))
            self.register_buffer(f"hi_{m}", torch.as_tensor(encoder.norm_stats.hi[m], dtype=torch.float32))
        self.register_buffer("resize", resize_matrix(sig.tile, sig.patch_size))  # (H/p*8, H)

    def patch_embed(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """As MultiModalPatchEmbed.embed, with the bicubic resize as two matmuls: (B, H, W, T, C) ->
        (B, h, w, T, S, D)."""
        embed = self.encoder.patch_embeddings
        B, H, W, T, C = x.shape
        x = x.permute(0, 3, 4, 1, 2).reshape(B * T, C, H, W)  # (B*T, C, H, W)
        if self.sig.patch_size != MAX_PATCH_SIZE:
            x = self.resize @ x @ self.resize.T  # (B*T, C, H/p*8, W/p*8)
        outs = [embed.per_modality_embeddings[name][f"{name}__{i}"](x[:, sl])  # (B*T, D, h, w)
                for i, sl in enumerate(MODALITIES[name].bandset_slices())]  # fmt: skip
        y = torch.stack(outs, dim=-1)  # (B*T, D, h, w, S)
        return y.reshape(B, T, embed.dim, *y.shape[2:]).permute(0, 3, 4, 1, 5, 2)  # (B, h, w, T, S, D)

    def prepare(self, name: str, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, T, C) raw -> (normalised, 0 where missing; mask (B, h, w, T, S) ENCODER / MISSING)."""
        mod, p = MODALITIES[name], self.sig.patch_size
        B, H, W, T, C = raw.shape
        lo, hi = getattr(self, f"lo_{name}"), getattr(self, f"hi_{name}")
        t = (raw - lo) / (hi - lo)
        ok = torch.isfinite(t)  # (B, H, W, T, C)
        finite = ok.reshape(B, H // p, p, W // p, p, T, C).all(2).all(3)  # (B, h, w, T, C)
        present = torch.stack([finite[..., sl].all(-1) for sl in mod.bandset_slices()], -1)  # (B, h, w, T, S)
        mask = torch.where(present, ENCODER, MISSING).to(torch.int8)
        return torch.where(ok, t, torch.zeros_like(t)), mask

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *raws, months = inputs
        enc, p = self.encoder, self.sig.patch_size
        xs, masks = {}, {}
        for name, raw in zip(self.sig.modalities, raws, strict=True):
            xs[name], masks[name] = self.prepare(name, raw)
        tokens = {name: self.patch_embed(name, x) for name, x in xs.items()}  # {m: (B, h, w, T, S, D)}
        tokens = enc.composite_encodings(tokens, months, p)
        seq, m, shapes = tk.collapse(tokens, {n: masks[n] for n in tokens})  # (B, N, D), (B, N)
        visible = m == ENCODER  # (B, N)
        # a sample with nothing visible attends to everything (finite softmax); its outputs are all NaN-masked
        key_mask = visible | ~visible.any(1, keepdim=True)  # (B, N)
        h = seq
        for blk in enc.blocks:
            h = blk(h, key_mask=key_mask)  # (B, N, D)
        h = enc.norm(h)
        pooled = tk.masked_mean(h, visible)  # (B, D)
        h = h * visible[..., None].to(h.dtype)  # as unpack: zeros where not encoded
        masks = {n: masks[n] for n in shapes}
        patches = pool_patches(tk.expand(h, shapes), masks)  # (B, h, w, D)
        seen = sum((mk == ENCODER).flatten(3).any(-1).to(torch.int32) for mk in masks.values()) > 0  # (B, h, w)
        patches = torch.where(seen[..., None], patches, torch.full_like(patches, float("nan")))
        return patches, pooled


def resize_matrix(size: int, patch_size: int) -> torch.Tensor:
    """(size / p * 8, size): the encoder's antialiased bicubic resize along one axis (patch_embed.py), as the
    matrix it is (the resize is separable and linear), taken by resizing the unit basis. The exporter has no
    antialiased bicubic; a matmul exports everywhere."""
    from olmoearth.patch_embed import resize_for_patch_size

    if patch_size == MAX_PATCH_SIZE:
        return torch.eye(size)
    # basis (size, 1, size, 4p): a width of 1 is a degenerate case of the resize kernel, 4p is not
    basis = torch.eye(size).reshape(size, 1, size, 1).repeat(1, 1, 1, 4 * patch_size)
    out = resize_for_patch_size(basis, patch_size)  # (size, 1, size/p*8, 32)
    return out[:, 0, :, 0].T.contiguous()  # (size/p*8, size)


def default_opset() -> int:
    """The installed onnx's opset, capped at what the TorchScript exporter writes."""
    import onnx
    from torch.onnx import _constants

    return min(onnx.defs.onnx_opset_version(), _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def export_onnx(encoder, sig: OnnxSignature, opset: int | None = None) -> bytes:
    """The ONNX model (serialised) of `encoder` for inputs of signature `sig`."""
    p = next(encoder.parameters())
    if p.dtype != torch.float32 or p.device.type != "cpu":  # export an fp32 CPU copy; the caller's model stays
        import copy

        encoder = copy.deepcopy(encoder).float().cpu()
    model = OnnxEncoder(encoder, sig).eval()
    example = sig.example()
    args = tuple(example[m] for m in sig.modalities) + (example["months"],)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-to-int casts: the signature is fixed
        torch.onnx.export(model, args, buf, input_names=[*sig.modalities, "months"],
                          output_names=["patches", "pooled"], opset_version=opset or default_opset(),
                          dynamo=False, do_constant_folding=True)  # fmt: skip
    return buf.getvalue()


def run_onnx(data: bytes, x: dict, months, threads: int | None = None):
    """Run an exported graph with onnxruntime on the CPU: x {m: (B, H, W, T, C)}, months (B, T) ->
    (patches, pooled) numpy. `threads`: onnxruntime intra-op threads (None: its default)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    feed = {m: np.ascontiguousarray(np.asarray(a), dtype=np.float32) for m, a in x.items()}
    feed["months"] = np.asarray(months, dtype=np.int64)
    patches, pooled = sess.run(["patches", "pooled"], feed)
    return patches, pooled


def check_onnx(encoder, sig: OnnxSignature, data: bytes, atol: float = 1e-4) -> dict:
    """Run `data` with onnxruntime beside the PyTorch reference (olmoearth.encode) on the signature's random
    example -> {"max_abs_diff", "opset"}; raises ValueError over `atol`. Without onnxruntime: {"checked": False}."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"checked": False}
    import numpy as np

    from olmoearth.inference import encode
    from olmoearth.layout import ENCODER

    ex = sig.example(seed=1)
    months = ex.pop("months")
    ref = encode(encoder, ex, months=months, patch_size=sig.patch_size)
    seen = sum((mk == ENCODER).flatten(3).any(-1) for mk in ref.mask.values()) > 0  # (B, h, w)
    patches, pooled = run_onnx(data, {m: a.numpy() for m, a in ex.items()}, months.numpy())
    diff = max(float(np.abs(patches[seen.numpy()] - ref.patches[seen].numpy()).max()),
               float(np.abs(pooled - ref.pooled.numpy()).max()))  # fmt: skip
    if not diff <= atol:
        raise ValueError(f"onnx export: onnxruntime differs from PyTorch by {diff:.3g} > {atol:g}")
    return {"checked": True, "max_abs_diff": diff}
