"""Token bookkeeping: per-modality grids <-> one flat sequence, and packing the tokens of one role.

Flat order (layout.py): modalities in the order of the dict (callers pass registry order), then
(h, w, t, s) row-major inside a modality.
"""

from __future__ import annotations

import torch

from olmoearth.modalities import MODALITIES


def ordered(d: dict) -> list[str]:
    """Keys of d in registry order."""
    return [n for n in MODALITIES if n in d]


def collapse(tokens: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]):
    """{m: (B, h, w, T, S, D)}, {m: (B, h, w, T, S)} -> (B, N, D), (B, N), shapes {m: (h, w, T, S)}."""
    names = ordered(tokens)
    B = tokens[names[0]].shape[0]
    shapes = {n: tuple(tokens[n].shape[1:-1]) for n in names}
    x = torch.cat([tokens[n].reshape(B, -1, tokens[n].shape[-1]) for n in names], dim=1)  # (B, N, D)
    m = torch.cat([mask[n].reshape(B, -1) for n in names], dim=1)  # (B, N)
    return x, m, shapes


def expand(x: torch.Tensor, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """(B, N, D) -> {m: (B, h, w, T, S, D)} (inverse of collapse)."""
    out, start = {}, 0
    for n, shp in shapes.items():
        count = 1
        for s in shp:
            count *= s
        out[n] = x[:, start : start + count].reshape(x.shape[0], *shp, x.shape[-1])
        start += count
    return out


def pack_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep: (B, N) bool -> idx (B, L) source positions of the kept tokens of every sample first, cut to the
    longest sample (L), and valid (B, L) bool (True for the first keep.sum(1) slots of each row).
    Stable: kept tokens stay in sequence order (as the original's stable sort)."""
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices  # (B, N)
    L = int(keep.sum(1).max().item()) if keep.numel() else 0
    idx = order[:, :L]  # (B, L)
    return idx, torch.gather(keep, 1, idx)


def pack(x: torch.Tensor, keep: torch.Tensor):
    """Move the kept tokens of every sample to the front and cut to the longest sample.

    x: (B, N, D), keep: (B, N) bool -> packed (B, L, D), idx (B, L) source positions, valid (B, L) bool
    (see pack_index)."""
    idx, valid = pack_index(keep)  # (B, L)
    packed = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, L, D)
    packed = packed * valid[..., None].to(packed.dtype)
    return packed, idx, valid


def unpack(packed: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack: (B, L, D) -> (B, N, D) with zeros where nothing was packed."""
    B, L, D = packed.shape
    out = packed.new_zeros(B, n, D)
    src = packed * valid[..., None].to(packed.dtype)
    # invalid slots point at positions that are not kept; they write zeros there, so only kept ones land
    return out.scatter_add(1, idx[..., None].expand(-1, -1, D), src)


def select(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The kept tokens of all samples back to back, without padding (the alternative to `pack`).

    x: (B, N, D), keep: (B, N) bool -> (K, D) sample after sample, in sequence order inside each (the order
    `pack` gives), and the number of kept tokens of each sample (B ints summing to K)."""
    return x[keep], keep.sum(1).tolist()


def place(flat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Inverse of select: (K, D) -> (B, N, D) with zeros where nothing was kept. With the `valid` of
    pack_index as keep, it pads the samples back to back into pack's (B, L, D) layout."""
    out = flat.new_zeros(*keep.shape, flat.shape[-1])
    out[keep] = flat
    return out


def segment_mean(flat: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(K, D) holding len(lengths) samples back to back -> (B, D) mean of each (zeros for an empty one), as
    masked_mean over the padded batch."""
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=flat.device),
                                  torch.tensor(lengths, device=flat.device))  # (K,)
    sums = flat.new_zeros(len(lengths), flat.shape[-1]).index_add_(0, ids, flat)  # (B, D)
    counts = torch.tensor(lengths, device=flat.device, dtype=flat.dtype).clamp(min=1.0)
    return sums / counts[:, None]


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D), keep: (B, N) bool -> (B, D) mean over the kept tokens (zeros if none)."""
    w = keep.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """(B, L) bool -> the attention key mask: None when nothing is padded; a sample with no valid key at
    all gets its first (zero) slot unmasked so softmax stays finite (its outputs are never read)."""
    if bool(valid.all()):
        return None
    empty = ~valid.any(dim=1)  # (B,)
    if bool(empty.any()):
        valid = valid.clone()
        valid[:, 0] |= empty
    return valid
