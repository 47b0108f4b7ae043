"""Linear probes on frozen embeddings.

- Classification: L2-regularised logistic regression (softmax over classes; one sigmoid per class for
  multi-label), fitted to convergence with L-BFGS in float64. Objective, as scikit-learn's:
      C * sum_i loss_i + 0.5 * ||W||^2      (bias not penalised)
  Features are standardised with the training set's mean and std; C is chosen on a held-out split.
- Segmentation: one linear layer per token (patch embedding -> class logits), logits upsampled bilinearly
  to pixels, cross-entropy over labelled pixels (-1 ignored), AdamW with a cosine schedule, as the
  original's per-patch probe; the learning rate is chosen on the held-out split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.evaluation.metrics import IGNORE, miou


@dataclass
class LogisticModel:
    weight: np.ndarray  # (D, K)
    bias: np.ndarray  # (K,)
    multilabel: bool
    mean: np.ndarray  # (D,) standardisation applied before the linear map
    std: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.weight + self.bias

    def proba(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        if self.multilabel:
            return 1.0 / (1.0 + np.exp(-z))
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.multilabel:
            return (self.logits(x) > 0).astype(np.int64)
        return self.logits(x).argmax(axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, C: float = 1.0, standardise: bool = True,
                 max_iter: int = 500, tol: float = 1e-7) -> LogisticModel:
    """x: (N, D) features; y: (N,) class ids, or (N, K) 0/1 for multi-label."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    multilabel = y.ndim == 2
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"logistic regression: {len(x)} feature rows and {len(y)} labels")
    mean = x.mean(0) if standardise else np.zeros(x.shape[1])
    std = x.std(0) if standardise else np.ones(x.shape[1])
    std = np.where(std > 1e-12, std, 1.0)
    xt = torch.as_tensor((x - mean) / std)  # (N, D)
    yt = torch.as_tensor(y.astype(np.float64) if multilabel else y.astype(np.int64))
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = xt @ w + b  # (N, K)
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(z, yt, reduction="sum")
        else:
            loss = F.cross_entropy(z, yt, reduction="sum")
        # scikit-learn's C * sum(loss) + ||W||^2 / 2, divided by C * N (same minimum, well scaled for tol)
        loss = loss / len(xt) + 0.5 * (w * w).sum() / (C * len(xt))
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(w.detach().numpy(), b.detach().numpy(), multilabel, mean, std)


def select_and_fit_logistic(train_x, train_y, val_x, val_y, num_classes: int, score_fn,
                            Cs=(0.01, 0.1, 1.0, 10.0)) -> tuple[LogisticModel, float, dict[float, float]]:
    """Fit one model per C on train, keep the best by score_fn(val_y, model, val_x). Returns
    (model, best C, {C: val score})."""
    best, best_c, scores = None, None, {}
    for c in Cs:
        model = fit_logistic(train_x, train_y, num_classes, C=c)
        scores[c] = score_fn(val_y, model, val_x)
        if best is None or scores[c] > scores[best_c]:
            best, best_c = model, c
    return best, best_c, scores


# --------------------------------------------------------------------------------------------------
# Segmentation: per-patch linear probe


def fit_segmentation_probe(feats: np.ndarray, labels: np.ndarray, num_classes: int, lr: float = 1e-2,
                           epochs: int = 50, batch_size: int = 32, weight_decay: float = 1e-2,
                           seed: int = 0) -> torch.nn.Linear:
    """feats: (N, h, w, D) per-patch embeddings; labels: (N, H, W) class ids, -1 ignored."""
    g = torch.Generator().manual_seed(seed)
    f = torch.as_tensor(np.asarray(feats, np.float32))
    t = torch.as_tensor(np.asarray(labels, np.int64))
    head = torch.nn.Linear(f.shape[-1], num_classes)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1.0 / f.shape[-1] ** 0.5
        head.weight.copy_(torch.rand(head.weight.shape, generator=g) * 2 * bound - bound)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-len(f) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-5)
    for _ in range(epochs):
        for idx in torch.randperm(len(f), generator=g).split(batch_size):
            logits = segmentation_logits(head, f[idx], t.shape[-2:])  # (b, K, H, W)
            loss = F.cross_entropy(logits, t[idx], ignore_index=IGNORE)
            if not torch.isfinite(loss):  # a batch with no labelled pixel
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head


def segmentation_logits(head: torch.nn.Linear, feats: torch.Tensor, out_hw) -> torch.Tensor:
    """(B, h, w, D) -> (B, K, H, W): per-token logits upsampled bilinearly to the label grid."""
    z = head(feats).permute(0, 3, 1, 2)  # (B, K, h, w)
    return F.interpolate(z, size=tuple(out_hw), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_segmentation(head: torch.nn.Linear, feats: np.ndarray, out_hw, batch_size: int = 64) -> np.ndarray:
    f = torch.as_tensor(np.asarray(feats, np.float32))
    out = [segmentation_logits(head, f[i : i + batch_size], out_hw).argmax(1) for i in range(0, len(f), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, *out_hw), np.int64)


def select_and_fit_segmentation(train_f, train_y, val_f, val_y, num_classes: int, lrs=(1e-3, 1e-2, 1e-1),
                                epochs: int = 50, seed: int = 0) -> tuple[torch.nn.Linear, float, dict[float, float]]:
    """One probe per learning rate, the best by validation mIoU."""
    best, best_lr, scores = None, None, {}
    for lr in lrs:
        head = fit_segmentation_probe(train_f, train_y, num_classes, lr=lr, epochs=epochs, seed=seed)
        scores[lr] = miou(val_y, predict_segmentation(head, val_f, val_y.shape[-2:]), num_classes)
        if best is None or scores[lr] > scores[best_lr]:
            best, best_lr = head, lr
    return best, best_lr, scores
