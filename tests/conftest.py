"""Shared test fixtures: one local Ray cluster and one SeaweedFS S3 server per test session (each start
costs seconds on 2 cores), started here and stopped by PID at the end."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on 127.0.0.1; its env is exported for s3fs / pyarrow."""
    from pipelines.common.local_s3 import SeaweedServer

    server = SeaweedServer(str(tmp_path_factory.mktemp("seaweed"))).start()
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket URI (s3://test-<random>) on the session's SeaweedFS server."""
    from pipelines.common.storage import Storage

    uri = f"s3://test-{uuid.uuid4().hex[:10]}"
    Storage(s3_server.endpoint).makedirs(uri)
    return uri


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session, with more logical CPUs than cores so that Ray Data never
    starves behind train workers. Depends on s3_server so that workers inherit its AWS_* environment."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
