"""`olmoearth embed`: embed a large area into a georeferenced embedding map (logic in serve/mapping/embed_area.py).

    olmoearth embed --config configs/embed_area.yaml --out s3://bucket/maps/x --bbox '[-76.1, 36.8, -75.9, 37.0]'

Exits 1 when a tile failed (the report names each one; rerun to retry only the unfinished tiles)."""

from __future__ import annotations

import sys

from pipelines.common.config import load_config
from pipelines.common.ray_start import init_ray


def main(argv: list[str] | None = None) -> int:
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.embed_area import embed_area, print_summary

    cfg = load_config(EmbedAreaConfig, argv, description=__doc__)
    init_ray()
    report = embed_area(cfg)
    return print_summary(report, ("area_km2", "tiles", "encoded", "skipped_finished", "failed", "empty", "outputs"))


if __name__ == "__main__":
    sys.exit(main())
