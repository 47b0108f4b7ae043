"""The local S3 server's data folder outlives the server: it reopens on the ports it remembers (SeaweedFS's
master keeps its raft state bound to them), in this process or through `python -m pipelines.common.local_s3
serve DIR`, and a taken port is a clear error rather than a server that never elects a leader."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipelines.common.local_s3 import PORTS_FILE, SeaweedServer, stored_ports
from pipelines.common.storage import Storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _put_get(server: SeaweedServer, monkeypatch, put: dict[str, bytes], get: dict[str, bytes]) -> None:
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    storage = Storage()
    storage.makedirs("s3://kept")
    for name, data in put.items():
        storage.write_bytes(f"s3://kept/{name}", data)
    for name, data in get.items():
        assert storage.read_bytes(f"s3://kept/{name}") == data


@pytest.mark.integration
def test_kept_folder_reopens_on_its_ports_here_and_from_the_shell(tmp_path, monkeypatch):
    folder = str(tmp_path / "weed")
    first = SeaweedServer(folder).start()
    try:
        _put_get(first, monkeypatch, {"a.bin": b"first life"}, {"a.bin": b"first life"})
    finally:
        first.stop()
    assert stored_ports(folder) == first.ports

    # the shell command serves the kept folder on the same ports: the object is there, new writes work
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.common.local_s3", "serve", folder,
                             "--ready_file", str(ready)], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 90
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.3)
        assert ready.exists(), f"serve did not come up (exit code {proc.poll()})"
        assert json.loads(ready.read_text())["AWS_ENDPOINT_URL"] == first.endpoint
        _put_get(first, monkeypatch, {"b.bin": b"second life"}, {"a.bin": b"first life"})
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"export AWS_ENDPOINT_URL={first.endpoint}" in out

    again = SeaweedServer(folder).start()  # and once more in this process: both objects survived
    try:
        assert again.ports == first.ports
        _put_get(again, monkeypatch, {}, {"a.bin": b"first life", "b.bin": b"second life"})
    finally:
        again.stop()


def test_taken_port_of_a_kept_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "weed"
    folder.mkdir()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        ports = {"s3": taken, "master": 21001, "volume": 21002, "filer": 21003}
        (folder / PORTS_FILE).write_text(json.dumps(ports))
        server = SeaweedServer(str(folder))
        assert server.s3_port == taken and server.endpoint.endswith(f":{taken}")
        with pytest.raises(RuntimeError, match=f"in use: s3 {taken}"):
            server.start()
        assert server.process is None  # nothing was started
    with pytest.raises(ValueError, match=f"port {taken}"):
        SeaweedServer(str(folder), s3_port=taken + 1)  # the folder can only come back on its own ports


def test_unreadable_port_file_names_the_file(tmp_path):
    (tmp_path / PORTS_FILE).write_text('{"s3": 1}')
    with pytest.raises(RuntimeError, match=PORTS_FILE):
        SeaweedServer(str(tmp_path))


def test_fresh_folder_gets_distinct_free_ports(tmp_path):
    server = SeaweedServer(str(tmp_path / "new"))
    assert len(set(server.ports.values())) == 4 and server.s3_port == server.ports["s3"]
    assert stored_ports(str(tmp_path / "new")) is None  # stored only once it has served
