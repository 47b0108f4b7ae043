"""The loss-curve figure written beside a run's checkpoints: each loss part against the step, the in-loop
probe scores (keys like "synth/knn_accuracy", pipelines/evaluation/hook.py) on a right-hand axis beside
them, and the learning rate on a second panel. Rendered off-screen (Agg) to PNG bytes, so it can go to any URI."""

from __future__ import annotations

import io

LOSS_KEYS = ("loss", "patch_disc", "contrastive")
PROBE_METRICS = ("accuracy", "f1", "map", "miou")


def loss_curve_png(records: list[dict], title: str = "pretraining") -> bytes:
    """records: metrics rows with "step" and some of "loss", "patch_disc", "contrastive", "lr"."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no metrics records to plot")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    for key in LOSS_KEYS:
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax_loss.plot(steps, values, marker="." if len(pts) < 50 else None, label=key)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    handles, labels = ax_loss.get_legend_handles_labels()
    probe_keys = sorted({k for r in records for k in r if "/" in k and k.rsplit("_", 1)[-1] in PROBE_METRICS})
    if probe_keys:
        ax_probe = ax_loss.twinx()
        for i, key in enumerate(probe_keys):
            steps, values = zip(*[(r["step"], r[key]) for r in records if key in r], strict=True)
            ax_probe.plot(steps, values, linestyle="--", marker="o", color=f"C{len(LOSS_KEYS) + i}",
                          label=key if key.startswith("probe/") else f"probe/{key}")
        ax_probe.set_ylabel("probe score")
        ax_probe.set_ylim(0.0, 1.0)
        h, lab = ax_probe.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax_loss.legend(handles, labels, fontsize="small")
    pts = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if pts:
        steps, values = zip(*pts, strict=True)
        ax_lr.plot(steps, values, color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
