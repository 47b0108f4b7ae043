"""Dataset readers on real files: the BigEarthNet example patches (S2 + S1) read and scored end to end
through Ray Data, the same pixels re-packed as a folder of GeoTIFF chips and as GEO-Bench HDF5 samples
(written here in GEO-Bench's layout), and clear errors for wrong label files and missing chips."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from olmoearth.modalities import get_modality
from pipelines.evaluation.extract import extract_features
from pipelines.evaluation.readers import BigEarthNetReader, ChipFolderReader, GeoBenchReader, _safe_loads
from pipelines.evaluation.score import score_task
from pipelines.imagery import sample_data


@pytest.fixture(scope="module")
def ben():
    patches = sample_data.bigearthnet_patches()
    s2_root = os.path.dirname(patches[0]["s2_dir"])
    return patches, s2_root, s2_root.replace("BigEarthNet-S2-Example", "BigEarthNet-S1-Example")


def test_bigearthnet_reader_reads_real_patches(ben):
    patches, s2_root, s1_root = ben
    reader = BigEarthNetReader(s2_root, s1_root=s1_root, fractions=(0.5, 0.0, 0.5))
    info = reader.info()
    assert info.kind == "multilabel"
    assert set(info.class_names) == {l for p in patches for l in p["labels"]}
    rows = reader.rows()
    assert len(rows) == 6 and {r["split"] for r in rows} == {"train", "test"}
    x, months, y = reader.load(rows[0])
    s2, s1 = x["sentinel2_l2a"], x["sentinel1"]
    assert s2.shape == (120, 120, 1, 12) and s1.shape == (120, 120, 1, 2)
    # B01 (60 m) is repeated 6x onto the 10 m grid; B02 (10 m) is native
    assert (s2[:6, :6, 0, 10] == s2[0, 0, 0, 10]).all()
    assert len(np.unique(s2[:6, :6, 0, 0])) > 1
    assert 0 < np.nanmedian(s2[..., 0]) < 5000  # L2A reflectance x 1e4
    assert -40 < np.nanmedian(s1[..., 0]) < 5  # dB
    patch = next(p for p in patches if p["name"] == rows[0]["id"])
    assert [info.class_names[i] for i in np.flatnonzero(y)] == sorted(patch["labels"])
    assert months[0] == 5  # acquired 2017-06-13


def test_bigearthnet_scored_end_to_end_with_ray_data(ben, ray_cluster):
    _, s2_root, s1_root = ben
    reader = BigEarthNetReader(s2_root, s1_root=s1_root, fractions=(0.5, 0.0, 0.5))
    rows = reader.rows()
    feats = extract_features(reader, rows, {"band_stats": {"kind": "band_stats"}}, batch_size=2, num_actors=2)
    # mean and std of every encoder band (12 S2 + 2 S1 + 11 Landsat): absent Landsat gives zeros, so that
    # chips with and without a modality share one feature layout
    band_stats = feats.features["band_stats"]
    assert band_stats.shape == (6, 2 * 25)
    assert np.all(band_stats[:, 2 * 14 :] == 0) and np.all(band_stats[:, : 2 * 12].std(axis=0) > 0)
    assert feats.labels.shape == (6, reader.info().num_classes)
    assert feats.ids == [r["id"] for r in rows]  # row order kept through the actor pool
    records = score_task(reader.info(), feats, k=20)
    metrics = {(r["probe"], r["metric"]) for r in records}
    assert metrics == {("knn", "micro_f1"), ("knn", "map"), ("linear", "micro_f1"), ("linear", "map")}
    for r in records:
        assert r["n_eval"] == 3 and r["split"] == "test" and 0.0 <= r["value"] <= 1.0 or np.isnan(r["value"])


def test_bigearthnet_errors(ben, tmp_path):
    _, s2_root, _ = ben
    reader = BigEarthNetReader(s2_root, class_names=["Pastures"])
    with pytest.raises(ValueError, match="not among the task's class names"):
        reader.rows()
    with pytest.raises(FileNotFoundError, match="no BigEarthNet patch"):
        BigEarthNetReader(str(tmp_path)).info()
    bad = tmp_path / "P1"
    bad.mkdir()
    (bad / "P1_labels_metadata.json").write_text('{"labels": "Pastures"}')
    with pytest.raises(ValueError, match="P1_labels_metadata.json.*list of class names"):
        BigEarthNetReader(str(tmp_path)).info()


def _write_tif(path, arr, nodata=None):
    arr = np.asarray(arr)
    with rasterio.open(path, "w", driver="GTiff", height=arr.shape[1], width=arr.shape[2], count=arr.shape[0],
                       dtype=arr.dtype, crs="EPSG:32633", transform=from_origin(400000, 5300000, 10, 10),
                       nodata=nodata) as dst:
        dst.write(arr)


@pytest.fixture(scope="module")
def chip_folder(ben, tmp_path_factory):
    """The 6 real patches as 4-band (B02 B03 B04 B08) 60x60 chips x 2 crops, labelled by their first label."""
    patches, s2_root, _ = ben
    root = tmp_path_factory.mktemp("chips")
    reader = BigEarthNetReader(s2_root)
    lines = ["chip,label,split,date"]
    for i, row in enumerate(reader.rows()):
        x, _, _ = reader.load(row)
        bands = x["sentinel2_l2a"][:, :, 0, :4].transpose(2, 0, 1).astype(np.uint16)  # B02 B03 B04 B08
        for c, (r0, c0) in enumerate([(0, 0), (60, 60)]):
            name = f"{row['id']}_{c}.tif"
            _write_tif(root / name, bands[:, r0 : r0 + 60, c0 : c0 + 60], nodata=0)
            label = "forest" if any("forest" in l for l in patches[i]["labels"]) else "open"
            lines.append(f"{name},{label},{'train' if i < 4 else 'test'},2017-0{i + 1}-10")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_chip_folder_reader(chip_folder, ray_cluster):
    reader = ChipFolderReader(str(chip_folder), bands=["B02", "B03", "B04", "B08"])
    info = reader.info()
    assert info.class_names == ["forest", "open"]
    rows = reader.rows()
    assert len(rows) == 12 and sum(r["split"] == "test" for r in rows) == 4
    x, months, y = reader.load(rows[0])
    s2 = x["sentinel2_l2a"]
    assert s2.shape == (60, 60, 1, 12)
    assert np.isfinite(s2[..., :4]).any() and np.isnan(s2[..., 4:]).all()  # bands not in the file: missing
    assert months.tolist() == [0] and y.shape == ()
    feats = extract_features(reader, rows, {"band_stats": {"kind": "band_stats"}}, batch_size=4)
    recs = score_task(info, feats, k=5)
    assert {(r["probe"], r["metric"]) for r in recs} == {("knn", "accuracy"), ("linear", "accuracy")}
    assert all(r["n_train"] + r["n_val"] == 8 and r["n_eval"] == 4 for r in recs)


def test_chip_folder_segmentation_masks(chip_folder, tmp_path):
    # a mask per chip: class 1 where NIR > red (vegetation), nodata (255) on the first row
    lines = ["chip,mask"]
    for name in sorted(os.listdir(chip_folder))[:4]:
        if not name.endswith(".tif"):
            continue
        with rasterio.open(chip_folder / name) as src:
            arr = src.read()
        mask = (arr[3] > arr[2]).astype(np.uint8)[None]
        mask[0, 0] = 255
        _write_tif(tmp_path / f"mask_{name}", mask, nodata=255)
        os.link(chip_folder / name, tmp_path / name)
        lines.append(f"{name},mask_{name}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    reader = ChipFolderReader(str(tmp_path), kind="segmentation", bands=["B02", "B03", "B04", "B08"],
                              class_names=["bare", "vegetation"])
    rows = reader.rows()
    _, _, y = reader.load(rows[0])
    assert y.shape == (60, 60) and (y[0] == -1).all() and set(np.unique(y[1:])) <= {0, 1}


def test_chip_folder_errors(chip_folder, tmp_path):
    # wrong label file: no 'label' column
    (tmp_path / "labels.csv").write_text("chip,class\na.tif,forest\n")
    with pytest.raises(ValueError, match=r"labels.csv: missing column\(s\) \['label'\]"):
        ChipFolderReader(str(tmp_path)).rows()
    # missing chip
    (tmp_path / "labels.csv").write_text("chip,label\nnot_there.tif,forest\n")
    with pytest.raises(FileNotFoundError, match="labels.csv line 2: chip .*not_there.tif does not exist"):
        ChipFolderReader(str(tmp_path)).rows()
    # a label outside the configured classes
    with pytest.raises(ValueError, match=r"labels.csv line \d+: label.*'forest'.*not among class names"):
        ChipFolderReader(str(chip_folder), class_names=["open", "water"]).rows()
    # bad split name
    (tmp_path / "labels.csv").write_text("chip,label,split\na.tif,forest,training\n")
    with pytest.raises(ValueError, match="line 2: split must be"):
        ChipFolderReader(str(tmp_path)).rows()
    with pytest.raises(FileNotFoundError, match="labels file .*nope.csv not found"):
        ChipFolderReader(str(tmp_path), labels_csv="nope.csv").rows()


# --------------------------------------------------------------------------------------------------
# GEO-Bench: samples written in its layout, with pickles that reference its classes (a stand-in module
# named `geobench` exists only while writing; the reader must not need it)


def _geobench_module():
    dataset = types.ModuleType("geobench.dataset")
    label = types.ModuleType("geobench.label")
    task = types.ModuleType("geobench.task")

    class BandInfo:
        def __init__(self, name, alt_names=(), spatial_resolution=None, wavelength=None):
            self.name, self.alt_names, self.spatial_resolution, self.wavelength = name, alt_names, spatial_resolution, wavelength

    class Sentinel2(BandInfo):
        pass

    class Classification:
        def __init__(self, n_classes, class_names=None):
            self.n_classes, self.class_names = n_classes, class_names

    class MultiLabelClassification(Classification):
        pass

    class TaskSpecifications:
        def __init__(self, dataset_name, bands_info, label_type, patch_size):
            self.dataset_name, self.bands_info, self.label_type, self.patch_size = dataset_name, bands_info, label_type, patch_size

    for mod, classes in ((dataset, [BandInfo, Sentinel2]), (label, [Classification, MultiLabelClassification]),
                         (task, [TaskSpecifications])):
        for c in classes:
            c.__module__ = mod.__name__
            c.__qualname__ = c.__name__
            setattr(mod, c.__name__, c)
    root = types.ModuleType("geobench")
    root.dataset, root.label, root.task = dataset, label, task
    return {"geobench": root, "geobench.dataset": dataset, "geobench.label": label, "geobench.task": task}


GEOBENCH_S2 = ["01 - Coastal aerosol", "02 - Blue", "03 - Green", "04 - Red", "05 - Vegetation Red Edge",
               "06 - Vegetation Red Edge", "07 - Vegetation Red Edge", "08 - NIR", "08A - Vegetation Red Edge",
               "09 - Water vapour", "10 - SWIR - Cirrus", "11 - SWIR", "12 - SWIR"]
OURS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", None, "B11", "B12"]


@pytest.fixture(scope="module")
def geobench_dir(ben, tmp_path_factory):
    import h5py

    _, s2_root, _ = ben
    root = tmp_path_factory.mktemp("geobench") / "classification_v1.0" / "m-mini"
    root.mkdir(parents=True)
    ben_reader = BigEarthNetReader(s2_root)
    mods = _geobench_module()
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        S2, Cls = mods["geobench.dataset"].Sentinel2, mods["geobench.label"].Classification
        bands_info = [S2(n, (), 10) for n in GEOBENCH_S2]
        spec = mods["geobench.task"].TaskSpecifications("m-mini", bands_info, Cls(2, ["open", "forest"]), (64, 64))
        (root / "task_specs.pkl").write_bytes(pickle.dumps(spec))
        names = []
        for i, row in enumerate(ben_reader.rows()):
            x, _, y = ben_reader.load(row)
            s2 = x["sentinel2_l2a"][:64, :64, 0]  # (64, 64, 12) ours
            name = f"id_{i:04d}"
            names.append(name)
            attr = {"bands_order": [], "label": int(y[ben_reader.info().class_names.index("Coniferous forest")]
                                                    if "Coniferous forest" in ben_reader.info().class_names else i % 2)}
            with h5py.File(root / f"{name}.hdf5", "w") as fp:
                for gname, ours, info in zip(GEOBENCH_S2, OURS, bands_info, strict=True):
                    if ours:
                        data = s2[:, :, get_modality("sentinel2_l2a").bands.index(ours)]
                    else:  # B10 (cirrus): in GEO-Bench's L1C-like sets, not in our L2A
                        data = np.full((64, 64), 7, np.float32)
                    fp.create_dataset(gname, data=data.astype(np.int16))
                    attr["bands_order"].append(gname)
                    attr[gname] = {"date": None, "date_id": None, "spatial_resolution": 10, "band_info": info,
                                   "meta_info": None, "transform": None, "crs": None}
                fp.attrs["pickle"] = str(pickle.dumps(attr))
        (root / "default_partition.json").write_text(json.dumps({"train": names[:4], "valid": [], "test": names[4:]}))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return root


def test_geobench_reader(geobench_dir, ben):
    assert "geobench" not in sys.modules
    reader = GeoBenchReader(str(geobench_dir))
    info = reader.info()
    assert info.name == "m-mini" and info.kind == "classification" and info.class_names == ["open", "forest"]
    rows = reader.rows()
    assert [r["split"] for r in rows] == ["train"] * 4 + ["test"] * 2
    x, months, y = reader.load(rows[0])
    s2 = x["sentinel2_l2a"]
    assert s2.shape == (64, 64, 1, 12) and months.tolist() == [6] and y.shape == ()
    # bands land in our order (B10, absent from L2A, is dropped): compare with the source pixels
    _, s2_root, _ = ben
    src = BigEarthNetReader(s2_root)
    ref = src.load(src.rows()[0])[0]["sentinel2_l2a"][:64, :64]
    np.testing.assert_array_equal(s2, ref.astype(np.int16).astype(np.float32))


def test_geobench_errors(geobench_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="task_specs.pkl not found"):
        GeoBenchReader(str(tmp_path)).info()
    (tmp_path / "default_partition.json").write_text(json.dumps({"train": ["gone"], "test": []}))
    with pytest.raises(FileNotFoundError, match="lists sample 'gone' but .*gone.hdf5 does not exist"):
        GeoBenchReader(str(tmp_path)).rows()


def test_geobench_pickles_never_run_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/geobench_pwned",))

    obj = _safe_loads(pickle.dumps({"x": Evil()}))
    assert not os.path.exists("/tmp/geobench_pwned")
    assert type(obj["x"]).__name__ == "system"


def test_eval_synth_yaml_is_the_task_the_in_loop_probe_scores():
    """configs/eval_synth.yaml and pretraining's in-loop probe (pipelines/evaluation/hook.py make_probe) share one task
    definition, EUROSAT_LIKE; the YAML cannot import it, so it is checked here."""
    import yaml

    from pipelines.evaluation.synth_task import EUROSAT_LIKE
    from pipelines.pretrain.config import TrainSection

    dataset = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "eval_synth.yaml")))["dataset"]
    for key, value in EUROSAT_LIKE.items():
        want = list(value) if isinstance(value, tuple) else value  # YAML gives lists
        assert dataset[key] == want, (key, dataset[key], want)
    train = TrainSection()
    assert (train.probe_chip_size, train.probe_max_timesteps) == (EUROSAT_LIKE["chip_size"], EUROSAT_LIKE["max_timesteps"])
