"""Hostile and careless requests against the Serve endpoint (issue #19, findings 1-7), each on a real server
on 127.0.0.1: every one answered with its 4xx (or dropped at its deadline), the replica's and proxy's memory
bounded (psutil over their process trees), the VRT upload proven to read no local file and fetch no URL, and
the corpus build refusing a raw file that is a VRT."""

from __future__ import annotations

import http.server
import io
import os
import select
import socket
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = "olmoearth-hostile"


@pytest.fixture(scope="module")
def url(ray_cluster):
    from ray import serve

    from pipelines.common.local_s3 import free_port
    from serve.app import ServeConfig, run

    cfg = ServeConfig(model_uri="random:nano:3", port=free_port(), name=APP, min_replicas=1, max_replicas=1,
                      max_batch_size=4, max_ongoing_requests=8, batch_wait_timeout_s=0.01, num_cpus=0.5,
                      torch_threads=1, max_tile=64, max_body_mb=8, max_tokens=131072, max_tokens_per_sample=4096,
                      max_decoded_mb=64, max_parts=4, forward_tokens=1024, body_timeout_s=4, body_idle_s=2,
                      request_timeout_s=4, auth_token=TOKEN)  # fmt: skip
    run(cfg)
    yield f"http://127.0.0.1:{cfg.port}"
    serve.shutdown()


# ---- helpers ----------------------------------------------------------------------------------------------


def ray_processes(prefix: str) -> list:
    """Processes whose title (Ray names its worker processes `ray::<actor class>`) starts with prefix."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(f"ray::{prefix}"):
            found.append(p)
    return found


def server_pids() -> list[int]:
    """The encoder replica's and this cluster's HTTP proxy's processes (children of the same raylet), with
    their children."""
    (replica,) = ray_processes(f"ServeReplica:{APP}:OlmoEarthEncoder")
    raylet = replica.parent()
    proxies = [p for p in ray_processes("ProxyActor") if p.ppid() == raylet.pid]
    pids = []
    for p in [replica, *proxies]:
        pids += [p.pid] + [c.pid for c in p.children(recursive=True)]
    return pids


def rss_mb() -> float:
    import psutil

    total = 0
    for pid in server_pids():
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def replica_cpu_s() -> float:
    (p,) = ray_processes(f"ServeReplica:{APP}:OlmoEarthEncoder")
    t = p.cpu_times()
    return t.user + t.system


class PeakRss:
    """The servers' largest RSS while the block runs, sampled every 50 ms."""

    def __enter__(self):
        self.base, self.peak, self._stop = rss_mb(), 0.0, threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.base


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def post(url, data, ctype="application/x-npz", params=None, headers=None, timeout=60, **kw):
    h = {"Content-Type": ctype, **AUTH, **(headers or {})} if ctype else {**AUTH, **(headers or {})}
    return requests.post(f"{url}/embed", data=data, params={"patch_size": 4, **(params or {})}, headers=h,
                         timeout=timeout, **kw)  # fmt: skip


def assert_4xx(r, status, field=None):
    body = r.json()
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert body["error"] and len(body["error"]) < 300
    if field is not None:
        assert body["field"] == field, body
    for leak in ("/vsimem", "Traceback", "Error:", "/tmp", "/proc", "rasterio", "random:"):
        assert leak not in r.text, r.text
    return body


def good_npz(b=1, size=16, t=1, seed=0) -> bytes:
    x = (np.random.default_rng(seed).random((b, size, size, t, 12)) * 3000).astype(np.float32)
    return npz(sentinel2_l2a=x)


