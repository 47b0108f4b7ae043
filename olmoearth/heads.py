"""Task heads over encoder features, as the original's evaluation heads (one idea each).

    LinearHead    pooled (B, D)          -> (B, K)           scene tasks (classification, multilabel, regression)
    UpsampleHead  patches (B, h, w, D)   -> (B, K, h*p, w*p)  per token a Linear to K * p * p values, laid out
                                                             as the p x p pixels of its patch (pixel shuffle):
                                                             the original's segmentation probe head
    UNetHead      patches (B, h, w, D)   -> (B, K, h*p, w*p)  a light decoder: 1x1 conv to `width`, then
                                                             ceil(log2 p) stages of (upsample, 3x3 conv, norm,
                                                             GELU) halving the width, then a 1x1 conv to K

The encoder gives one token grid (no multi-scale pyramid), so the UNet-style decoder has no skip
connections; its stages learn the upsampling that UpsampleHead does in one linear step.

Every head first standardises its input features (FeatureNorm: BatchNorm without affine parameters, MAE's
linear-probe recipe). An encoder's pooled / patch output is nearly the same vector for every chip plus small
chip-specific deviations; the frozen linear probe standardises features with the train mean and std, and a
head fed raw features needs very large weights to separate classes, which tens of AdamW steps never reach
(it predicts one class). Standardised, the head starts where the probe does and unfreezing improves on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureNorm(nn.BatchNorm1d):
    """Per-feature standardisation of (N, D) features: batch statistics in training (running ones kept for
    eval), no affine parameters (the linear layer after it has them). A training batch of one sample has no
    spread to standardise by, so it uses the running statistics instead of failing as BatchNorm1d does."""

    def __init__(self, dim: int):
        super().__init__(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            stats = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
            return F.batch_norm(x, *stats, training=False, eps=self.eps)
        return super().forward(x)


def norm_tokens(norm: FeatureNorm, patches: torch.Tensor) -> torch.Tensor:
    """FeatureNorm over the channel axis of (B, h, w, D) patch tokens (every token a sample)."""
    B, h, w, D = patches.shape
    return norm(patches.reshape(B * h * w, D)).view(B, h, w, D)


class LinearHead(nn.Module):
    def __init__(self, dim: int, num_outputs: int):
        super().__init__()
        self.norm = FeatureNorm(dim)
        self.linear = nn.Linear(dim, num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(pooled))  # (B, D) -> (B, K)


class UpsampleHead(nn.Module):
    def __init__(self, dim: int, num_outputs: int, patch_size: int):
        super().__init__()
        self.num_outputs, self.patch_size = num_outputs, patch_size
        self.norm = FeatureNorm(dim)
        self.linear = nn.Linear(dim, num_outputs * patch_size * patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        B, h, w, _ = patches.shape
        K, p = self.num_outputs, self.patch_size
        z = self.linear(norm_tokens(self.norm, patches))  # (B, h, w, K*p*p), ordered (K, i, j)
        z = z.view(B, h, w, K, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, K, h, p, w, p)
        return z.reshape(B, K, h * p, w * p)  # (B, K, H, W)


class UpStage(nn.Module):
    """Resize to `size`, then 3x3 conv -> GroupNorm -> GELU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, c_out), c_out)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.gelu(self.norm(self.conv(x)))


class UNetHead(nn.Module):
    def __init__(self, dim: int, num_outputs: int, patch_size: int, width: int = 128):
        super().__init__()
        self.patch_size = patch_size
        self.norm = FeatureNorm(dim)
        self.stem = nn.Conv2d(dim, width, 1)
        n = max(1, math.ceil(math.log2(patch_size))) if patch_size > 1 else 1
        widths = [max(16, width // 2**i) for i in range(n + 1)]
        self.stages = nn.ModuleList([UpStage(widths[i], widths[i + 1]) for i in range(n)])
        self.out = nn.Conv2d(widths[-1], num_outputs, 1)

    def stage_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        """Grid size after each stage: x2 per stage, the last one landing on (h*p, w*p) exactly."""
        p, n = self.patch_size, len(self.stages)
        scales = [min(2 ** (i + 1), p) for i in range(n)]
        scales[-1] = p
        return [(h * s, w * s) for s in scales]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        B, h, w, _ = patches.shape
        x = self.stem(norm_tokens(self.norm, patches).permute(0, 3, 1, 2))  # (B, width, h, w)
        for stage, size in zip(self.stages, self.stage_sizes(h, w), strict=True):
            x = stage(x, size)  # (B, c, h*s, w*s)
        return self.out(x)  # (B, K, H, W)


def build_head(name: str, dim: int, num_outputs: int, patch_size: int) -> nn.Module:
    if name == "linear":
        return LinearHead(dim, num_outputs)
    if name == "upsample":
        return UpsampleHead(dim, num_outputs, patch_size)
    if name == "unet":
        return UNetHead(dim, num_outputs, patch_size)
    raise ValueError(f"head must be one of linear, upsample, unet; got {name!r}")
