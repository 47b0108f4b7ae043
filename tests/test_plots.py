"""The loss-curve PNG: the in-loop probe scores beside the losses, the training loss per patch size and
smoothed, the validation losses."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np
import pytest

from pipelines.pretrain.plots import ema, loss_curve_png


def rows_of_a_run() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(5, 105, 5):
        base = 3 - s / 100
        per_p = {f"loss_p{p}": base + 0.3 * p + 0.05 * rng.standard_normal() for p in (2, 4, 8) if rng.random() < 0.7}
        rows.append({"step": s, "loss": float(np.mean(list(per_p.values()) or [base])), "patch_disc": base - 0.2,
                     "contrastive": 1.3, "lr": 1e-4, **per_p})  # fmt: skip
    return rows


def image(rows: list[dict]) -> np.ndarray:
    return mpimg.imread(io.BytesIO(loss_curve_png(rows)), format="png")


def test_probe_scores_are_drawn_beside_the_losses():
    rows = [{"step": s, "loss": 3 - s / 10, "patch_disc": 2.5 - s / 10, "contrastive": 2.0, "lr": 1e-4}
            for s in range(5, 55, 5)]  # fmt: skip
    probed = [dict(r, **{"synth/knn_accuracy": 0.5 + r["step"] / 200}) if r["step"] % 10 == 0 else r for r in rows]
    plain = image(rows)
    with_probe = image(probed)
    assert plain.shape == with_probe.shape
    # the probe curve, its right-hand axis and legend entry change a visible share of the loss panel
    changed = np.abs(plain - with_probe).max(axis=-1) > 0.1
    assert changed[: plain.shape[0] // 2].mean() > 0.01


def test_validation_and_per_patch_size_losses_are_drawn():
    rows = rows_of_a_run()
    plain = image([{k: v for k, v in r.items() if not k.startswith("loss_p")} for r in rows])
    per_p = image(rows)
    validated = [dict(r, val_loss=2.8 - r["step"] / 200, val_patch_disc=2.6 - r["step"] / 200, val_contrastive=1.2)
                 if r["step"] % 25 == 0 else r for r in rows]  # fmt: skip
    with_val = image([{"step": 0, "val_loss": 2.9, "val_patch_disc": 2.7, "val_contrastive": 1.3}] + validated)
    assert plain.shape == per_p.shape == with_val.shape
    h = plain.shape[0]
    # the per-patch-size points and lines change the training panel (the top ~38%)
    assert (np.abs(plain - per_p).max(axis=-1) > 0.1)[: int(0.38 * h)].mean() > 0.01
    # the validation loss fills its own panel (~38-66%), its parts join the next one (~66-86%)
    diff = np.abs(per_p - with_val).max(axis=-1) > 0.1
    assert diff[int(0.4 * h) : int(0.64 * h)].mean() > 0.01
    assert diff[int(0.68 * h) : int(0.84 * h)].mean() > 0.005


def test_smoothing_follows_the_trend_without_start_up_bias():
    values = [3.0, 5.0] * 20 + [1.0, 3.0] * 20
    smooth = ema(values, span=8)
    assert smooth[0] == 3.0  # no pull towards 0 at the start
    assert 3.5 < smooth[39] < 4.5 and 1.5 < smooth[-1] < 2.5  # the zigzag's mean, before and after the drop
    assert np.ptp(smooth[20:40]) < 0.6 * np.ptp(values)
    with pytest.raises(ValueError):
        loss_curve_png([])
