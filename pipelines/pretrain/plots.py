"""The loss-curve figure written beside a run's checkpoints, four panels over the step:

- the training loss: each logging interval's mean per patch size (faint points, one colour per patch size:
  the batch's patch size sets most of a step's loss, so the raw curve zigzags), a smoothed line per patch
  size and the smoothed loss of all sizes (black);
- the validation loss on the held-out set (pipelines/pretrain/validation.py: fixed batches, so it reads as
  a curve unsmoothed, on its own scale), with the in-loop probe scores (keys like
  "probe/synth/knn_accuracy", pipelines/evaluation/hook.py) on a right-hand axis;
- the two parts, patch discrimination and contrastive, smoothed for training and as validation points;
- the learning rate.

Rendered off-screen (Agg) to PNG bytes, so it can go to any URI."""

from __future__ import annotations

import io
import re

import numpy as np

LOSS_KEYS = ("loss", "patch_disc", "contrastive")
PROBE_METRICS = ("accuracy", "f1", "map", "miou")
PER_PATCH = re.compile(r"^loss_p(\d+)$")
PROBE_COLOURS = ("darkorange", "saddlebrown", "magenta", "teal")


def ema(values: list[float], span: float) -> np.ndarray:
    """Exponential moving average with the start-up bias removed (the first points are not pulled to 0)."""
    alpha = 2.0 / (span + 1.0)
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = (1 - alpha) * acc + alpha * float(v)
        weight = (1 - alpha) * weight + alpha
        out.append(acc / weight)
    return np.asarray(out)


def series(records: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and np.isfinite(r[key])]
    return (list(a) for a in zip(*pts, strict=True)) if pts else ([], [])


def _span(n: int) -> float:
    """The smoothing span, in logged rows: about a quarter of them."""
    return max(2.0, n / 4)


def _train_panel(ax, records: list[dict]) -> None:
    import matplotlib.pyplot as plt

    sizes = sorted({int(m.group(1)) for r in records for k in r if (m := PER_PATCH.match(k))})
    cmap = plt.get_cmap("viridis")
    for i, p in enumerate(sizes):
        steps, values = series(records, f"loss_p{p}")
        colour = cmap(i / max(1, len(sizes) - 1))
        ax.scatter(steps, values, s=6, color=colour, alpha=0.35, linewidths=0)
        ax.plot(steps, ema(values, _span(len(values))), color=colour, lw=1.0, alpha=0.8, label=f"p={p}")
    steps, values = series(records, "loss")
    if steps:
        if not sizes:
            ax.plot(steps, values, color="gray", lw=0.8, alpha=0.5, label="per interval")
        ax.plot(steps, ema(values, _span(len(values))), color="black", lw=2.0, label="all sizes (smoothed)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small", ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)


def _val_panel(ax, records: list[dict]) -> None:
    steps, values = series(records, "val_loss")
    if steps:
        ax.plot(steps, values, color="crimson", lw=2.0, marker="o", ms=4, label="validation loss")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    probe = _probe_axis(ax, records)
    if probe:
        handles, labels = handles + probe[0], labels + probe[1]
    if handles:
        ax.legend(handles, labels, fontsize="x-small", ncol=3, loc="best")


def _parts_panel(ax, records: list[dict]) -> None:
    for key, colour in (("patch_disc", "C0"), ("contrastive", "C1")):
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, ema(values, _span(len(values))), color=colour, lw=1.5, label=f"{key} train (smoothed)")
        steps, values = series(records, f"val_{key}")
        if steps:
            ax.plot(steps, values, color=colour, lw=1.0, ls="--", marker="o", ms=3, label=f"{key} validation")
    ax.set_ylabel("loss part")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small", ncol=2, loc="upper right")


def _probe_axis(ax, records: list[dict]) -> list:
    """The probe scores on a right-hand axis of `ax`; returns their legend handles."""
    keys = sorted({k for r in records for k in r if "/" in k and k.rsplit("_", 1)[-1] in PROBE_METRICS})
    if not keys:
        return []
    twin = ax.twinx()
    for i, key in enumerate(keys):
        steps, values = series(records, key)
        twin.plot(steps, values, linestyle="--", marker="s", ms=4, color=PROBE_COLOURS[i % len(PROBE_COLOURS)],
                  label=key if key.startswith("probe/") else f"probe/{key}")  # fmt: skip
    twin.set_ylabel("probe score")
    scores = [r[k] for r in records for k in keys if k in r]
    twin.set_ylim(max(0.0, min(scores) - 0.05), min(1.0, max(scores) + 0.05))
    return twin.get_legend_handles_labels()


def loss_curve_png(records: list[dict], title: str = "pretraining") -> bytes:
    """records: metrics rows with "step" and some of "loss", "patch_disc", "contrastive", "loss_p<p>",
    "val_loss", "val_patch_disc", "val_contrastive", probe scores and "lr"."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no metrics records to plot")
    fig, (ax_train, ax_val, ax_parts, ax_lr) = plt.subplots(4, 1, figsize=(8, 10), sharex=True,
                                                            height_ratios=(3, 2.2, 1.6, 1))  # fmt: skip
    fig.suptitle(title)
    _train_panel(ax_train, records)
    _val_panel(ax_val, records)
    _parts_panel(ax_parts, records)
    steps, values = series(records, "lr")
    if steps:
        ax_lr.plot(steps, values, color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
