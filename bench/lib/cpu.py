"""CPU seconds of the processes a bench starts (this process, the Ray cluster's raylet, GCS and workers, the
S3 server), to say where a side-by-side figure's CPU went, not only its wall time."""

from __future__ import annotations

import time

# substrings of a process's command line -> the role it is reported under (first match wins)
ROLES = (("ProxyActor", "serve_proxy"), ("ServeReplica", "serve_replica"), ("ServeController", "serve_controller"),
         ("raylet", "raylet"), ("gcs_server", "gcs"), ("weed", "s3_server"))  # fmt: skip


def tree_cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (role, CPU seconds so far: user + system, reaped children included)} of this process ("bench")
    and every process it started. Other programs on the machine are not counted."""
    import psutil

    me, out = psutil.Process(), {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            cmd = " ".join(p.cmdline()) + " " + p.name()
        except psutil.Error:
            continue
        role = "bench" if p.pid == me.pid else next((r for key, r in ROLES if key in cmd), "other_ray")
        out[p.pid] = (role, t.user + t.system + t.children_user + t.children_system)
    return out


def cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two `tree_cpu_seconds()` snapshots, summed per role."""
    out: dict[str, float] = {}
    for pid, (role, t) in after.items():
        out[role] = out.get(role, 0.0) + t - before.get(pid, (role, 0.0))[1]
    return out


def cpu_spent(fn, *args):
    """(fn(*args), wall seconds, CPU seconds of the process tree)."""
    before = tree_cpu_seconds()
    t0 = time.perf_counter()
    result = fn(*args)
    wall = time.perf_counter() - t0
    return result, wall, sum(cpu_by_role(before, tree_cpu_seconds()).values())
