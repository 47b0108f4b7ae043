"""Connecting a job to Ray, the one way every job does it: the cluster of `address` or RAY_ADDRESS (under
`ray job submit` or on a cluster node), or an embedded local cluster when there is none.

A local cluster gets more logical CPUs than the machine has cores: Ray Train workers hold their CPUs for the
whole run, and on a 2-core laptop Ray Data would otherwise never be scheduled beside them (the run hangs).

The storage setting travels with the job: the driver's AWS_* variables (the endpoint that `--s3_endpoint`
set, credentials, region, checksum modes) go to every worker through the job's runtime environment, so a
worker of an already running cluster reaches the same S3 server as the driver."""

from __future__ import annotations

import json
import os

# Ray's variable holding a submitted job's own config (`ray job submit --runtime-env ...`)
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def storage_env() -> dict[str, str]:
    """The driver's AWS_* variables, minus those a submitted job's runtime env already sets (Ray refuses
    the same variable from both)."""
    job_env = json.loads(os.environ.get(_JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    taken = set(job_env.get("env_vars") or {})
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") and k not in taken}


def init_ray(num_cpus: int | None = None, address: str | None = None, **options) -> None:
    """Idempotent: does nothing when this process is already connected. `address` "local" asks for the
    embedded cluster even where RAY_ADDRESS is set; `options` go to ray.init as they are (a test's log
    settings, say), over the quiet-or-verbose log settings of pipelines/common/logs.py."""
    import ray

    from pipelines.common.logs import quiet_driver, ray_init_options

    quiet_driver()  # the driver's own log settings, also when already connected
    if ray.is_initialized():
        return
    options = {**ray_init_options(), **options}
    env = storage_env()
    runtime_env = {"env_vars": env} if env else None
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, runtime_env=runtime_env, **options)
        return
    logical = num_cpus or max(8, 2 * (os.cpu_count() or 2))
    # address="local": always a fresh embedded cluster, never one that `ray start` left on this machine
    ray.init(address="local", num_cpus=logical, include_dashboard=False, runtime_env=runtime_env, **options)
