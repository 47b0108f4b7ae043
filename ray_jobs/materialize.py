"""`olmoearth materialize`: write the raw corpus layout (per-modality GeoTIFFs + timestep CSVs) for cells from STAC
imagery, map mosaics and an OSM extract (logic in pipelines/corpus/materialize.py; docs/corpus.md).

    olmoearth materialize --config configs/materialize.yaml --cells s3://sel/cells.parquet --out s3://raw
    olmoearth materialize --config configs/materialize.yaml --bbox '[-76.2, 37.6, -76.1, 37.7]' \
        --time_start 2022-01-01 --time_end 2022-12-31 --out s3://raw

Then `olmoearth build-corpus --raw_uri s3://raw --out_uri s3://shards`. A rerun skips finished cells and redoes
unfinished and failed ones. Exits 1 when a cell failed (the report names each one).
"""

from __future__ import annotations

import sys

from pipelines.common.config import load_config
from pipelines.common.ray_start import init_ray


def main(argv: list[str] | None = None) -> int:
    from pipelines.corpus.materialize import format_report, materialize
    from pipelines.corpus.materialize_config import MaterializeConfig, check_config

    cfg = load_config(MaterializeConfig, argv, description=__doc__)
    try:
        check_config(cfg)
    except ValueError as e:
        raise SystemExit(f"olmoearth materialize: {e}") from None
    init_ray()
    report = materialize(cfg)
    print(format_report(report))
    if report["failed"]:
        print(f"{len(report['failed'])} cell(s) failed; rerun the same command to redo them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
