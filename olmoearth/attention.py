"""Transformer pieces: multi-head attention (self or cross), MLP, drop path, the pre-norm block.

Names (q, k, v, proj, norm1, attn, norm2, mlp.fc1, mlp.fc2) follow the original's `nn/attention.py` so its
checkpoints map by name. Attention runs through `F.scaled_dot_product_attention`, either over a padded batch
with a key-padding mask or over sequences stored back to back (`seq_lengths`): one unmasked call per sequence,
or on CUDA in bf16 / fp16 one variable-length flash attention call for all of them.
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

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                seq_lengths: list[int] | None = None, key_lengths: list[int] | None = None) -> torch.Tensor:
        """x: (B, N, D) queries; y: (B, M, D) keys/values (None: self-attention); key_mask: (B, M) bool,
        True = attend. Returns (B, N, D).

        seq_lengths (B == 1, no key_mask): x holds several sequences back to back, of these lengths (each >= 0,
        summing to N). Self-attention: each attends only within itself. Cross-attention: y (1, M, D) holds as
        many key sequences back to back, of `key_lengths` (summing to M), and query sequence i attends to key
        sequence i only; one with no keys attends to a single zero key, as it does in the padded batch under
        tokens.key_padding_mask. Same result as padding them into a batch with a key-padding mask, without the
        padded rows and the mask (which keeps SDPA on its unmasked kernel)."""
        B, N, D = x.shape
        H = self.num_heads
        if seq_lengths is not None:
            self.check_lengths(x, y, key_mask, seq_lengths, key_lengths)
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
            out = self.attend_per_sequence(q, k, v, seq_lengths, seq_lengths if y is None else key_lengths)
            return self.proj(out.reshape(B, N, D))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    @staticmethod
    def check_lengths(x, y, key_mask, seq_lengths, key_lengths) -> None:
        N, M = x.shape[1], None if y is None else y.shape[1]
        bad = key_mask is not None or x.shape[0] != 1 or sum(seq_lengths) != N or min(seq_lengths, default=0) < 0
        if y is None:
            bad = bad or key_lengths is not None
        else:
            bad = (bad or y.shape[0] != 1 or key_lengths is None or len(key_lengths) != len(seq_lengths)
                   or sum(key_lengths) != M or min(key_lengths, default=0) < 0)
        if bad:
            raise ValueError(f"seq_lengths needs (1, N, D) rows (and (1, M, D) keys with as many key_lengths) "
                             f"without key_mask; got x {tuple(x.shape)}, y {None if y is None else tuple(y.shape)}, "
                             f"seq_lengths summing to {sum(seq_lengths)}, key_lengths {key_lengths}")

    def attend_per_sequence(self, q, k, v, q_lengths: list[int], k_lengths: list[int]) -> torch.Tensor:
        """q: (1, H, N, hd), k, v: (1, H, M, hd), sequences back to back -> (1, N, H, hd), sequence i of q
        attending to sequence i of k, v only. On CUDA in bf16 / fp16 one variable-length flash call does all
        sequences (`varlen_kernel`); elsewhere one unmasked SDPA call per sequence."""
        k, v, k_lengths = self.zero_keys_where_empty(k, v, q_lengths, k_lengths)
        kernel = varlen_kernel(q)
        if kernel is not None:
            return attend_varlen(kernel, q, k, v, q_lengths, k_lengths)
        _, H, N, hd = q.shape
        parts = []
        for qs, ks, vs in zip(q.split(q_lengths, 2), k.split(k_lengths, 2), v.split(k_lengths, 2), strict=True):
            if qs.shape[2]:
                parts.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2))  # (1, n, H, hd)
        return torch.cat(parts, dim=1) if parts else q.new_zeros(1, 0, H, hd)

    def zero_keys_where_empty(self, k, v, q_lengths: list[int], k_lengths: list[int]):
        """A sequence with queries but no keys gets one key: the projection of a zero row, the padded batch's
        single unmasked slot under tokens.key_padding_mask. -> (k, v, key lengths)."""
        empty = [i for i, (n, m) in enumerate(zip(q_lengths, k_lengths, strict=True)) if n and not m]
        if not empty:
            return k, v, k_lengths
        _, H, _, hd = k.shape
        zero = k.new_zeros(1, 1, H * hd)
        zk = self.k(zero).view(1, 1, H, hd).transpose(1, 2).to(k.dtype)  # (1, H, 1, hd)
        zv = self.v(zero).view(1, 1, H, hd).transpose(1, 2).to(v.dtype)
        ks, vs = list(k.split(k_lengths, 2)), list(v.split(k_lengths, 2))
        for i in empty:
            ks[i], vs[i] = zk, zv
        lengths = [1 if i in empty else m for i, m in enumerate(k_lengths)]
        return torch.cat(ks, 2), torch.cat(vs, 2), lengths


def varlen_kernel(q: torch.Tensor):
    """PyTorch's variable-length flash attention (torch.nn.attention.varlen) where it runs: a CUDA tensor in
    bf16 / fp16 (what autocast gives), else None."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # an older torch: the per-sequence loop
        return None
    return varlen_attn


def attend_varlen(kernel, q, k, v, q_lengths: list[int], k_lengths: list[int]) -> torch.Tensor:
    """All sequences in one call of a varlen kernel (its layout: (tokens, H, hd) plus cumulative offsets);
    q: (1, H, N, hd), k, v: (1, H, M, hd) -> (1, N, H, hd)."""
    def offsets(lengths):
        return torch.tensor([0, *lengths], device=q.device).cumsum(0).to(torch.int32)

    # num_splits=1: no split-KV, so a sequence's result does not depend on its batch-mates
    out = kernel(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(),
                 v[0].transpose(0, 1).contiguous(), offsets(q_lengths), offsets(k_lengths),
                 max(q_lengths, default=0), max(k_lengths, default=0), num_splits=1)  # (N, H, hd)  # fmt: skip
    return out[None]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (training only): each sample's branch is kept with probability 1 - p and
    scaled by 1 / (1 - p), or dropped whole.

    x: (B, ...) one sample per row, or with seq_lengths (B ints) x (1, N, D) holding B samples back to back.
    Either way one Bernoulli draw per sample, B draws in sample order from the global RNG (empty samples
    included), so the padded batch and the same samples back to back drop the same samples."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, seq_lengths: list[int] | None = None) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        if seq_lengths is None:
            r = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
        else:
            draws = x.new_empty(len(seq_lengths)).bernoulli_(keep)  # (B,)
            repeats = torch.tensor(seq_lengths, device=x.device)
            r = draws.repeat_interleave(repeats, output_size=x.shape[1])[None, :, None]  # (1, N, 1)
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

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                seq_lengths: list[int] | None = None, key_lengths: list[int] | None = None) -> torch.Tensor:
        """seq_lengths, key_lengths: see Attention.forward; drop path then draws one value per sequence."""
        context = y if self.cross_attn else None
        x = x + self.drop_path(self.attn(self.norm1(x), context, key_mask, seq_lengths, key_lengths), seq_lengths)
        return x + self.drop_path(self.mlp(self.norm2(x)), seq_lengths)


def init_linear(m: nn.Module) -> None:
    """The original's init: every nn.Linear xavier_uniform with zero bias; Conv2d keeps PyTorch defaults."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
