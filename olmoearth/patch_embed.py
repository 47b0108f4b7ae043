"""Flexible patch embedding: one token per (spatial patch, timestep, bandset).

Every (modality, bandset) has its own Conv2d(C_bandset -> D, kernel 8, stride 8). For a patch size p != 8
the INPUT is resized by 8/p (bicubic, antialias) so that H -> H/p * 8, then the fixed 8x8 projection runs:
resize the image, not the kernel (the original v1's FlexiPatchEmbed).

Parameter names follow the original so its checkpoints map by name:
    per_modality_embeddings.<modality>.<modality>__<i>.proj.{weight,bias}
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from olmoearth.modalities import MAX_PATCH_SIZE, MODALITIES


def resize_for_patch_size(x: torch.Tensor, patch_size: int, base: int = MAX_PATCH_SIZE) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C, H // p * 8, W // p * 8), bicubic with antialias (identity at p = 8)."""
    if patch_size == base:
        return x
    size = (x.shape[-2] // patch_size * base, x.shape[-1] // patch_size * base)
    return F.interpolate(x, size=size, mode="bicubic", antialias=True)


class BandsetEmbed(nn.Module):
    """The 8x8 projection of one bandset (named `proj` as the original)."""

    def __init__(self, in_chans: int, dim: int, base_patch: int = MAX_PATCH_SIZE):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=base_patch, stride=base_patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (N, C, H', W') -> (N, D, H'/8, W'/8)


class MultiModalPatchEmbed(nn.Module):
    """x: {modality: (B, H, W, T, C)} -> tokens {modality: (B, H/p, W/p, T, S, D)}."""

    def __init__(self, modalities: tuple[str, ...], dim: int, base_patch: int = MAX_PATCH_SIZE):
        super().__init__()
        self.base_patch = base_patch
        self.dim = dim
        self.per_modality_embeddings = nn.ModuleDict()
        for name in modalities:
            mod = MODALITIES[name]
            self.per_modality_embeddings[name] = nn.ModuleDict(
                {f"{name}__{i}": BandsetEmbed(bs.num_bands, dim, base_patch) for i, bs in enumerate(mod.bandsets)}
            )

    def embed(self, name: str, x: torch.Tensor, patch_size: int) -> torch.Tensor:
        B, H, W, T, C = x.shape
        x = x.permute(0, 3, 4, 1, 2).reshape(B * T, C, H, W)  # (B*T, C, H, W)
        x = resize_for_patch_size(x, patch_size, self.base_patch)  # (B*T, C, H/p*8, W/p*8)
        outs = []
        for i, sl in enumerate(MODALITIES[name].bandset_slices()):
            y = self.per_modality_embeddings[name][f"{name}__{i}"](x[:, sl])  # (B*T, D, h, w)
            outs.append(y)
        y = torch.stack(outs, dim=-1)  # (B*T, D, h, w, S)
        h, w, S = y.shape[2], y.shape[3], y.shape[4]
        return y.reshape(B, T, self.dim, h, w, S).permute(0, 3, 4, 1, 5, 2)  # (B, h, w, T, S, D)

    def forward(self, x: dict[str, torch.Tensor], patch_size: int) -> dict[str, torch.Tensor]:
        return {name: self.embed(name, v, patch_size) for name, v in x.items()}
