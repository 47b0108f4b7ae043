"""The fine-tuning data layer: readers wrapped with the run's kind / split / fixed size, the pairs and
corpus-raster readers on GeoTIFFs written here, the label checks and their report, real BigEarthNet patches."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pytest
from rasterio.transform import from_origin
from test_eval_readers import ben, geobench_dir  # noqa: F401  fixtures: the GEO-Bench samples written there

from pipelines.common.storage import Storage
from pipelines.evaluation.synth_task import geo_block, read_label_map
from pipelines.evaluation.task import TaskInfo
from pipelines.finetune import data as ftdata
from pipelines.finetune.data import FinetuneData, FinetuneReader, checked_splits, load_batch, make_reader
from pipelines.imagery.geotiff import geotiff_bytes
from pipelines.imagery.grid import cell_of

EPSG = 32631


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pipelines.corpus.synth import SynthConfig, write_corpus

    root = str(tmp_path_factory.mktemp("ft") / "synth")
    write_corpus(SynthConfig(num_samples=12, seed=3, labelled=True, cloud_rate=0.0, missing_timestep_rate=0.0,
                             missing_modality_rate=0.0, timesteps=2), root, Storage())
    return root


def synth(corpus, **kw):
    args = dict(format="synth", root=corpus, kind="segmentation", chip_size=32, chips_per_tile=4, split_block=1,
                fractions=[0.5, 0.25, 0.25], max_timesteps=2, modalities=["sentinel2_l2a", "sentinel1"])
    args.update(kw)
    return FinetuneData(**args)


def test_synth_segmentation_batches(corpus):
    data = synth(corpus)
    reader = make_reader(data)
    task = ftdata.task_spec(data, reader.info(), "unet")
    assert task.kind == "segmentation" and task.num_outputs == 8 and task.num_timesteps == 2
    splits, report = checked_splits(reader, task)
    assert sum(len(v) for v in splits.values()) == 48 and all(splits.values())
    assert {s: report[s]["used"] for s in splits} == {s: len(v) for s, v in splits.items()}
    rows = splits["train"][:3]
    x, months, labels = load_batch(reader, rows)
    assert x["sentinel2_l2a"].shape == (3, 32, 32, 2, 12) and x["sentinel1"].shape == (3, 32, 32, 2, 2)
    assert months.shape == (3, 2) and labels.shape == (3, 32, 32) and labels.dtype == np.int64
    r = rows[1]
    full = read_label_map(corpus, r["sample_id"], Storage())
    assert np.array_equal(labels[1], full[r["r0"] : r["r0"] + 32, r["c0"] : r["c0"] + 32])
    ours, m_ours, _ = reader.load(r)  # through the tile cache
    theirs, m_theirs, label = reader.inner.load(r)  # the evaluation reader
    assert m_ours.tolist() == m_theirs.tolist() and np.array_equal(label, labels[1])
    for m in ours:
        assert np.array_equal(ours[m], theirs[m], equal_nan=True) and np.array_equal(x[m][1], ours[m], equal_nan=True)


def test_synth_classification_and_regression_labels(corpus):
    cls = make_reader(synth(corpus, kind="classification"))
    rows = cls.rows()
    full = read_label_map(corpus, rows[5]["sample_id"], Storage())
    crop = full[rows[5]["r0"] : rows[5]["r0"] + 32, rows[5]["c0"] : rows[5]["c0"] + 32]
    assert int(cls.label(rows[5])) == np.bincount(crop[crop >= 0]).argmax()
    reg = make_reader(synth(corpus, kind="regression"))
    assert reg.info().class_names[0] == "tree_cover" and reg.info().num_classes == 8
    assert np.isclose(reg.label(rows[5]).sum(), 1.0)
    two = make_reader(synth(corpus, kind="regression", class_names=["water", "tree_cover"]))
    frac = two.label(rows[5])
    assert frac.shape == (2,) and np.isclose(frac[1], (crop == 0).mean())
    with pytest.raises(ValueError, match=r"data.class_names.*\['lava'\]"):
        make_reader(synth(corpus, kind="regression", class_names=["lava"])).info()


def test_geographic_split_keeps_blocks_whole(corpus):
    reader = make_reader(synth(corpus, split="geographic", split_block=2, kind="classification"))
    rows = reader.rows()
    split_of_block = {}
    for r in rows:
        assert split_of_block.setdefault(geo_block(r["sample_id"], 2), r["split"]) == r["split"]
    assert len(split_of_block) >= 2 and len(set(split_of_block.values())) >= 2


def test_empty_split_names_the_fields(corpus):
    with pytest.raises(ValueError, match=r"the val split is empty.*data.fractions"):
        checked_splits(make_reader(synth(corpus, fractions=[0.7, 0.0, 0.3])), make_reader(synth(corpus)).info())


# --------------------------------------------------------------------------------------------------
# label checks on rows of a stand-in reader


@dataclass
class RowsReader:
    """A reader whose rows carry their labels (as BigEarthNet's and the chip CSV's do)."""

    labels: list  # (split, label) per row
    names: list = field(default_factory=lambda: ["a", "b", "c"])

    def info(self):
        return TaskInfo("rows", "classification", self.names)

    def rows(self):
        return [{"id": f"chip{i}.tif", "split": s, "label": y} for i, (s, y) in enumerate(self.labels)]

    def load(self, row):
        return {"sentinel2_l2a": np.zeros((40, 40, 3, 12), np.float32)}, np.arange(3), np.asarray(row["label"])


def rows_reader(labels, **kw):
    return FinetuneReader(FinetuneData(format="chips", root="/data/x", chip_size=16, **kw), RowsReader(labels))


def test_bad_scene_labels_are_skipped_and_counted():
    reader = rows_reader([("train", 0), ("train", float("nan")), ("train", 7), ("train", -1), ("train", 1),
                          ("train", 2), ("val", 1), ("test", 2), ("test", 9)])
    splits, report = checked_splits(reader, reader.info())
    assert [r["id"] for r in splits["train"]] == ["chip0.tif", "chip4.tif", "chip5.tif"]
    assert report["train"]["used"] == 3
    assert report["train"]["skipped"] == {"nan_label": 1, "label_outside_classes": 1, "unlabelled": 1}
    assert report["train"]["examples"]["label_outside_classes"] == ["chip2.tif: class id 7 outside 0..2"]
    assert report["test"] == {"used": 1, "skipped": {"label_outside_classes": 1}, "classes_absent": ["a", "b"],
                              "examples": {"label_outside_classes": ["chip8.tif: class id 9 outside 0..2"]}}


def test_class_missing_from_train():
    labels = [("train", 0), ("train", 1), ("val", 1), ("test", 2)]
    with pytest.raises(ValueError, match=r"/data/x: class\(es\) \['c'\] appear in val/test but never in train"):
        checked_splits(rows_reader(labels), rows_reader(labels).info())
    reader = rows_reader(labels, unseen_classes="report")
    _, report = checked_splits(reader, reader.info())
    assert report["train"]["classes_only_held_out"] == ["c"]


def test_samples_are_cropped_and_padded_to_the_chip():
    reader = rows_reader([("train", 0)], max_timesteps=5)
    x, months, y = load_batch(reader, reader.rows())
    assert x["sentinel2_l2a"].shape == (1, 16, 16, 5, 12) and months.tolist() == [[0, 1, 2, 2, 2]]
    assert not np.isnan(x["sentinel2_l2a"][0, :, :, :3]).any() and np.isnan(x["sentinel2_l2a"][0, :, :, 3:]).all()
    assert y.tolist() == [0]


def test_bad_config_fields_are_named():
    for kw, field_name in [({"format": "tfrecord"}, "data.format"), ({"kind": "detection"}, "data.kind"),
                           ({"split": "random"}, "data.split"), ({"chip_size": 30}, "data.chip_size"),
                           ({"fractions": [1, 0]}, "data.fractions"), ({"modalities": ["worldcover"]}, "data.modalities"),
                           ({"format": "pairs"}, "data.pairs"), ({"root": ""}, "data.root")]:
        args = dict(format="synth", root="/x")
        args.update(kw)
        with pytest.raises(ValueError, match=field_name):
            make_reader(FinetuneData(**args))


# --------------------------------------------------------------------------------------------------
# image + label GeoTIFF pairs


def write_scene(folder, i, h=40, w=48, label=None, label_transform=None, label_crs=EPSG, t=2):
    """Scene i: a Sentinel-2 image (T*12 bands, time-major; value = 1000 t + 10 c + i) and a label raster."""
    transform = from_origin(500000 + 10000 * i, 5000000, 10, 10)
    img = np.zeros((t * 12, h, w), np.float32)
    for tt in range(t):
        for c in range(12):
            img[tt * 12 + c] = 1000 * tt + 10 * c + i
    img[0, 0, 0] = -9999  # the image's nodata
    with open(os.path.join(folder, f"s2_{i}.tif"), "wb") as fh:
        fh.write(geotiff_bytes(img, EPSG, transform, nodata=-9999))
    if label is None:
        label = np.ones((1, h, w), np.uint8)
    nodata = None if label.dtype.kind == "f" else 255
    with open(os.path.join(folder, f"label_{i}.tif"), "wb") as fh:
        fh.write(geotiff_bytes(label, label_crs, label_transform or transform, nodata=nodata))
    return {"images": {"sentinel2_l2a": f"s2_{i}.tif"}, "label": f"label_{i}.tif"}


def pairs(folder, scenes, **kw):
    args = dict(format="pairs", root=str(folder), kind="segmentation", class_names=["water", "land", "road"],
                pairs=scenes, chip_size=16, max_timesteps=2, patch_size=4, months=[4, 5])
    args.update(kw)
    return FinetuneData(**args)


def test_pairs_reader_cuts_chips_and_checks_labels(tmp_path):
    label = np.ones((1, 40, 48), np.uint8)
    label[0, :16, :16] = 255  # chip (0, 0): nothing labelled
    label[0, 20, 40] = 9  # chip (16, 32): a class outside the list
    label[0, 30, 5] = 255  # one unlabelled pixel in chip (24, 0)
    scenes = [dict(write_scene(tmp_path, 0, label=label), split="train"),
              dict(write_scene(tmp_path, 1), split="val"), dict(write_scene(tmp_path, 2), split="test")]
    reader = make_reader(pairs(tmp_path, scenes))
    rows = reader.rows()
    assert len(rows) == 27  # 3 scenes x (rows at 0, 16, 24) x (cols at 0, 16, 32)
    splits, report = checked_splits(reader, reader.info())
    assert report["train"]["used"] == 7
    assert report["train"]["skipped"] == {"no_labelled_pixel": 1, "label_outside_classes": 1}
    msg = report["train"]["examples"]["label_outside_classes"][0]
    assert "label_0.tif@16,32" in msg and "class id(s) [9] outside -1..2" in msg
    row = next(r for r in splits["train"] if (r["r0"], r["c0"]) == (24, 0))
    x, months, y = load_batch(reader, [row])
    s2 = x["sentinel2_l2a"][0]  # (16, 16, 2, 12)
    assert s2.shape == (16, 16, 2, 12) and s2[0, 0, 1, 3] == 1030 and s2[0, 0, 0, 11] == 110
    assert months.tolist() == [[4, 5]] and y[0, 6, 5] == -1 and (y[0] >= 0).sum() == 255
    first = next(r for r in rows if (r["r0"], r["c0"]) == (0, 0) and r["label_uri"].endswith("label_1.tif"))
    assert np.isnan(reader.load(first)[0]["sentinel2_l2a"][0, 0, 0, 0])  # nodata -> missing
    cx, cy = 510000 + 80, 5000000 - 80
    col, r_ = cell_of(cx, cy)
    assert first["geo"] == f"EPSG:{EPSG}/{col // 4}/{r_ // 4}"


def test_pairs_label_raster_on_another_grid(tmp_path):
    shifted = from_origin(500010, 5000000, 10, 10)
    with pytest.raises(ValueError, match=r"label_0.tif is not on the grid of image .*s2_0.tif: transform"):
        make_reader(pairs(tmp_path, [write_scene(tmp_path, 0, label_transform=shifted)])).rows()
    with pytest.raises(ValueError, match=r"label_0.tif is not on the grid of image .*s2_0.tif: CRS"):
        make_reader(pairs(tmp_path, [write_scene(tmp_path, 0, label_crs=32632)])).rows()
    small = np.ones((1, 32, 48), np.uint8)
    with pytest.raises(ValueError, match=r"size 48x40 vs 48x32"):
        make_reader(pairs(tmp_path, [write_scene(tmp_path, 0, label=small)])).rows()


def test_pairs_pixel_regression_and_geographic_split(tmp_path):
    scenes = []
    for i in range(4):
        target = np.full((2, 32, 32), 0.5, np.float32)
        target[1, :8] = np.nan
        if i == 0:
            target[:, 16:, 16:] = np.nan  # chip (16, 16) of scene 0: no target at all
        scenes.append(write_scene(tmp_path, i, h=32, w=32, label=target))
    data = pairs(tmp_path, scenes, kind="pixel_regression", class_names=["ndvi", "height"], split="geographic",
                 split_block=1, fractions=[0.5, 0.25, 0.25])
    reader = make_reader(data)
    splits, report = checked_splits(reader, ftdata.task_spec(data, reader.info(), "unet"))
    skipped = [report[s]["skipped"] for s in splits if report[s]["skipped"]]
    assert skipped == [{"no_labelled_pixel": 1}]
    split_of_scene = {}
    for r in reader.rows():  # each scene lies in one 2.56 km cell here: all its chips in one split
        assert split_of_scene.setdefault(r["label_uri"], r["split"]) == r["split"]
    assert sorted(split_of_scene.values()) == ["test", "train", "train", "val"]
    given = make_reader(FinetuneData(**{**data.__dict__, "split": "given"})).rows()  # no scene names a split
    assert [r["split"] for r in given] == [r["split"] for r in reader.rows()]
    _, _, y = load_batch(reader, splits["train"][:1])
    assert y.shape == (1, 2, 16, 16) and y.dtype == np.float32 and np.isnan(y[0, 1, :8]).all()


# --------------------------------------------------------------------------------------------------
# a label raster over corpus cells


def test_corpus_label_raster(corpus, tmp_path):
    from pipelines.corpus.raw_layout import list_samples, parse_sample_id

    samples = sorted(list_samples(corpus, Storage()))
    epsg, col, row = parse_sample_id(samples[0])
    same = [s for s in samples if parse_sample_id(s)[0] == epsg]
    # a raster over the first cell and the one east of it, classes 0 / 1 by column parity
    label = np.zeros((1, 256, 512), np.uint8)
    label[0, :, 1::2] = 1
    path = str(tmp_path / "labels.tif")
    with open(path, "wb") as fh:
        fh.write(geotiff_bytes(label, epsg, from_origin(col * 2560.0, -row * 2560.0, 10, 10), nodata=255))
    data = FinetuneData(format="corpus_raster", root=corpus, label_raster=path, kind="segmentation",
                        class_names=["even", "odd"], chip_size=64, modalities=["sentinel2_l2a"], max_timesteps=2,
                        split="geographic", split_block=1, fractions=[1, 0, 0])
    reader = make_reader(data)
    rows = reader.rows()
    assert len(rows) == 16 * len(samples)
    inside = [r for r in rows if r["skip"] is None]
    assert {r["sample_id"] for r in inside} >= {samples[0]} and len(same) >= 1
    x, months, y = load_batch(reader, inside[:2])
    assert x["sentinel2_l2a"].shape == (2, 64, 64, 2, 12) and y.shape == (2, 64, 64)
    assert (y[:, :, 1::2] == 1).all() and (y[:, :, ::2] == 0).all()
    with pytest.raises(ValueError, match="the val split is empty"):
        checked_splits(reader, reader.info())
    moved = str(tmp_path / "moved.tif")
    with open(moved, "wb") as fh:
        fh.write(geotiff_bytes(label, epsg, from_origin(col * 2560.0 + 5, -row * 2560.0, 10, 10), nodata=255))
    with pytest.raises(ValueError, match=r"moved.tif is not on the corpus grid"):
        make_reader(FinetuneData(**{**data.__dict__, "label_raster": moved})).rows()


# --------------------------------------------------------------------------------------------------
# real data


def test_bigearthnet_patches(tmp_path):
    from pipelines.imagery import sample_data

    patches = sample_data.bigearthnet_patches()
    s2_root = os.path.dirname(patches[0]["s2_dir"])
    s1_root = s2_root.replace("BigEarthNet-S2-Example", "BigEarthNet-S1-Example")
    data = FinetuneData(format="bigearthnet", root=s2_root, s1_root=s1_root, kind="multilabel", chip_size=64,
                        modalities=["sentinel2_l2a", "sentinel1"], fractions=[0.5, 0.2, 0.3],
                        unseen_classes="report")
    reader = make_reader(data)
    info = reader.info()
    splits, report = checked_splits(reader, info)
    assert sum(v["used"] for v in report.values()) == 6 and all(splits.values())
    x, months, y = load_batch(reader, splits["train"])
    n = len(splits["train"])
    assert x["sentinel2_l2a"].shape == (n, 64, 64, 1, 12) and x["sentinel1"].shape == (n, 64, 64, 1, 2)
    assert y.shape == (n, info.num_classes) and y.dtype == np.int64
    raw, _, _ = reader.inner.load(splits["train"][0])
    assert np.array_equal(x["sentinel2_l2a"][0], raw["sentinel2_l2a"][28:92, 28:92], equal_nan=True)  # centre crop
    geo = make_reader(FinetuneData(**{**data.__dict__, "split": "geographic"})).rows()
    assert all(r["split"] in ("train", "val", "test") for r in geo)
    with pytest.raises(ValueError, match=r"data.kind is 'segmentation' but .* is a multilabel task"):
        make_reader(FinetuneData(**{**data.__dict__, "kind": "segmentation"})).info()


# --------------------------------------------------------------------------------------------------
# a chip folder: pixel time series (BreizhCrops-like) and a label outside the class list


def write_chips(folder, labels, t=6):
    """1 x 1 px chips, each a time series of B02 B03 B04 B08 (t * 4 bands, time-major), + labels.csv."""
    lines = ["chip,label,split,date"]
    for i, (label, split) in enumerate(labels):
        arr = (np.arange(t * 4, dtype=np.float32) * 100 + i).reshape(t * 4, 1, 1)
        with open(os.path.join(folder, f"p{i}.tif"), "wb") as fh:
            fh.write(geotiff_bytes(arr, EPSG, from_origin(500000 + 10 * i, 5000000, 10, 10)))
        lines.append(f"p{i}.tif,{label},{split},2021-05-01")
    with open(os.path.join(folder, "labels.csv"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


def chips(folder, **kw):
    args = dict(format="chips", root=str(folder), kind="classification", bands=["B02", "B03", "B04", "B08"],
                class_names=["wheat", "maize"], chip_size=1, patch_size=1, max_timesteps=6)
    args.update(kw)
    return FinetuneData(**args)


def test_pixel_time_series_classification(tmp_path):
    import torch

    from olmoearth.finetuned import FineTunedModel
    from olmoearth.loading import random_model

    write_chips(tmp_path, [("wheat", "train"), ("maize", "train"), ("maize", "val"), ("wheat", "test")])
    data = chips(tmp_path)
    reader = make_reader(data)
    splits, report = checked_splits(reader, reader.info())
    x, months, y = load_batch(reader, splits["train"])
    s2 = x["sentinel2_l2a"]
    assert s2.shape == (2, 1, 1, 6, 12) and months.tolist() == [[4] * 6] * 2 and y.tolist() == [0, 1]
    assert s2[1, 0, 0, 2, 2] == (2 * 4 + 2) * 100 + 1  # timestep 2, B04 of chip 1
    model = FineTunedModel(random_model("nano", 0, encoder_dim=32, encoder_depth=2, encoder_heads=2,
                                        decoder_dim=32, decoder_depth=1, decoder_heads=2).encoder,
                           ftdata.task_spec(data, reader.info()))
    assert model(x, months).shape == (2, 2) and model.task.patch_size == 1 and model.task.num_timesteps == 6
    assert torch.isfinite(model(x, months)).all()


def test_chip_label_outside_the_class_list(tmp_path):
    write_chips(tmp_path, [("wheat", "train"), ("barley", "train")])
    with pytest.raises(ValueError, match=r"labels.csv line 3: label\(s\) \['barley'\] not among class names"):
        make_reader(chips(tmp_path)).rows()


# --------------------------------------------------------------------------------------------------
# GEO-Bench (HDF5 samples written in its layout by tests/test_eval_readers.py's fixture)


def test_geobench_given_partition(geobench_dir):  # noqa: F811  the imported fixture
    import json

    data = FinetuneData(format="geobench", root=str(geobench_dir), kind="classification", chip_size=32)
    with pytest.raises(ValueError, match=r"m-mini: the val split is empty.*dataset's own split"):
        checked_splits(make_reader(data), make_reader(data).info())
    names = [f"id_{i:04d}" for i in range(6)]
    (geobench_dir / "ft_partition.json").write_text(json.dumps({"train": names[:3], "valid": names[3:4],
                                                                 "test": names[4:]}))
    reader = make_reader(FinetuneData(**{**data.__dict__, "partition": "ft", "unseen_classes": "report"}))
    splits, report = checked_splits(reader, reader.info())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    x, months, y = load_batch(reader, splits["train"])
    assert x["sentinel2_l2a"].shape == (3, 32, 32, 1, 12) and y.shape == (3,) and months.tolist() == [[6]] * 3
    with pytest.raises(ValueError, match="data.split: geographic needs georeferenced samples; geobench"):
        make_reader(FinetuneData(**{**data.__dict__, "split": "geographic"})).rows()
