"""Small synthetic corpora for the tests that train: raw layout written by the generator, built into shards in a
bucket of their own on the session's S3 server."""

from __future__ import annotations

import uuid

from pipelines.common.storage import Storage, join


def synthetic_shards(prefix: str, num_samples: int, seed: int, timesteps: int, samples_per_shard: int
                     ) -> tuple[Storage, str, str]:  # fmt: skip
    """(storage, bucket, shards URI) of `num_samples` synthetic cells (4 training samples each) in
    s3://<prefix>-<random>."""
    from pipelines.corpus.build import BuildConfig, build_corpus
    from pipelines.corpus.synth import SynthConfig, write_corpus

    storage = Storage()
    bucket = f"s3://{prefix}-{uuid.uuid4().hex[:8]}"
    storage.makedirs(bucket)
    write_corpus(SynthConfig(num_samples=num_samples, seed=seed, timesteps=timesteps), join(bucket, "raw"), storage)
    build_corpus(BuildConfig(raw_uri=join(bucket, "raw"), out_uri=join(bucket, "shards"),
                             samples_per_shard=samples_per_shard), storage)  # fmt: skip
    return storage, bucket, join(bucket, "shards")
