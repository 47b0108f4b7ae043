"""`olmoearth predict`: map a fine-tuned model's predictions over a large area (logic in serve/mapping/predict.py).

    olmoearth predict --config configs/predict_area.yaml --model_uri s3://bucket/models/ft.safetensors \
        --out s3://bucket/maps/classes --bbox '[-76.1, 36.8, -75.9, 37.0]'

Per-pixel tasks give a 10 m map, scene tasks one value per window of the model's chip size. Outputs:
classes.tif (uint8, colour table) / labels.tif / values.tif, optional probabilities.tif, classes.json,
preview.png, report.json. Exits 1 when a tile failed (the report names each one; rerun to retry only those)."""

from __future__ import annotations

import sys

from pipelines.common.config import load_config
from pipelines.common.ray_start import init_ray


def main(argv: list[str] | None = None) -> int:
    from serve.mapping.embed_area import print_summary
    from serve.mapping.predict import predict_area
    from serve.mapping.predict_config import PredictConfig

    cfg = load_config(PredictConfig, argv, description=__doc__)
    init_ray()
    report = predict_area(cfg)
    return print_summary(report, ("area_km2", "tiles", "encoded", "skipped_finished", "failed", "empty", "map",
                                  "outputs"))


if __name__ == "__main__":
    sys.exit(main())
