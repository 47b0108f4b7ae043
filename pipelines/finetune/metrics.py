"""Per-epoch scores of a fine-tuning run, accumulated batch by batch on each rank and combined across ranks.

    acc = ScoreAccumulator(task)
    acc.add(out, labels, loss_sum, n)        # out: the model's (b, K[, H, W]) outputs, labels as load_batch's
    scores = acc.scores(reduce)              # reduce(list[float]) -> element-wise sum over ranks

What each task kind reports (the first is the default for the best checkpoint):
    classification     accuracy, macro_f1, loss        (from the summed confusion matrix)
    multilabel         map, micro_f1, loss             (probabilities gathered from every rank)
    segmentation       miou, pixel_accuracy, loss      (confusion matrix over labelled pixels, -1 ignored)
    regression kinds   rmse, loss                      (squared errors over finite targets)
mIoU, mAP and micro-F1 are pipelines/evaluation/metrics.py's, so a fine-tuned model and a frozen probe are
scored alike."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.evaluation.metrics import (
    confusion,
    macro_f1_from_confusion,
    mean_average_precision,
    micro_f1,
    miou_from_confusion,
)


class ScoreAccumulator:
    """One evaluation pass's sums on one rank; `scores` combines the ranks' sums."""

    def __init__(self, kind: str, num_outputs: int):
        self.kind, self.k = kind, num_outputs
        self.cm = np.zeros((num_outputs, num_outputs), np.int64)
        self.sq_err, self.n_err = 0.0, 0
        self.loss_sum, self.n = 0.0, 0
        self.probs: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []

    def add(self, out: torch.Tensor, labels: np.ndarray, loss: float) -> None:
        """out: (b, K[, H, W]) logits or values of b real samples; labels: their labels; loss: their mean loss."""
        b = len(labels)
        self.loss_sum += float(loss) * b
        self.n += b
        out = out.detach().float().cpu()
        if self.kind in ("classification", "segmentation"):
            self.cm += confusion(np.asarray(labels), out.argmax(1).numpy(), self.k)
        elif self.kind == "multilabel":
            self.probs.append(out.sigmoid().numpy())
            self.truth.append(np.asarray(labels))
        else:
            values = out.numpy()
            target = np.asarray(labels, np.float64).reshape(values.shape)
            ok = np.isfinite(target)
            self.sq_err += float(((values - np.where(ok, target, 0.0)) ** 2)[ok].sum())
            self.n_err += int(ok.sum())

    def scores(self, reduce, gather) -> dict[str, float]:
        """reduce(list[float]) -> the element-wise sum over ranks; gather(obj) -> every rank's obj as a list."""
        sums = reduce([self.loss_sum, float(self.n), self.sq_err, float(self.n_err), *self.cm.ravel().tolist()])
        loss_sum, n, sq_err, n_err = sums[:4]
        out = {"loss": loss_sum / n if n else float("nan")}
        cm = np.asarray(sums[4:], np.float64).reshape(self.k, self.k)
        if self.kind == "classification":
            out.update(accuracy=float(np.trace(cm) / max(cm.sum(), 1)), macro_f1=macro_f1_from_confusion(cm))
        elif self.kind == "segmentation":
            out.update(miou=miou_from_confusion(cm), pixel_accuracy=float(np.trace(cm) / max(cm.sum(), 1)))
        elif self.kind == "multilabel":
            parts = gather((self.probs, self.truth))
            probs = np.concatenate([p for ps, _ in parts for p in ps])
            truth = np.concatenate([t for _, ts in parts for t in ts])
            out.update(map=mean_average_precision(truth, probs), micro_f1=micro_f1(truth, probs > 0.5))
        else:
            out["rmse"] = float(np.sqrt(sq_err / n_err)) if n_err else float("nan")
        return out


def local_reduce(values: list[float]) -> list[float]:
    """`reduce` for one process (the bench's plain loop, tests)."""
    return list(values)


def local_gather(obj) -> list:
    return [obj]
