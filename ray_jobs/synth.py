"""`olmoearth synth`: write a realistic synthetic raw corpus (GeoTIFFs + timestep CSVs) to a URI.

olmoearth synth --out_uri s3://raw --num_samples 200 --seed 0 [--labelled true] [--s3_endpoint URL]
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipelines.common.config import load_config
from pipelines.common.ray_start import init_ray
from pipelines.common.storage import Storage
from pipelines.corpus.synth import SynthConfig, write_corpus


@dataclass
class SynthJobConfig(SynthConfig):
    """The corpus settings and where the corpus goes."""

    out_uri: str = ""  # where to write the raw corpus (s3://bucket/prefix or a path)


def main(argv=None) -> int:
    cfg = load_config(SynthJobConfig, argv, description=__doc__)
    if not cfg.out_uri:
        raise SystemExit("olmoearth synth: --out_uri is required")
    if cfg.ray_tasks > 0:
        init_ray()
    summary = write_corpus(cfg, cfg.out_uri, Storage())
    print(json.dumps({"out_uri": cfg.out_uri, "samples": summary["samples"], "bytes": summary["bytes"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
