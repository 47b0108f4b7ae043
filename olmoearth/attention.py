"""Transformer pieces: multi-head attention (self or cross), MLP, drop path, the pre-norm block.

Names (q, k, v, proj, norm1, attn, norm2, mlp.fc1, mlp.fc2) follow the original's `nn/attention.py` so its
checkpoints map by name. Attention runs through `F.scaled_dot_product_attention`, either over a padded batch
with a key-padding mask or over sequences stored back to back (`seq_lengths`), one unmasked call per sequence.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, (dim, num_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, seq_lengths: list[int] | None = None) -> torch.Tensor:
        """x: (B, N, D) queries; y: (B, M, D) keys/values (None: self-attention); key_mask: (B, M) bool,
        True = attend. Returns (B, N, D).

        seq_lengths (self-attention only, B == 1, no key_mask): x holds several sequences back to back, of
        these lengths (each > 0, summing to N); each attends only within itself. Same result as padding them
        into a batch with a key-padding mask, without the padded rows and the mask (which keeps SDPA on its
        unmasked kernel)."""
        B, N, D = x.shape
        H = self.num_heads
        bad_lengths = seq_lengths is not None and (y is not None or key_mask is not None or B != 1
                                                   or sum(seq_lengths) != N)
        if bad_lengths:
            raise ValueError(f"seq_lengths needs self-attention over one (1, N, D) row without key_mask; "
                             f"got x {tuple(x.shape)}, lengths summing to {sum(seq_lengths)}")
        if y is None:  # one GEMM for q, k, v (same math as three Linears)
            w = torch.cat([self.q.weight, self.k.weight, self.v.weight])  # (3D, D)
            b = torch.cat([self.q.bias, self.k.bias, self.v.bias]) if self.q.bias is not None else None
            qkv = F.linear(x, w, b).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            M = y.shape[1]
            q = self.q(x).view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, hd)
            k = self.k(y).view(B, M, H, D // H).transpose(1, 2)  # (B, H, M, hd)
            v = self.v(y).view(B, M, H, D // H).transpose(1, 2)
        if seq_lengths is not None:
            parts = [F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)  # (1, n, H, hd)
                     for qs, ks, vs in zip(q.split(seq_lengths, 2), k.split(seq_lengths, 2),
                                           v.split(seq_lengths, 2), strict=True)]
            return self.proj(torch.cat(parts, dim=1).reshape(B, N, D))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        r = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * r / keep


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x) [, context]) ; x + mlp(norm2(x)). No LayerScale.

    cross_attn: queries x attend to context y only (the original decoder: no self-attention among
    queries); the context is NOT normalised by the block (as the original)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 cross_attn: bool = False):
        super().__init__()
        self.cross_attn = cross_attn
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, seq_lengths: list[int] | None = None) -> torch.Tensor:
        """seq_lengths: see Attention.forward. Drop path draws one value per row of x, so with sequences
        stored back to back it would drop them together: not allowed while drop path is active."""
        if seq_lengths is not None and self.training and self.drop_path.p > 0:
            raise ValueError("seq_lengths with an active drop path would drop all sequences together")
        context = y if self.cross_attn else None
        x = x + self.drop_path(self.attn(self.norm1(x), context, key_mask, seq_lengths))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_linear(m: nn.Module) -> None:
    """The original's init: every nn.Linear xavier_uniform with zero bias; Conv2d keeps PyTorch defaults."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
