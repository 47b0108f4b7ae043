"""The loss-curve PNG shows the in-loop probe scores beside the losses."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np

from pipelines.pretrain.plots import loss_curve_png


def test_probe_scores_are_drawn_beside_the_losses():
    rows = [{"step": s, "loss": 3 - s / 10, "patch_disc": 2.5 - s / 10, "contrastive": 2.0, "lr": 1e-4}
            for s in range(5, 55, 5)]  # fmt: skip
    probed = [dict(r, **{"synth/knn_accuracy": 0.5 + r["step"] / 200}) if r["step"] % 10 == 0 else r for r in rows]
    plain = mpimg.imread(io.BytesIO(loss_curve_png(rows)), format="png")
    with_probe = mpimg.imread(io.BytesIO(loss_curve_png(probed)), format="png")
    assert plain.shape == with_probe.shape
    # the probe curve, its right-hand axis and legend entry change a visible share of the loss panel
    changed = np.abs(plain - with_probe).max(axis=-1) > 0.1
    assert changed[: plain.shape[0] // 2].mean() > 0.01
