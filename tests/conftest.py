"""Shared test fixtures: one local Ray cluster and one SeaweedFS S3 server per test session (each start
costs seconds on 2 cores), started here and stopped by PID at the end.

Two tiers: a test that needs the cluster or the S3 server (through these fixtures, directly or through other
fixtures) is marked `integration` here, mechanically; a test that starts Ray, Serve, SeaweedFS or a
DeepSpeed engine by itself carries the marker in its file. `make test-fast` runs the rest."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

# fixtures that start a service: a test using any of them is an integration test
SERVICE_FIXTURES = {"ray_cluster", "s3_server", "s3_bucket"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


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
    Storage().makedirs(uri)
    return uri


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session, with more logical CPUs than cores so that Ray Data never
    starves behind train workers. Depends on s3_server so that workers get its AWS_* environment."""
    import ray

    from pipelines.common.ray_start import init_ray

    init_ray(num_cpus=8, address="local", log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """Small matrices on a shared 2-core machine: one intra-op thread avoids oversubscription stalls."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def stac_catalog(s3_server):
    """The static STAC catalog of the shipped real imagery in SeaweedFS (tests/stac_catalog.py), built once."""
    from stac_catalog import build_catalog

    return build_catalog()
