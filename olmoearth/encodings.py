"""Composite additive encodings: the embedding dim D is split in four quarters, one encoding each.

    quarter 0: learnable per-(modality, bandset) channel embedding (init zeros)
    quarter 1: 1-D sincos of the timestep index t in [0, T)        (temporal modalities only)
    quarter 2: month encoding, sin / cos of month * 2 pi / 12      (temporal modalities only)
    quarter 3: 2-D sincos of the token grid position scaled by the ground-sample-distance ratio
               p * input_res / 10 m                                 (spatial modalities: all of ours)

The sum is ADDED to every token, as the original (`CompositeEncodings`). Math mirrors the original's
`get_1d_sincos_pos_encoding` including its frequency quirk omega_i = 10000^(-i / (2 d)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from olmoearth.modalities import BASE_GSD, MODALITIES


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos: (L,) float -> (L, dim): [sin(pos * omega), cos(pos * omega)].

    omega_i = 1 / 10000^(i / dim / 2) for i < dim / 2: the original's schedule (standard MAE divides by
    dim / 2, not 2 dim); kept for checkpoint parity."""
    assert dim % 2 == 0, dim
    omega = torch.arange(dim // 2, device=pos.device, dtype=torch.float32) / dim / 2.0
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1).float()[:, None] * omega[None, :]  # (L, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (L, dim)


def sincos_2d(h: int, w: int, gsd_ratio: float, dim: int, device=None) -> torch.Tensor:
    """(h, w, dim) position encoding of a token grid; positions are token indices * gsd_ratio.

    As the original (meshgrid 'xy'): the first half encodes the COLUMN index, the second the ROW index.
    (The original only handles square grids; this generalises to h != w with the same values.)"""
    rows = torch.arange(h, device=device, dtype=torch.float32) * gsd_ratio
    cols = torch.arange(w, device=device, dtype=torch.float32) * gsd_ratio
    enc_col = sincos_1d(cols, dim // 2)  # (w, dim/2)
    enc_row = sincos_1d(rows, dim // 2)  # (h, dim/2)
    return torch.cat(
        [enc_col[None, :, :].expand(h, w, -1), enc_row[:, None, :].expand(h, w, -1)], dim=-1
    )  # (h, w, dim)


def month_table(dim: int) -> torch.Tensor:
    """(12, dim): first half sin(month * 2 pi / 12) repeated, second half cos(...) repeated."""
    angles = torch.arange(12, dtype=torch.float32) / (12 / (2 * math.pi))  # (12,)
    half = dim // 2
    return torch.cat([torch.sin(angles)[:, None].expand(12, half), torch.cos(angles)[:, None].expand(12, half)], 1)


class CompositeEncodings(nn.Module):
    """Adds the four-quarter encoding to per-modality token grids (B, h, w, T, S, D)."""

    def __init__(self, dim: int, modalities: tuple[str, ...]):
        super().__init__()
        self.dim = dim
        self.quarter = int(dim * 0.25)
        # name as the original: per_modality_channel_embeddings.<modality> of shape (S, D/4), init zeros
        self.per_modality_channel_embeddings = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(MODALITIES[m].num_bandsets, self.quarter)) for m in modalities}
        )
        self.register_buffer("month_embed", month_table(self.quarter), persistent=False)  # (12, D/4)

    def encoding(self, name: str, shape, months: torch.Tensor, patch_size: int, input_res: float):
        """The additive encoding for tokens of modality `name` with shape (B, h, w, T, S, D)."""
        B, h, w, T, S, D = shape
        q = self.quarter
        dev = months.device
        chan = self.per_modality_channel_embeddings[name]  # (S, q)
        parts = [chan[None, None, None, None, :, :].expand(B, h, w, T, S, q)]
        if MODALITIES[name].temporal:
            time = sincos_1d(torch.arange(T, device=dev), q)  # (T, q)
            month = self.month_embed[months[:, :T].long()]  # (B, T, q)
            parts.append(time[None, None, None, :, None, :].expand(B, h, w, T, S, q))
            parts.append(month[:, None, None, :, None, :].expand(B, h, w, T, S, q))
        else:
            zeros = chan.new_zeros(()).expand(B, h, w, T, S, q)
            parts += [zeros, zeros]
        gsd_ratio = input_res * patch_size / BASE_GSD
        space = sincos_2d(h, w, gsd_ratio, q, device=dev)  # (h, w, q)
        parts.append(space[None, :, :, None, None, :].expand(B, h, w, T, S, q))
        if 4 * q < D:  # D not divisible by 4: the remainder gets no encoding (as the original)
            parts.append(chan.new_zeros(()).expand(B, h, w, T, S, D - 4 * q))
        return torch.cat(parts, dim=-1).to(chan.dtype)  # (B, h, w, T, S, D)

    def forward(self, tokens: dict[str, torch.Tensor], months: torch.Tensor, patch_size: int,
                input_res: float = BASE_GSD) -> dict[str, torch.Tensor]:
        return {
            name: t + self.encoding(name, t.shape, months, patch_size, input_res).to(t.dtype)
            for name, t in tokens.items()
        }
