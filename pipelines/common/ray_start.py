"""Connecting a job to Ray: the cluster of RAY_ADDRESS (under `ray job submit` or on a cluster node), or an
embedded local cluster when there is none.

A local cluster gets more logical CPUs than the machine has cores: Ray Train workers hold their CPUs for the
whole run, and on a 2-core laptop Ray Data would otherwise never be scheduled beside them (the run hangs)."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Idempotent: does nothing when this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    logical = num_cpus or max(8, 2 * (os.cpu_count() or 2))
    # address="local": always a fresh embedded cluster, never one that `ray start` left on this machine
    ray.init(address="local", num_cpus=logical, include_dashboard=False)
