"""kNN classification on frozen embeddings, as the original evaluates:
cosine similarity, the k = 20 most similar training samples vote, each vote weighted exp(sim / 0.07).

Multi-label tasks (BigEarthNet): every class is an independent yes/no vote among the same neighbours
(the original runs one binary kNN per class); a class is predicted when the weighted "yes" votes
outweigh the "no" votes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TEMPERATURE = 0.07


def _neighbours(train: np.ndarray, query: np.ndarray, k: int, chunk: int = 2048):
    """Top-k cosine neighbours of every query row. Returns (sims (Q, k), idx (Q, k))."""
    if len(train) == 0:
        raise ValueError("kNN needs at least one training embedding")
    k = min(k, len(train))
    tr = F.normalize(torch.as_tensor(train, dtype=torch.float32), dim=1, eps=1e-8)  # (N, D)
    sims, idx = [], []
    for start in range(0, len(query), chunk):
        q = F.normalize(torch.as_tensor(query[start : start + chunk], dtype=torch.float32), dim=1, eps=1e-8)
        s, i = torch.topk(q @ tr.T, k=k, dim=1)  # (q, k)
        sims.append(s)
        idx.append(i)
    if not sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def knn_scores(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, num_classes: int,
               k: int = 20, temperature: float = TEMPERATURE) -> np.ndarray:
    """Weighted class votes (Q, num_classes), normalised to sum to 1 per query.

    train_labels: (N,) int class ids, or (N, num_classes) 0/1 for multi-label."""
    sims, idx = _neighbours(train, query, k)
    w = np.exp((sims.astype(np.float64) - 1.0) / temperature)  # (Q, k); the -1 cancels, avoids overflow
    labels = np.asarray(train_labels)
    if labels.ndim == 1:
        onehot = np.eye(num_classes, dtype=np.float64)[labels[idx]]  # (Q, k, K)
    else:
        onehot = labels[idx].astype(np.float64)  # (Q, k, K)
    votes = (w[..., None] * onehot).sum(axis=1)  # (Q, K)
    return votes / w.sum(axis=1, keepdims=True)


def knn_predict(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, num_classes: int,
                k: int = 20, temperature: float = TEMPERATURE) -> np.ndarray:
    """Single-label: (Q,) class ids (ties go to the lowest id). Multi-label: (Q, K) 0/1, a class is on
    when its weighted yes-votes are strictly more than half of all votes."""
    scores = knn_scores(train, train_labels, query, num_classes, k, temperature)
    if np.asarray(train_labels).ndim == 1:
        return scores.argmax(axis=1)
    return (scores > 0.5).astype(np.int64)
