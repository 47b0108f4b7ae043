"""`olmoearth build-corpus`: validate a raw corpus and write shuffled Parquet training shards, a manifest,
a rejects report and per-band normalisation statistics (see pipelines/corpus/build.py, docs/corpus.md).

    olmoearth build-corpus --raw_uri s3://raw --out_uri s3://shards [--samples_per_shard 16] [--retry_rejects true]

Runs on the Ray cluster of RAY_ADDRESS (or a local one). Rerunning skips finished shards and retries the
samples an outage kept from being read (`unreadable`); `--retry_rejects true` re-examines every reject.
Exits 2 when the raw URI holds no sample (nothing is built, no plan saved).
"""

from __future__ import annotations

import sys

from pipelines.common.config import load_config
from pipelines.common.ray_start import init_ray
from pipelines.common.storage import Storage
from pipelines.corpus.build import BuildConfig, EmptyCorpusError, build_corpus, format_summary


def main(argv=None) -> int:
    cfg = load_config(BuildConfig, argv, description=__doc__)
    if not cfg.raw_uri or not cfg.out_uri:
        raise SystemExit("olmoearth build-corpus: --raw_uri and --out_uri are required")
    init_ray()
    try:
        summary = build_corpus(cfg, Storage())
    except EmptyCorpusError as e:
        print(f"olmoearth build-corpus: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
