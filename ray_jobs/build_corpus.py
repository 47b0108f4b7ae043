"""`olmoearth build-corpus`: validate a raw corpus and write shuffled Parquet training shards, a manifest,
a rejects report and per-band normalisation statistics (see pipelines/corpus/build.py, docs/corpus.md).

    olmoearth build-corpus --raw_uri s3://raw --out_uri s3://shards [--samples_per_shard 16]

Runs on the Ray cluster of RAY_ADDRESS (or a local one). Rerunning skips finished shards.
"""

from __future__ import annotations

from pipelines.common.config import load_config
from pipelines.common.ray_start import init_ray
from pipelines.common.storage import Storage
from pipelines.corpus.build import BuildConfig, build_corpus, format_summary


def main(argv=None) -> int:
    cfg = load_config(BuildConfig, argv, description=__doc__)
    if not cfg.raw_uri or not cfg.out_uri:
        raise SystemExit("olmoearth build-corpus: --raw_uri and --out_uri are required")
    init_ray()
    summary = build_corpus(cfg, Storage())
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
