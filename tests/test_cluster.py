"""Cluster operations: the launcher config validates against Ray's own schema, and a job entrypoint runs
under `ray job submit` against a real `ray start --head` cluster (stopped afterwards, that cluster only)."""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from pipelines.common.local_s3 import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    full = prepare_config(copy.deepcopy(raw))
    validate_config(full)  # raises jsonschema.ValidationError on a malformed config
    types = full["available_node_types"]
    assert full["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["cpu_worker"]["max_workers"] > types["cpu_worker"]["min_workers"] == 0
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith("p4")
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert any("pip install" in c and "olmoearth-ray" in c for c in full["setup_commands"])
    # a broken config must fail the same check (so the test cannot pass vacuously)
    broken = copy.deepcopy(full)
    broken["available_node_types"]["cpu_worker"]["min_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(broken)


class LocalHead:
    """`ray start --head` on loopback with its own temp dir, so that stopping it touches no other cluster."""

    def __init__(self, tmp_dir: str):
        self.tmp_dir = tmp_dir
        # every port its own: a default one (the dashboard agent's 52365) may be taken by another Ray cluster
        self.port, self.dashboard_port, self.agent_port = free_port(), free_port(), free_port()
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.env["PATH"] = BIN + os.pathsep + self.env["PATH"]

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout: float = 240.0) -> None:
        cmd = [
            os.path.join(BIN, "ray"), "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
            "--num-cpus=4", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--temp-dir={self.tmp_dir}", "--block",
        ]  # fmt: skip
        self.log = open(os.path.join(self.tmp_dir, "head.log"), "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.address + "/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:  # it answers (401 without the token): up
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(open(os.path.join(self.tmp_dir, "head.log")).read()[-2000:]) from None
                time.sleep(1)
        raise RuntimeError("ray head did not come up")

    def logs(self) -> str:
        """Tails of the head's own logs, for a failure message."""
        out = ""
        for name in ("head.log", "session_latest/logs/dashboard.log", "session_latest/logs/dashboard_agent.log"):
            path = os.path.join(self.tmp_dir, name)
            if os.path.exists(path):
                out += f"\n--- {name}\n" + open(path, errors="replace").read()[-1500:]
        return out

    def stop(self) -> None:
        # every process of this cluster carries its temp dir on its command line
        for sig in (signal.SIGTERM, signal.SIGKILL):
            subprocess.run(["pkill", f"-{sig.name[3:]}", "-f", self.tmp_dir], check=False)
            time.sleep(2)
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.mark.integration  # starts its own `ray start --head` cluster
def test_ray_job_submit_runs_a_job_entrypoint(tmp_path):
    head_dir = f"/tmp/ray-jobtest-{secrets.token_hex(3)}"  # short: unix socket paths are length-limited
    os.makedirs(head_dir)
    head = LocalHead(head_dir)
    out_dir = tmp_path / "synth"
    try:
        head.start()
        cmd = [
            os.path.join(BIN, "ray"), "job", "submit", "--address", head.address, "--working-dir", ROOT,
            "--runtime-env", os.path.join(ROOT, "ray_jobs", "runtime_env.yaml"), "--",
            "python", "ray_jobs/synth.py", "--num_samples", "2", "--ray_tasks", "2", "--out_uri", str(out_dir),
        ]  # fmt: skip
        for _ in range(12):  # the dashboard answers before its job agent is ready on a loaded machine
            done = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=400)
            if done.returncode == 0 or "submitted successfully" in done.stderr + done.stdout:
                break  # ran (a failure of the job itself is not retried)
            time.sleep(10)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + head.logs()
        assert "succeeded" in (done.stdout + done.stderr).lower()
        tifs = list(out_dir.rglob("*.tif"))
        assert tifs, f"the submitted job wrote nothing under {out_dir}"
    finally:
        head.stop()
        shutil.rmtree(head_dir, ignore_errors=True)
    left = subprocess.run(["pgrep", "-f", head_dir], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the test cluster still running: {left}"
