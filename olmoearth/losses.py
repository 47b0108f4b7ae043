"""The two losses of Latent MIM Lite.

patch_discrimination: per sample and per modality, each decoded token's prediction must pick its own target
    among that sample's decoded targets of the same modality (cosine similarity / tau, cross-entropy,
    times 2 tau as the original). Mean over tokens within a sample, mean over samples having decoded
    tokens of that modality, SUM over modalities.
info_nce: instance contrastive loss between the pooled projections of two views, other samples of the
    batch as negatives, one direction (a -> b), as the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_discrimination(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, group: torch.Tensor,
                         tau: float = 0.1) -> torch.Tensor:
    """pred, target: (B, Q, D) packed decoded tokens; valid: (B, Q) bool; group: (B, Q) long modality id.

    Returns the scalar loss (0 when nothing is decoded)."""
    B, Q, _ = pred.shape
    if Q == 0 or not bool(valid.any()):
        return pred.sum() * 0.0
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    logits = p @ t.transpose(1, 2) / tau  # (B, Q, Q)
    same = (group[:, :, None] == group[:, None, :]) & valid[:, None, :]  # candidates: same modality, decoded
    logits = logits.masked_fill(~same, float("-inf"))
    labels = torch.arange(Q, device=pred.device).expand(B, Q)
    # rows of invalid queries have -inf everywhere except possibly themselves: give them a finite dummy row
    logits = torch.where(valid[:, :, None], logits, torch.zeros_like(logits))
    ce = F.cross_entropy(logits.reshape(B * Q, Q), labels.reshape(-1), reduction="none").view(B, Q)
    ce = ce * (2 * tau) * valid.float()  # (B, Q)
    total = pred.new_zeros((), dtype=torch.float32)
    for g in torch.unique(group[valid]).tolist():
        sel = (valid & (group == g)).float()  # (B, Q)
        n = sel.sum(1)  # (B,) decoded tokens of modality g per sample
        has = n > 0
        per_sample = (ce * sel).sum(1)[has] / n[has]  # (B',)
        total = total + per_sample.mean()
    return total


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """a, b: (B, D) pooled projections of two views of the same B samples -> scalar."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    logits = a @ b.T / tau  # (B, B)
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))
