"""The encoder: patch embed -> composite encodings -> keep the ENCODER tokens -> pre-norm ViT -> norm.

Full attention over all visible tokens of all modalities, timesteps and bandsets; tokens not visible in
this view (IGNORED, DECODER, MISSING) are removed, samples are padded to the longest and a key-padding mask
hides the padding. Maps (decode-only modalities) are refused: they can never reach the encoder.

Names follow the original `Encoder` (patch_embeddings, composite_encodings, blocks, norm,
project_and_aggregate.projection.0) so its state dict maps by name.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from olmoearth import tokens as tk
from olmoearth.attention import Block, init_linear
from olmoearth.encodings import CompositeEncodings
from olmoearth.layout import ENCODER
from olmoearth.modalities import BASE_GSD, ENCODER_MODALITIES, MAX_PATCH_SIZE, MODALITIES, NormStats
from olmoearth.patch_embed import MultiModalPatchEmbed


class EncoderOutput(NamedTuple):
    tokens: dict[str, torch.Tensor]  # {m: (B, h, w, T, S, D)}, zeros where not encoded
    mask: dict[str, torch.Tensor]  # {m: (B, h, w, T, S)} the view's mask, as given
    pooled: torch.Tensor  # (B, D) mean of the visible (ENCODER) tokens
    projected: torch.Tensor  # (B, D) project_and_aggregate: Linear(pooled), for the contrastive loss


class ProjectAndAggregate(nn.Module):
    """Mean of the visible tokens, then Linear(D, D) (aggregate_then_project, one layer: the v1 setting)."""

    def __init__(self, dim: int):
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(pooled)


class Encoder(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 modalities: tuple[str, ...] = tuple(MODALITIES), max_patch_size: int = MAX_PATCH_SIZE,
                 mask_padding_in_eval: bool = True):
        super().__init__()
        self.embedding_dim = dim
        self.max_patch_size = max_patch_size
        # The original skips the key-padding mask in eval mode (padded slots then take part in attention).
        # We mask always (mask_padding_in_eval=True), so an embedding does not depend on its batch-mates;
        # set False to reproduce the released evaluations bit for bit.
        self.mask_padding_in_eval = mask_padding_in_eval
        self.modalities = tuple(modalities)
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio, drop_path=drop_path) for _ in range(depth)]
        )
        self.composite_encodings = CompositeEncodings(dim, self.modalities)
        self.apply(init_linear)
        # patch embeddings of every modality (maps too): the frozen target projection copies them all
        self.patch_embeddings = MultiModalPatchEmbed(self.modalities, dim, max_patch_size)
        self.norm = nn.LayerNorm(dim)
        self.project_and_aggregate = ProjectAndAggregate(dim)
        self.project_and_aggregate.apply(init_linear)
        self.norm_stats = NormStats.default()

    def check_inputs(self, x: dict, months: torch.Tensor, mask: dict, patch_size: int) -> None:
        if not x:
            raise ValueError("encoder input is empty: give at least one of " + ", ".join(ENCODER_MODALITIES))
        if not 1 <= int(patch_size) <= self.max_patch_size:
            raise ValueError(f"patch_size must be in 1..{self.max_patch_size}, got {patch_size}")
        for name, v in x.items():
            if name not in MODALITIES:
                raise ValueError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}")
            if not MODALITIES[name].encoder_input:
                raise ValueError(f"modality {name!r} is a decode-only map and cannot be an encoder input")
            if name not in self.modalities:
                raise ValueError(f"modality {name!r} is not supported by this encoder ({self.modalities})")
            mod = MODALITIES[name]
            if v.ndim != 5 or v.shape[-1] != mod.num_bands:
                raise ValueError(f"{name} must be (B, H, W, T, {mod.num_bands}), got {tuple(v.shape)}")
            B, H, W, T, _ = v.shape
            if H % patch_size or W % patch_size:
                raise ValueError(f"{name}: size {H}x{W} is not a multiple of patch size {patch_size}")
            if months.ndim != 2 or months.shape[0] != B or months.shape[1] < T:
                raise ValueError(f"months must be (B={B}, T>={T}), got {tuple(months.shape)}")
            want = (B, H // patch_size, W // patch_size, T, mod.num_bandsets)
            if name not in mask or tuple(mask[name].shape) != want:
                got = None if name not in mask else tuple(mask[name].shape)
                raise ValueError(f"mask of {name} must have shape {want}, got {got}")

    def forward(self, x: dict[str, torch.Tensor], months: torch.Tensor, mask: dict[str, torch.Tensor],
                patch_size: int, input_res: float = BASE_GSD) -> EncoderOutput:
        """x: {m: (B, H, W, T, C)} normalised, 0 where missing; months (B, T); mask {m: (B, h, w, T, S)}."""
        self.check_inputs(x, months, mask, patch_size)
        tokens = self.patch_embeddings(x, patch_size)  # {m: (B, h, w, T, S, D)}
        tokens = self.composite_encodings(tokens, months, patch_size, input_res)
        seq, m, shapes = tk.collapse(tokens, {n: mask[n] for n in tokens})  # (B, N, D), (B, N)
        visible = m == ENCODER  # (B, N)
        h, idx, valid = tk.pack(seq, visible)  # (B, L, D)
        key_mask = tk.key_padding_mask(valid) if (self.training or self.mask_padding_in_eval) else None
        for blk in self.blocks if h.shape[1] else []:
            h = blk(h, key_mask=key_mask)  # (B, L, D)
        h = self.norm(h)
        pooled = tk.masked_mean(h, valid)  # (B, D)
        out = tk.unpack(h, idx, valid, seq.shape[1])  # (B, N, D)
        return EncoderOutput(tk.expand(out, shapes), {n: mask[n] for n in shapes}, pooled,
                             self.project_and_aggregate(pooled))