def zip_member(name: str, header_shape: tuple, dtype: str, payload: bytes, method: int) -> bytes:
    """A zip holding one .npy member whose header declares `header_shape` and whose data is `payload`,
    compressed with `method` (what a hand-made bomb looks like)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": header_shape})  # fmt: skip
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as zf, zf.open(name, "w", force_zip64=True) as fh:
        fh.write(buf.getvalue())
        for _ in range(len(payload) // 2**20 or 1):
            fh.write(payload[: 2**20])
    return out.getvalue()


def tif(arr, crs="EPSG:32618", **kw) -> bytes:
    from rasterio import Affine

    from pipelines.imagery.geotiff import geotiff_bytes

    return geotiff_bytes(arr, crs, Affine(10, 0, 500000, 0, -10, 4000000), **kw)


class CountingHTTP:
    """A local HTTP server that counts the requests it gets (an SSRF target)."""

    def __enter__(self):
        hits = self.hits = []

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.srv.shutdown()


def vrt(source: str, size: int = 16, bands: int = 12) -> bytes:
    srcs = "".join(f'<VRTRasterBand dataType="UInt16" band="{b + 1}"><SimpleSource><SourceFilename relativeToVRT="0">'
                   f"{source}</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
                   for b in range(bands))  # fmt: skip
    return (f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>EPSG:32618</SRS>'
            f"<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>{srcs}</VRTDataset>").encode()  # fmt: skip


@pytest.fixture
def secret_tif(tmp_path):
    """A local GeoTIFF with known pixels and an atime older than its mtime: any read moves the atime
    (relatime), so the test can tell whether the server opened it."""
    path = tmp_path / "secret.tif"
    path.write_bytes(tif(np.full((1, 16, 16), 4242, np.uint16)))
    st = os.stat(path)
    os.utime(path, (st.st_mtime - 3600, st.st_mtime))
    return str(path)


# ---- 1. uploads open as GeoTIFF only ----------------------------------------------------------------------


def test_vrt_upload_reads_no_local_file_and_fetches_no_url(url, secret_tif):
    atime = os.stat(secret_tif).st_atime
    with CountingHTTP() as web:
        remote = f"/vsicurl/http://127.0.0.1:{web.port}/creds.tif"
        for source in (secret_tif, remote, "/proc/self/environ"):
            body = vrt(source)
            r = post(url, None, ctype=None, files={"sentinel2_l2a": ("a.tif", body, "image/tiff")})
            assert_4xx(r, 400, "sentinel2_l2a")
            r = post(url, body, ctype="image/tiff", params={"modality": "sentinel2_l2a"})
            assert_4xx(r, 400, "sentinel2_l2a")
        # a VRT behind TIFF magic bytes is still not a TIFF to the GTiff driver
        r = post(url, b"II*\x00" + vrt(secret_tif), ctype="image/tiff", params={"modality": "sentinel2_l2a"})
        assert_4xx(r, 400, "sentinel2_l2a")
        time.sleep(0.5)
        assert web.hits == []
    assert os.stat(secret_tif).st_atime == atime, "the server read the local file the VRT names"
    # a real GeoTIFF still works
    r = post(url, tif(np.full((12, 16, 16), 1000, np.uint16)), ctype="image/tiff",
             params={"modality": "sentinel2_l2a", "format": "npy"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert np.load(io.BytesIO(r.content)).shape == (1, 4, 4, 128)


def test_geotiff_reader_refuses_vrt_and_virtual_paths(secret_tif):
    from pipelines.imagery.geotiff import GeoTiffError, read_geotiff

    for data in (vrt(secret_tif), b"II*\x00" + vrt(secret_tif), b"MM\x00*" + b"\x00" * 40):
        with pytest.raises(GeoTiffError) as e:
            read_geotiff(data, name="upload.tif")
        assert "/vsimem" not in str(e.value) and e.value.file == "upload.tif"
    with pytest.raises(GeoTiffError, match="virtual"):
        read_geotiff("/vsicurl/http://127.0.0.1:9/x.tif")
    vrt_file = os.path.join(os.path.dirname(secret_tif), "a.tif")
    open(vrt_file, "wb").write(vrt(secret_tif))
    with pytest.raises(GeoTiffError, match="not a TIFF"):
        read_geotiff(vrt_file)


# ---- 7. the corpus build refuses a raw file that is a VRT -------------------------------------------------


def test_corpus_build_rejects_a_raw_file_replaced_by_a_vrt(tmp_path, secret_tif):
    from pipelines.common.storage import Storage
    from pipelines.corpus.validate import RejectError, read_raw

    atime = os.stat(secret_tif).st_atime
    raw = tmp_path / "10_sentinel2_l2a_monthly" / "EPSG:32618_12_-170_10.tif"
    raw.parent.mkdir()
    raw.write_bytes(vrt(secret_tif, size=256, bands=1))
    for source in (raw.read_bytes(), str(raw)):  # the build reads bytes; a URI read goes the same way
        with pytest.raises(RejectError) as e:
            read_raw(source, Storage(), name=str(raw))
        assert e.value.reason == "corrupt" and e.value.file == str(raw)
    assert os.stat(secret_tif).st_atime == atime


# ---- 2. declared sizes are checked before anything is decoded ---------------------------------------------


def test_zip_and_npy_bombs_are_refused_before_inflating(url):
    cases = [
        # bz2 member (a few hundred bytes on the wire, 32 MB inflated)
        ("bz2", zip_member("sentinel2_l2a.npy", (1, 64, 64, 1, 12), "<f4", bytes(2**25), zipfile.ZIP_BZIP2), 422),
        # deflate member whose .npy header declares 2 GiB (16 KB on the wire)
        ("header", zip_member("sentinel2_l2a.npy", (64, 2048, 2048, 1, 1), "<f8", bytes(2**24), zipfile.ZIP_DEFLATED),
         413),
        # stored .npy header declaring 9 GiB, no data behind it
        ("huge", zip_member("sentinel2_l2a.npy", (64, 4096, 4096, 12, 12), "<f4", b"", zipfile.ZIP_STORED), 413),
    ]  # fmt: skip
    for name, body, status in cases:
        assert len(body) < 2**21, (name, len(body))
        with PeakRss() as mem:
            r = post(url, body)
        assert_4xx(r, status, "sentinel2_l2a")
        assert mem.growth < 150, f"{name}: servers grew by {mem.growth:.0f} MB"


def test_geotiff_declaring_a_huge_raster_is_refused_before_decoding(url):
    from affine import Affine
    from rasterio.io import MemoryFile

    for size, bands in ((20000, 12), (100000, 12), (64, 12 * 13)):
        with MemoryFile() as mf:
            with mf.open(driver="GTiff", width=size, height=size, count=bands, dtype="uint16", crs="EPSG:32618",
                         transform=Affine(10, 0, 500000, 0, -10, 4000000), tiled=True, compress="deflate",
                         sparse_ok=True):  # fmt: skip
                pass  # nothing written: a few KB that declare size x size x bands
            body = bytes(mf.read())
        assert len(body) < 2 * 2**20  # at most 1.2 MB (the tile offsets) declaring up to 240 GB
        with PeakRss() as mem:
            r = post(url, None, ctype=None, files={"sentinel2_l2a": ("a.tif", body, "image/tiff")})
        assert_4xx(r, 413 if size > 64 else 400, "sentinel2_l2a")
        assert mem.growth < 150, f"{size} px: servers grew by {mem.growth:.0f} MB"


# ---- 3. compute per request is bounded, split, cancelled and given a deadline -----------------------------


def test_token_limit_refuses_before_any_work_and_large_batches_are_split(url):
    x = (np.random.default_rng(5).random((1, 24, 24, 12, 12)) * 3000).astype(np.float32)
    t0 = time.time()
    r = post(url, npz(sentinel2_l2a=x), params={"patch_size": 1})  # 24 * 24 * 12 * 3 = 20736 tokens
    assert_4xx(r, 413, "body")
    assert "20736" in r.json()["error"] and "4096" in r.json()["error"]
    assert time.time() - t0 < 3
    # 4 samples of 768 tokens with forward_tokens 1024: four forwards, the same answers as one at a time
    xs = (np.random.default_rng(6).random((4, 32, 32, 1, 12)) * 3000).astype(np.float32)
    r = post(url, npz(sentinel2_l2a=xs), params={"patch_size": 2})
    assert r.status_code == 200, r.text
    together = np.load(io.BytesIO(r.content))
    for i in (0, 3):
        one = post(url, npz(sentinel2_l2a=xs[i : i + 1]), params={"patch_size": 2})
        np.testing.assert_allclose(np.load(io.BytesIO(one.content))[0], together[i], atol=1e-5)


def big_request() -> bytes:
    """32 samples x 3072 tokens (6 MB): 32 forwards (forward_tokens 1024), far past the 4 s deadline."""
    return npz(sentinel2_l2a=(np.random.default_rng(7).random((32, 32, 32, 4, 12)) * 3000).astype(np.float32))


def test_deadline_and_client_disconnect_stop_the_work(url):
    body = big_request()
    t0 = time.time()
    r = post(url, body, params={"patch_size": 2})
    took = time.time() - t0
    assert r.status_code == 503 and "within" in r.json()["error"], r.text
    assert took < 7, took
    time.sleep(1.5)  # the forward running at the deadline ends
    c0 = replica_cpu_s()
    time.sleep(2)
    assert replica_cpu_s() - c0 < 0.5, "the replica kept encoding past the deadline"
    # a client that gives up after 1 s: its samples are dropped at the next forward
    with pytest.raises(requests.exceptions.Timeout):
        post(url, body, params={"patch_size": 2}, timeout=1.5)
    time.sleep(1.5)
    c0 = replica_cpu_s()
    time.sleep(2)
    assert replica_cpu_s() - c0 < 0.5, "the replica kept encoding for a client that had gone"
    assert post(url, good_npz()).status_code == 200


# ---- 4. slow or huge bodies and busy replicas do not block others or health -------------------------------


def slow_client(port: int, declared: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npz\r\nAuthorization: Bearer {TOKEN}"
              f"\r\nContent-Length: {declared}\r\n\r\nPK".encode())  # fmt: skip
    return s


def health_s(url) -> float:
    t0 = time.time()
    r = requests.get(f"{url}/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    return time.time() - t0


def test_slow_senders_time_out_and_health_answers_under_any_load(url):
    port = int(url.rsplit(":", 1)[1])
    slow = [slow_client(port, 2**20) for _ in range(12)]  # more than the replica's 8 request slots
    try:
        time.sleep(0.5)
        assert health_s(url) < 1.5
        t0 = time.time()
        r = post(url, good_npz(), timeout=30)
        assert r.status_code == 200, r.text
        assert time.time() - t0 < 12  # the slow senders were dropped after body_idle_s (2 s)
        for s in slow:
            s.settimeout(10)
            assert s.recv(100).startswith(b"HTTP/1.1 408"), "a slow sender was not timed out"
    finally:
        for s in slow:
            s.close()
    # health while the encoder is busy with a long forward
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, url, big_request(), params={"patch_size": 2})
        time.sleep(1.0)
        assert max(health_s(url) for _ in range(3)) < 1.5
        assert busy.result().status_code == 503


def test_many_part_multipart_is_refused_off_the_event_loop(url):
    n = 50000
    boundary = "b0undary"
    parts = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(n))
    body = (parts + f"--{boundary}--\r\n").encode()
    assert len(body) < 8 * 2**20
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(post, url, body, f"multipart/form-data; boundary={boundary}")
        lat = [health_s(url) for _ in range(3)]
        r = fut.result()
    assert_4xx(r, 413, "body")
    assert max(lat) < 1.5, lat


def test_chunked_body_over_the_limit_is_cut_off_while_streaming(url):
    port = int(url.rsplit(":", 1)[1])
    with PeakRss() as mem:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npz\r\nAuthorization: Bearer "
                  f"{TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())  # fmt: skip
        chunk, sent = b"%x\r\n" % 2**20 + b"\x00" * 2**20 + b"\r\n", 0
        s.settimeout(5)
        try:  # 1 MiB chunks until the server answers (or hangs up), 300 MiB at most
            while sent < 300 * 2**20 and not select.select([s], [], [], 0)[0]:
                s.sendall(chunk)
                sent += 2**20
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        s.settimeout(10)
        answer = s.recv(200)
        s.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert sent < 100 * 2**20, f"{sent / 2**20:.0f} MiB sent before the 413"
    # Ray Serve's proxy queues what the client sends until the replica reads it (no backpressure, and Ray 2.60
    # removed proxy middlewares), and the replica pulls that backlog in one batch: each holds at most what got
    # through before the 413 (bounded above), never a decoded copy of it, whatever the machine's load
    sent_mb = sent / 2**20
    assert mem.growth < 3 * sent_mb + 64, f"servers grew by {mem.growth:.0f} MB for {sent_mb:.0f} MiB sent"


# ---- 5. every bad request a short 4xx naming its field, no internals --------------------------------------


def test_bad_values_are_4xx_without_internals(url):
    r = post(url, good_npz(), params={"months": "9" * 20})
    assert_4xx(r, 400, "months")
    buf, arr = io.BytesIO(), io.BytesIO()
    np.save(arr, np.ones((1, 16, 16, 1, 12), np.float32))
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("sentinel2_l2a.npy", arr.getvalue())
        zf.writestr("notes.txt", "hello")
    assert_4xx(post(url, buf.getvalue()), 400, "notes.txt")
    assert_4xx(post(url, b"PK\x03\x04" + os.urandom(200)), 400, "body")
    r = post(url, None, ctype=None, files={"sentinel2_l2a": ("a.tif", b"II*\x00" + os.urandom(300), "image/tiff")})
    assert_4xx(r, 400, "sentinel2_l2a")
    r = post(url, good_npz(), params={"patch_size": "1" * 30})
    assert_4xx(r, 400, "patch_size")
    info = requests.get(f"{url}/info", headers=AUTH, timeout=30)
    assert info.status_code == 200 and "source" not in info.json()["model"]
    assert "random:" not in info.text and info.json()["limits"]["max_tokens_per_sample"] == 4096


# ---- 6. bearer-token authentication -----------------------------------------------------------------------


def test_bearer_token_is_required_except_for_health(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        r = requests.post(f"{url}/embed", data=good_npz(), headers={"Content-Type": "application/x-npz", **headers},
                          timeout=30)  # fmt: skip
        assert_4xx(r, 401, "Authorization")
        assert r.headers["www-authenticate"] == "Bearer"
        assert requests.get(f"{url}/info", headers=headers, timeout=30).status_code == 401
    assert post(url, good_npz()).status_code == 200
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_cluster_yaml_keeps_the_dashboard_on_the_head_node():
    import yaml

    cfg = yaml.safe_load(open("cluster.yaml"))
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head and "0.0.0.0" not in head
