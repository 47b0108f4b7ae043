"""Build job and training stream end to end on the real SeaweedFS server and the session's Ray cluster:
every reject reason, counts conservation, idempotent/resumable rerun, statistics, shuffle, token budget,
maps never encoded, resume by skip_batches."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

import numpy as np
import pytest

from olmoearth.layout import ENCODER, MISSING
from olmoearth.modalities import MAP_MODALITIES, MODALITIES
from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.build import BuildConfig, build_corpus, format_summary
from pipelines.corpus.shards import load_manifest, load_norm_stats, read_cell
from pipelines.corpus.stored import grid_crop
from pipelines.corpus.synth import SynthConfig, write_corpus
from pipelines.imagery.geotiff import geotiff_bytes
from pipelines.pretrain.stream import (
    StreamConfig,
    check_batch,
    epoch_plan,
    iter_training_batches,
    training_dataset,
)  # fmt: skip

N_GOOD = 3
EPSG = 32618


def _s1_sample(col, row, *, bands=2, size=256, epsg=EPSG, transform=None, dtype=np.float32, fill=None):
    """A minimal one-timestep Sentinel-1 file (linear power) and its SRTM map, optionally broken."""
    rng = np.random.default_rng(col)
    a = (10 ** (rng.normal(-12, 2, (bands, size, size)) / 10)).astype(dtype)
    if fill is not None:
        a[:] = fill
    tr = transform or rl.cell_transform(col, row, 10 * 256 / size if size != 256 else 10)
    return geotiff_bytes(a, epsg, tr, -32768.0)


@pytest.fixture(scope="module")
def corpus(s3_server, ray_cluster):
    """A raw corpus with N_GOOD synthetic samples plus one broken sample per reject reason, built once."""
    import uuid

    storage = Storage(s3_server.endpoint)
    bucket = f"s3://corpus-{uuid.uuid4().hex[:8]}"
    storage.makedirs(bucket)
    raw, out = join(bucket, "raw"), join(bucket, "shards")
    summary = write_corpus(SynthConfig(num_samples=N_GOOD, seed=3, timesteps=2), raw, storage)
    s1 = MODALITIES["sentinel1"].raw_folder
    s2 = MODALITIES["sentinel2_l2a"].raw_folder

    def put(folder, col, row, data, res=10):
        uri = join(raw, folder, rl.file_name(EPSG, col, row, res))
        storage.write_bytes(uri, data)
        return uri

    expected = {}  # sample id -> (reason, file)
    good_file = _s1_sample(900, -1000)
    expected["corrupt"] = put(s1, 900, -1000, good_file[: len(good_file) // 3])
    expected["wrong_crs"] = put(s1, 901, -1000, _s1_sample(901, -1000, epsg=32619))
    expected["wrong_size"] = put(s1, 902, -1000, _s1_sample(902, -1000, size=128))
    expected["missing_bands"] = put(s1, 903, -1000, _s1_sample(903, -1000, bands=1))
    expected["all_nodata"] = put(s1, 904, -1000, _s1_sample(904, -1000, fill=-32768.0))
    expected["wrong_transform"] = put(
        s1, 905, -1000, _s1_sample(905, -1000, transform=rl.cell_transform(906, -1000))
    )
    expected["wrong_dtype"] = put(s1, 906, -1000, _s1_sample(906, -1000, dtype=np.int16))
    expected["no_spacetime_modality"] = put(MODALITIES["srtm"].raw_folder, 907, -1000,
                                            geotiff_bytes(np.ones((1, 256, 256), np.int16), EPSG, rl.cell_transform(907, -1000), -32768))  # fmt: skip
    expected["missing_timesteps"] = put(s2, 908, -1000, geotiff_bytes(np.ones((4, 256, 256), np.uint16), EPSG,
                                                                       rl.cell_transform(908, -1000), 0))  # fmt: skip
    bad_name = join(raw, s1, "EPSG:32618_oops.tif")
    storage.write_bytes(bad_name, b"not a tiff")
    # timestep rows for the broken S1 samples (not for 908: its S2 file has none)
    csv_uri = rl.csv_uri(raw, "sentinel1")
    d = dt.date(2021, 5, 1)
    rows = [(rl.sample_id(EPSG, c, -1000), 0, d, d + dt.timedelta(days=30)) for c in range(900, 907)]
    text = storage.read_text(csv_uri) + rl.write_timesteps_csv(rows).split("\n", 1)[1]
    storage.write_text(csv_uri, text)

    # tiny timestep chunks: the CSVs are routed by several Ray tasks whose ranges split lines arbitrarily
    cfg = BuildConfig(raw_uri=raw, out_uri=out, samples_per_shard=4, seed=1,
                      timesteps_chunk_mb=300 / 2**20)  # fmt: skip
    first = _build_without_driver_csv(cfg, storage)
    return {"storage": storage, "raw": raw, "out": out, "cfg": cfg, "first": first, "expected": expected,
            "bad_name": bad_name, "good": summary["sample_ids"]}  # fmt: skip


def test_build_counts_and_every_reject_reason(corpus):
    s, storage, out = corpus["first"], corpus["storage"], corpus["out"]
    n_bad = len(corpus["expected"])
    assert s["samples_found"] == N_GOOD + n_bad
    assert s["samples_written"] == N_GOOD and s["samples_rejected"] == n_bad
    assert s["samples_written"] + s["samples_rejected"] == s["samples_found"]
    rejects = [json.loads(line) for line in storage.read_text(join(out, "rejects.jsonl")).splitlines()]
    by_reason = {r["reason"]: r for r in rejects}
    for reason, uri in corpus["expected"].items():
        assert reason in by_reason, (reason, rejects)
        assert by_reason[reason]["file"] == uri, (reason, by_reason[reason])
    assert by_reason["bad_name"]["file"] == corpus["bad_name"] and s["files_bad_name"] == 1
    text = format_summary(s)  # what `olmoearth build-corpus` prints at the end
    assert f"written {N_GOOD}, rejected {n_bad}" in text and "wrong_crs 1" in text and "samples/s" in text
    manifest = load_manifest(out, storage)
    assert sum(sh["rows"] for sh in manifest["shards"]) == N_GOOD
    # every good sample id is in exactly one shard, with its data
    import pyarrow.parquet as pq

    ids = []
    for sh in manifest["shards"]:
        fs, path = storage.pyarrow_fs(join(out, sh["path"]))
        f = pq.ParquetFile(fs.open_input_file(path))
        assert f.metadata.num_row_groups == sh["rows"]  # one row group per sample
        ids += f.read(columns=["sample_id"]).column("sample_id").to_pylist()
        months, cell = read_cell(f, 0, ["sentinel2_l2a"])
        if cell["sentinel2_l2a"] is not None:
            a = grid_crop("sentinel2_l2a", cell["sentinel2_l2a"])
            assert a.shape == (256, 256, len(months), 12) and np.isfinite(a).any()
    assert sorted(ids) == sorted(corpus["good"])


def _build_without_driver_csv(cfg, storage):
    """build_corpus with the driver forbidden to parse a timestep CSV (the part tasks get their rows)."""
    saved = rl.read_timesteps, rl.parse_timesteps_csv

    def forbidden(*a, **k):
        raise AssertionError("the driver parsed a timestep CSV")

    rl.read_timesteps = rl.parse_timesteps_csv = forbidden
    try:
        return build_corpus(cfg, storage)
    finally:
        rl.read_timesteps, rl.parse_timesteps_csv = saved


def test_shards_hold_what_the_reader_reads(corpus):
    """A shard's stored bandsets, gridded (whole or cropped at any offset), equal read_sample of the raw files:
    20/40 m repeated onto 10 m, OSM strided, missing months NaN, nodata NaN, S1 in dB (float16 in the shard)."""
    import pyarrow.parquet as pq

    from pipelines.corpus.sample import read_sample
    from pipelines.corpus.stored import cut_stored

    storage, out, raw = corpus["storage"], corpus["out"], corpus["raw"]
    sh = load_manifest(out, storage)["shards"][0]
    fs, path = storage.pyarrow_fs(join(out, sh["path"]))
    f = pq.ParquetFile(fs.open_input_file(path))
    sid = f.read_row_group(0, columns=["sample_id"]).column("sample_id")[0].as_py()
    months, cell = read_cell(f, 0, list(MODALITIES))
    x, want_months, _ = read_sample(raw, sid, storage)
    assert months.tolist() == want_months.tolist()
    assert {m for m, c in cell.items() if c is not None} == set(x)
    for m, arrays in cell.items():
        if arrays is None:
            continue
        got = grid_crop(m, arrays)
        tol = 0.02 if m == "sentinel1" else 0  # float16 dB
        np.testing.assert_allclose(got, x[m], atol=tol, rtol=1e-3 if tol else 0, equal_nan=True, err_msg=m)
        for y0, x0, side in [(3, 5, 24), (101, 250 - 37, 37), (0, 0, 256)]:
            cut, dy, dx = cut_stored(m, arrays, y0, x0, side)
            assert np.array_equal(grid_crop(m, cut, dy, dx, side), got[y0 : y0 + side, x0 : x0 + side],
                                  equal_nan=True), (m, y0, x0)  # fmt: skip


def test_timestep_routing_splits_lines_exactly(tmp_path):
    """Routing a CSV in byte ranges of any size puts every row in exactly one range, under its sample's part,
    and a malformed line is reported with the file and its byte offset."""
    from pipelines.corpus.plan import part_of
    from pipelines.corpus.raw_layout import TIMESTEP_FIELDS
    from pipelines.corpus.timesteps import csv_chunks, read_part_timesteps, route_timesteps

    d = dt.date(2020, 1, 1)
    rows = [(rl.sample_id(EPSG, c, -7), t, d + dt.timedelta(days=30 * t), d + dt.timedelta(days=30 * t + 29))
            for c in range(40) for t in range(3)]  # fmt: skip
    csv_path = str(tmp_path / "10_sentinel1_monthly.csv")
    text = rl.write_timesteps_csv(rows)
    open(csv_path, "w").write(text)
    want = rl.parse_timesteps_csv(text)
    num_parts = 5
    for chunk in (7, 64, 1000, len(text)):
        out = str(tmp_path / f"out{chunk}")
        routed = [route_timesteps(csv_path, "sentinel1", a, b, TIMESTEP_FIELDS, 3, num_parts, out)
                  for a, b in csv_chunks(len(text), chunk)]  # fmt: skip
        got = {}
        for p in range(num_parts):
            ranges = [[r["uri"], *r["ranges"][p]] for r in routed if p in r["ranges"]]
            per = read_part_timesteps(Storage().fs(out), {"sentinel1": ranges}).get("sentinel1", {})
            assert all(part_of(sid, 3, num_parts) == p for sid in per)
            assert not set(per) & set(got)
            got.update(per)
        assert got == want, chunk
    bad = text.replace("2020-03-01", "2020-13-01", 1)
    open(csv_path, "w").write(bad)
    offset = bad.rfind("\n", 0, bad.index("2020-13-01")) + 1  # where the bad line starts
    with pytest.raises(ValueError, match=f"10_sentinel1_monthly.csv: line at byte {offset}"):
        route_timesteps(
            csv_path, "sentinel1", 0, len(bad), TIMESTEP_FIELDS, 3, num_parts, str(tmp_path / "o")
        )


def _local_part(tmp_path, cols):
    """A local raw corpus of one-timestep Sentinel-1 samples, planned as one part -> (BuildConfig, item)."""
    from pipelines.corpus.timesteps import route_timesteps

    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    s1 = MODALITIES["sentinel1"].raw_folder
    storage, d = Storage(), dt.date(2021, 5, 1)
    for c in cols:
        storage.write_bytes(join(raw, s1, rl.file_name(EPSG, c, -1000, 10)), _s1_sample(c, -1000))
    text = rl.write_timesteps_csv(
        [(rl.sample_id(EPSG, c, -1000), 0, d, d + dt.timedelta(days=30)) for c in cols]
    )
    storage.write_text(rl.csv_uri(raw, "sentinel1"), text)
    r = route_timesteps(
        rl.csv_uri(raw, "sentinel1"), "sentinel1", 0, len(text), rl.TIMESTEP_FIELDS, 0, 1, out
    )
    samples = [{"sample_id": rl.sample_id(EPSG, c, -1000),
                "files": {"sentinel1": [join(raw, s1, rl.file_name(EPSG, c, -1000, 10))]}} for c in cols]  # fmt: skip
    spec = {"part": 0, "samples": samples, "timesteps": {"sentinel1": [[r["uri"], *r["ranges"][0]]]}}
    return BuildConfig(raw_uri=raw, out_uri=out), {"spec": json.dumps(spec)}, samples


def test_a_part_rejects_bad_data_but_fails_on_a_bug(tmp_path, monkeypatch):
    """build_part files a corrupt file as a reject and writes the rest; an exception that is not about the
    data (a bug) fails the part instead of becoming a "corrupt" sample, and leaves no shard behind."""
    from pipelines.corpus import part as part_mod

    cfg, item, samples = _local_part(tmp_path, [20, 21])
    bad = samples[1]["files"]["sentinel1"][0]
    open(bad, "wb").write(open(bad, "rb").read()[:500])
    got = part_mod.build_part(item, cfg)
    assert got["rows"] == 1 and got["rejected"] == 1
    marker = json.loads(open(join(cfg.out_uri, "_done", "part-000000.json")).read())
    assert marker["rejects"][0]["reason"] == "corrupt" and marker["rejects"][0]["file"] == bad

    cfg, item, _ = _local_part(tmp_path / "bug", [22])

    def broken(*a, **k):
        raise TypeError("a bug")

    monkeypatch.setattr(part_mod, "stats_vector", broken)
    with pytest.raises(TypeError, match="a bug"):
        part_mod.build_part(item, cfg)
    import os

    assert not os.path.exists(join(cfg.out_uri, "shards")) or not os.listdir(join(cfg.out_uri, "shards"))
    assert not os.path.exists(join(cfg.out_uri, "_done"))


def test_stream_refuses_an_old_shard_format(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": []}))
    with pytest.raises(ValueError, match="manifest.json: shard format 1.*rebuild"):
        load_manifest(str(tmp_path), Storage())


def test_new_samples_rebuild_only_their_part(s3_server, ray_cluster):
    """Samples added to the raw corpus after a build join their (hash) part; a rerun rebuilds only that part,
    and a removed sample stays in its finished shard; counts add up throughout."""
    import uuid

    storage = Storage(s3_server.endpoint)
    bucket = f"s3://grow-{uuid.uuid4().hex[:8]}"
    storage.makedirs(bucket)
    raw, out = join(bucket, "raw"), join(bucket, "shards")
    s1 = MODALITIES["sentinel1"].raw_folder
    d = dt.date(2021, 5, 1)

    def add(cols):
        for c in cols:
            storage.write_bytes(join(raw, s1, rl.file_name(EPSG, c, -1000, 10)), _s1_sample(c, -1000))
        rows = [(rl.sample_id(EPSG, c, -1000), 0, d, d + dt.timedelta(days=30)) for c in cols]
        old = (
            storage.read_text(rl.csv_uri(raw, "sentinel1"))
            if storage.exists(rl.csv_uri(raw, "sentinel1"))
            else ""
        )
        new = rl.write_timesteps_csv(rows)
        storage.write_text(rl.csv_uri(raw, "sentinel1"), old + new.split("\n", 1)[1] if old else new)

    add(range(10, 16))
    cfg = BuildConfig(raw_uri=raw, out_uri=out, samples_per_shard=2, seed=4)
    first = build_corpus(cfg, storage)
    assert first["samples_written"] == 6 and first["parts_this_run"] == first["num_shards"] <= 3
    add([16])
    grown = build_corpus(cfg, storage)
    assert grown["parts_this_run"] == 1 and grown["samples_this_run"] >= 1
    assert grown["samples_written"] == 7 and grown["samples_rejected"] == 0
    storage.fs(raw).rm(join(raw, s1, rl.file_name(EPSG, 10, -1000, 10)))
    again = build_corpus(cfg, storage)
    assert again["parts_this_run"] == 0 and again["samples_written"] == 7 and again["samples_found"] == 6
    with pytest.raises(ValueError, match="seed 4, not 5"):
        build_corpus(BuildConfig(raw_uri=raw, out_uri=out, seed=5), storage)


def test_rerun_is_idempotent_and_resumes(corpus):
    storage, out, cfg = corpus["storage"], corpus["out"], corpus["cfg"]
    again = build_corpus(cfg, storage)
    assert again["parts_this_run"] == 0 and again["samples_written"] == N_GOOD
    assert again["samples_rejected"] == corpus["first"]["samples_rejected"]
    # a crash lost one part's output: only that part is redone, the counts still add up
    manifest = load_manifest(out, storage)
    victim = manifest["shards"][0]["path"]
    part = int(victim.split("-")[1][:6])
    fs = storage.fs(out)
    fs.rm(join(out, "_done", f"part-{part:06d}.json"))
    fs.rm(join(out, victim))
    resumed = build_corpus(cfg, storage)
    assert resumed["parts_this_run"] == 1
    assert resumed["samples_written"] == N_GOOD
    assert resumed["samples_written"] + resumed["samples_rejected"] == resumed["samples_found"]


def test_norm_stats_from_the_build(corpus):
    storage, out = corpus["storage"], corpus["out"]
    stats = json.loads(storage.read_text(join(out, "norm_stats.json")))
    norm = load_norm_stats(out, storage)
    assert set(MODALITIES) <= set(stats)
    b04 = stats["sentinel2_l2a"]["B04"]
    assert b04["count"] > 0 and 200 < b04["mean"] < 6000 and b04["std"] > 50
    assert "min" in stats["openstreetmap_raster"]["building"] and "mean" in stats["srtm"]["srtm"]
    assert -30 < stats["sentinel1"]["vv"]["mean"] < 0  # dB
    i = MODALITIES["sentinel2_l2a"].bands.index("B04")
    assert norm.lo["sentinel2_l2a"][i] == pytest.approx(b04["mean"] - 2 * b04["std"], rel=1e-5)


def _rows(ds):
    return list(ds.iter_rows())


def test_stream_shuffle_budget_and_masks(corpus):
    storage, out = corpus["storage"], corpus["out"]
    cfg = StreamConfig(shards_uri=out, batch_size=4, local_shuffle_buffer=8, seed=7)
    e0 = _rows(training_dataset(cfg, storage, epoch=0))
    e0b = _rows(training_dataset(cfg, storage, epoch=0))
    e1 = _rows(training_dataset(cfg, storage, epoch=1))
    keys = lambda rows: [tuple(k) for r in rows for k in json.loads(r["samples"])]  # noqa: E731
    assert keys(e0) == keys(e0b) and [r["batch"] for r in e0] == [r["batch"] for r in e0b]  # replayable
    assert keys(e0) != keys(e1)  # a fresh order every epoch
    assert Counter(keys(e0)) == Counter(keys(e1))  # the same multiset
    assert len(keys(e0)) == 4 * N_GOOD  # four 128 x 128 samples per cell, none lost
    assert [r["index"] for r in e0] == list(range(len(e0)))

    import pickle

    patch_sizes = set()
    for r in e0 + e1:
        b = pickle.loads(r["batch"])
        check_batch(b, cfg)  # layout shapes, token budget, maps never ENCODER
        patch_sizes.add(b["patch_size"])
        n_tokens = sum(int(np.prod(b["mask_a"][m].shape[1:])) for m in cfg.modalities)
        assert n_tokens <= cfg.token_budget
        for m in MAP_MODALITIES:
            assert not (b["mask_a"][m] == ENCODER).any() and not (b["mask_b"][m] == ENCODER).any()
        enc = sum(int((b["mask_a"][m] == ENCODER).sum()) for m in cfg.modalities)
        assert enc > 0
        assert not np.array_equal(b["mask_a"]["sentinel2_l2a"], b["mask_b"]["sentinel2_l2a"]) or \
            (b["mask_a"]["sentinel2_l2a"] == MISSING).all()  # fmt: skip
        for m in cfg.modalities:
            assert np.isfinite(b["x"][m]).all()
    assert len(patch_sizes) > 1

    # resume: skipping k batches replays the rest exactly
    rest = _rows(training_dataset(cfg, storage, epoch=0, skip_batches=2))
    assert [r["batch"] for r in rest] == [r["batch"] for r in e0[2:]]

    # full shuffle: same multiset, different order
    full = StreamConfig(shards_uri=out, batch_size=4, local_shuffle_buffer=8, seed=7, shuffle="full")
    ef = _rows(training_dataset(full, storage, epoch=0))
    assert Counter(keys(ef)) == Counter(keys(e0))


def test_iter_training_batches_torch_and_split(corpus):
    import torch

    storage, out = corpus["storage"], corpus["out"]
    cfg = StreamConfig(shards_uri=out, batch_size=3, local_shuffle_buffer=6, seed=1,
                       modalities=["sentinel2_l2a", "sentinel1", "worldcover"])  # fmt: skip
    expected = sum(w["num_batches"] for w in epoch_plan(cfg, storage, 0))
    ds = training_dataset(cfg, storage, epoch=0)
    seen = 0
    for b in iter_training_batches(ds, cfg):
        assert set(b) == {"x", "months", "patch_size", "mask_a", "mask_b"}
        assert set(b["x"]) == set(cfg.modalities)
        assert b["x"]["sentinel2_l2a"].dtype == torch.float32 and b["mask_a"]["sentinel1"].dtype == torch.int8
        assert b["months"].dtype == torch.int64 and int(b["months"].max()) < 12
        seen += 1
    assert seen == expected
    # two-way streaming_split (what get_dataset_shard uses) may drop at most one whole batch
    a, b = training_dataset(cfg, storage, epoch=0).streaming_split(2, equal=True)
    import threading

    counts = [0, 0]

    def run(i, it):
        counts[i] = sum(1 for _ in iter_training_batches(it, cfg))

    threads = [threading.Thread(target=run, args=(i, it)) for i, it in enumerate((a, b))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert expected - 1 <= sum(counts) <= expected
