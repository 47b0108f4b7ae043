"""The curve of a fine-tuning run, one point per epoch: the training and validation losses, the validation
metrics (and test, where scored), and each optimiser group's learning rate (the frozen epochs show the
backbone at 0). Rendered off-screen (Agg) to PNG bytes, so it can go to any URI."""

from __future__ import annotations

import io

SCORES = ("accuracy", "macro_f1", "map", "micro_f1", "miou", "pixel_accuracy", "rmse")


def _points(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return ([a for a, _ in pts], [b for _, b in pts]) if pts else ([], [])


def curve_png(rows: list[dict], title: str = "fine-tuning") -> bytes:
    """rows: metrics rows with "epoch" and some of "loss", "val/<metric>", "test/<metric>", "lr/<group>"."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no metrics rows to plot")
    fig, (ax_loss, ax_score, ax_lr) = plt.subplots(3, 1, figsize=(8, 8), sharex=True, height_ratios=(2, 2, 1))
    fig.suptitle(title)
    for key, style in (("loss", "k-o"), ("val/loss", "r-s"), ("test/loss", "b:^")):
        x, y = _points(rows, key)
        if x:
            ax_loss.plot(x, y, style, ms=4, label=key if key != "loss" else "train/loss")
    ax_loss.set_ylabel("loss")
    for split, style in (("val", "-o"), ("test", ":^")):
        for i, metric in enumerate(SCORES):
            x, y = _points(rows, f"{split}/{metric}")
            if x:
                ax_score.plot(x, y, style, color=f"C{i}", ms=4, label=f"{split}/{metric}")
    ax_score.set_ylabel("score")
    groups = sorted({k for r in rows for k in r if k.startswith("lr/")})
    for i, key in enumerate(groups):
        x, y = _points(rows, key)
        ax_lr.plot(x, y, color=f"C{i % 10}", label=key[3:])
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    for ax in (ax_loss, ax_score, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", ncol=3, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
