"""The hostile inputs of the endpoint's hardening (issue #19), generated here for bench/soak.py: each kind is
one request (or one connection) that a careless endpoint would let eat its memory, CPU, connections or
local files. The bench owns these generators (the tests have their own).

    kinds = make_kinds(tmp_dir)        # {name: HostileKind}
    outcome = kinds["vrt_local_file"].send("127.0.0.1", port, timeout=60)   # "400", "413", "closed", ...

An outcome is the HTTP status as text, or what the connection did instead: "closed" (the server hung up
without an answer), "reset" (it reset the connection while the client was still sending), "timeout" (no
answer within the client's timeout), "held" (a slow body the server still waited on when the client gave up).
"""

from __future__ import annotations

import http.client
import io
import os
import socket
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

S2_BANDS = 12  # sentinel2_l2a bands (olmoearth.modalities), all the hostile bodies use Sentinel-2
NPZ = "application/x-npz"


@dataclass
class HostileKind:
    """One kind of hostile request: POST /embed with `query`, `headers` and a body (bytes, or chunks for a
    chunked upload); `slow` instead opens a connection that declares a body it never sends."""

    name: str
    query: str = ""
    headers: dict | None = None
    body: bytes | None = None
    chunks: Callable[[], Iterable[bytes]] | None = None
    slow: bool = False

    def send(self, host: str, port: int, timeout: float) -> str:
        if self.slow:
            return _slow_body(host, port, timeout)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.putrequest("POST", "/embed" + (f"?{self.query}" if self.query else ""))
            headers = dict(self.headers or {})
            if self.chunks is not None:
                headers["Transfer-Encoding"] = "chunked"
            else:
                headers["Content-Length"] = str(len(self.body))
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            try:
                if self.chunks is not None:
                    for c in self.chunks():
                        conn.send(b"%x\r\n%s\r\n" % (len(c), c))
                    conn.send(b"0\r\n\r\n")
                else:
                    conn.send(self.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server stopped reading: its answer (a 413, say) may still be there to read
            try:
                r = conn.getresponse()
                r.read()
                return str(r.status)
            except http.client.RemoteDisconnected:  # before its base class ConnectionResetError
                return "closed"
            except (ConnectionResetError, BrokenPipeError):
                return "reset"
        except TimeoutError:
            return "timeout"
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        finally:
            conn.close()


def _slow_body(host: str, port: int, hold: float) -> str:
    """Declare a 1 MB body, send 2 bytes, then wait up to `hold` s for the server to answer or hang up."""
    with socket.create_connection((host, port), timeout=hold) as s:
        s.sendall(f"POST /embed HTTP/1.1\r\nHost: {host}\r\nContent-Type: {NPZ}\r\n"
                  "Content-Length: 1048576\r\n\r\nPK".encode())  # fmt: skip
        deadline = time.monotonic() + hold
        data = b""
        try:
            while time.monotonic() < deadline:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                got = s.recv(4096)
                if not got:
                    break
                data += got
                if b"\r\n" in data:
                    break
        except TimeoutError:
            return "held"
        except ConnectionResetError:
            return "reset"
    if data.startswith(b"HTTP/"):
        return data.split(b" ", 2)[1].decode()
    return "closed"


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def good_npz(rng: np.random.Generator, size: int = 32, t: int = 2) -> bytes:
    """A valid request: one Sentinel-2 tile, size x size px, t timesteps, raw reflectance units."""
    x = (rng.random((1, size, size, t, S2_BANDS)) * 3000).astype(np.float32)
    return npz_bytes({"sentinel2_l2a": x, "months": np.arange(t) + 5})


def _zip_bomb(mib: int) -> bytes:
    """An .npz whose one member, bz2-compressed to a few kB, expands to `mib` MiB (a valid .npy header of a
    float32 array and zeros)."""
    n = mib * 2**20 // 4
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (1, 1, n // S2_BANDS, 1, S2_BANDS)})  # fmt: skip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_BZIP2) as z:
        with z.open("sentinel2_l2a.npy", "w", force_zip64=True) as fh:
            fh.write(header.getvalue())
            zeros, left = bytes(2**24), (n // S2_BANDS) * S2_BANDS * 4
            while left > 0:
                fh.write(zeros[: min(left, len(zeros))])
                left -= len(zeros)
    return buf.getvalue()


def _sparse_geotiff(side: int) -> bytes:
    """A tiled 12-band GeoTIFF of side x side px with no tile written (GDAL's sparse files): ~the header only,
    yet a reader that believes it allocates side² x 12 values. Written with rasterio directly: the project's
    writer (pipelines/imagery/geotiff.py) writes whole arrays, and these files must not hold one."""
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    with MemoryFile() as mf:
        with mf.open(driver="GTiff", width=side, height=side, count=S2_BANDS, dtype="uint16", crs="EPSG:32618",
                     transform=from_origin(500000.0, 4000000.0, 10.0, 10.0), tiled=True, blockxsize=256,
                     blockysize=256, sparse_ok=True):  # fmt: skip
            pass
        return bytes(mf.read())


def _vrt_pointing_at(path: str) -> bytes:
    """A GDAL VRT (XML) whose 12 bands read a file on the server's own disk."""
    bands = "".join(
        f'<VRTRasterBand dataType="UInt16" band="{b + 1}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{path}</SourceFilename><SourceBand>1</SourceBand>'
        "</SimpleSource></VRTRasterBand>"
        for b in range(S2_BANDS)
    )
    return (f'<VRTDataset rasterXSize="32" rasterYSize="32"><SRS>EPSG:32618</SRS>'
            f"<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>{bands}</VRTDataset>").encode()  # fmt: skip


def _multipart(parts: int) -> tuple[bytes, str]:
    boundary = "olmoearthsoak"
    one = f'--{boundary}\r\nContent-Disposition: form-data; name="f{{}}"\r\n\r\nx\r\n'
    body = "".join(one.format(i) for i in range(parts)) + f"--{boundary}--\r\n"
    return body.encode(), f"multipart/form-data; boundary={boundary}"


def _non_npy_member() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("sentinel2_l2a.txt", "not an array " * 100)
    return buf.getvalue()


def make_kinds(tmp_dir: str, bomb_mib: int = 1024, chunked_mib: int = 300) -> dict[str, HostileKind]:
    """Every hostile kind, its bodies built once. tmp_dir: where the local file the VRT points at lies (a
    real GeoTIFF, so that an endpoint that follows the VRT would really read the server's disk)."""
    from rasterio.transform import from_origin

    from pipelines.common.storage import Storage
    from pipelines.imagery.geotiff import geotiff_bytes

    local = os.path.join(tmp_dir, "server-local.tif")
    tif = geotiff_bytes(np.ones((1, 32, 32), np.uint16), 32618, from_origin(500000.0, 4000000.0, 10.0, 10.0))
    Storage().write_bytes(local, tif)
    tiff = {"Content-Type": "image/tiff"}
    npz = {"Content-Type": NPZ}
    multipart, mp_type = _multipart(50_000)
    chunk = bytes(2**20)
    tokens = (np.random.default_rng(1).random((1, 24, 24, 12, S2_BANDS)) * 3000).astype(np.float32)
    kinds = [
        HostileKind("vrt_local_file", "modality=sentinel2_l2a", tiff, _vrt_pointing_at(local)),
        HostileKind("bz2_zip_bomb", "", npz, _zip_bomb(bomb_mib)),
        HostileKind("sparse_geotiff_20000", "modality=sentinel2_l2a", tiff, _sparse_geotiff(20_000)),
        HostileKind("sparse_geotiff_100000", "modality=sentinel2_l2a", tiff, _sparse_geotiff(100_000)),
        HostileKind("tokens_20736", "patch_size=1", npz, npz_bytes({"sentinel2_l2a": tokens,
                                                                    "months": np.arange(12)})),  # fmt: skip
        HostileKind("slow_body", slow=True),
        HostileKind("multipart_50000_parts", "", {"Content-Type": mp_type}, multipart),
        HostileKind(f"chunked_{chunked_mib}mib", "", npz, chunks=lambda: (chunk for _ in range(chunked_mib))),
        HostileKind("months_overflow", "months=99999999999999999999", npz,
                    npz_bytes({"sentinel2_l2a": tokens[:, :8, :8, :2]})),  # fmt: skip
        HostileKind("non_npy_member", "", npz, _non_npy_member()),
    ]
    return {k.name: k for k in kinds}
