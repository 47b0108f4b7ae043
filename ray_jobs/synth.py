"""`olmoearth synth`: write a realistic synthetic raw corpus (GeoTIFFs + timestep CSVs) to a URI.

olmoearth synth --out_uri s3://raw --num_samples 200 --seed 0 [--labelled true] [--s3_endpoint URL]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipelines.common.config import load_config
from pipelines.common.storage import Storage
from pipelines.corpus.synth import SynthConfig, write_corpus


@dataclass
class SynthJobConfig:
    out_uri: str = field(
        default="", metadata={"help": "where to write the raw corpus (s3://bucket/prefix or a path)"}
    )
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3 endpoint URL (else AWS_ENDPOINT_URL)"}
    )
    num_samples: int = field(default=16, metadata={"help": "number of 2560 m samples"})
    seed: int = field(default=0, metadata={"help": "seed: same seed, same bytes"})
    labelled: bool = field(
        default=False, metadata={"help": "contiguous block + labels.csv + 10_labels/ per-pixel classes"}
    )
    missing_timestep_rate: float = field(default=1.0, metadata={"help": "scale of missing monthly timesteps"})
    missing_modality_rate: float = field(
        default=1.0, metadata={"help": "scale of missing optional modalities"}
    )
    cloud_rate: float = field(default=1.0, metadata={"help": "scale of cloud cover"})
    timesteps: int = field(default=12, metadata={"help": "monthly periods per sample window (<= 12)"})
    ray_tasks: int = field(default=0, metadata={"help": "parallel Ray tasks (0: in this process)"})


def main(argv=None) -> int:
    cfg = load_config(SynthJobConfig, argv, description=__doc__)
    if not cfg.out_uri:
        raise SystemExit("olmoearth synth: --out_uri is required")
    if cfg.ray_tasks > 0:
        from pipelines.common.ray_start import init_ray

        init_ray()
    synth = SynthConfig(num_samples=cfg.num_samples, seed=cfg.seed, labelled=cfg.labelled,
                        missing_timestep_rate=cfg.missing_timestep_rate,
                        missing_modality_rate=cfg.missing_modality_rate, cloud_rate=cfg.cloud_rate,
                        ray_tasks=cfg.ray_tasks, timesteps=cfg.timesteps)  # fmt: skip
    summary = write_corpus(synth, cfg.out_uri, Storage(cfg.s3_endpoint))
    print(json.dumps({"out_uri": cfg.out_uri, "samples": summary["samples"], "bytes": summary["bytes"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
