"""Hardening of the corpus build: precise reject reasons, read errors retried then `unreadable` (and retried
by the next run), `--retry_rejects`, second spellings of one file reported, unreadable done markers rebuilt,
an empty raw URI refused, headers checked before pixels are decoded."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tracemalloc

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from olmoearth.modalities import MODALITIES
from pipelines.common.storage import Storage, join
from pipelines.corpus import raw_layout as rl
from pipelines.corpus.build import BuildConfig, EmptyCorpusError, _read_markers, build_corpus
from pipelines.corpus.plan import parts_to_build
from pipelines.corpus.validate import RejectError, load_bandsets
from pipelines.imagery.geotiff import geotiff_bytes

EPSG = 32618
S1 = MODALITIES["sentinel1"].raw_folder
D0 = dt.date(2021, 5, 1)


def _s1(col: int, row: int = -1000, size: int = 256) -> bytes:
    """A one-timestep Sentinel-1 file (linear power) of cell (col, row)."""
    rng = np.random.default_rng(col)
    a = (10 ** (rng.normal(-12, 2, (2, size, size)) / 10)).astype(np.float32)
    return geotiff_bytes(a, EPSG, rl.cell_transform(col, row, 2560 / size), -32768.0)


def _raw(root: str, cols, periods=None) -> None:
    """A local raw corpus of one-file Sentinel-1 samples and their timestep CSV (periods: col -> [dates])."""
    storage, rows = Storage(), []
    for c in cols:
        storage.write_bytes(join(root, S1, rl.file_name(EPSG, c, -1000, 10)), _s1(c))
        starts = (periods or {}).get(c, [D0])
        rows += [(rl.sample_id(EPSG, c, -1000), t, s, s + dt.timedelta(days=30)) for t, s in enumerate(starts)]
    storage.write_text(rl.csv_uri(root, "sentinel1"), rl.write_timesteps_csv(rows))


def _one_part(tmp_path, cols):
    """The raw corpus of `cols`, routed and planned as one part -> (BuildConfig, Ray Data item)."""
    from pipelines.corpus.timesteps import route_timesteps

    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    _raw(raw, cols)
    size = os.path.getsize(rl.csv_uri(raw, "sentinel1"))
    r = route_timesteps(rl.csv_uri(raw, "sentinel1"), "sentinel1", 0, size, rl.TIMESTEP_FIELDS, 0, 1, out)
    samples = [{"sample_id": rl.sample_id(EPSG, c, -1000),
                "files": {"sentinel1": [join(raw, S1, rl.file_name(EPSG, c, -1000, 10))]}} for c in cols]  # fmt: skip
    spec = {"part": 0, "samples": samples, "timesteps": {"sentinel1": [[r["uri"], *r["ranges"][0]]]}}
    return BuildConfig(raw_uri=raw, out_uri=out), {"spec": json.dumps(spec)}


def test_a_timeline_of_more_than_12_periods_is_a_timeline_reject(tmp_path):
    sid = rl.sample_id(EPSG, 3, -1000)
    uri = str(tmp_path / S1 / rl.file_name(EPSG, 3, -1000, 10))
    far = [(0, D0, D0), (1, D0 + dt.timedelta(days=400), D0 + dt.timedelta(days=430))]
    with pytest.raises(RejectError) as e:
        load_bandsets(sid, {"sentinel1": [uri]}, {"sentinel1": far}, Storage())
    assert e.value.reason == "timeline" and e.value.file == uri and "at most 12" in e.value.detail


def test_read_errors_are_retried_then_unreadable_and_retried_by_the_next_run(tmp_path, monkeypatch):
    """A read that fails twice succeeds on its retry; one that keeps failing is filed as `unreadable` (not
    `corrupt`), and the next run builds that part again and writes the sample."""
    from pipelines.corpus import part as part_mod

    cfg, item = _one_part(tmp_path, [30, 31])
    flaky, dead = (join(cfg.raw_uri, S1, rl.file_name(EPSG, c, -1000, 10)) for c in (30, 31))
    failures = {flaky: 2, dead: 10**6}
    real = LocalFileSystem.cat_file

    def cat_file(self, path, *a, **k):
        for uri, left in failures.items():
            if path.endswith(os.path.basename(uri)) and left > 0:
                failures[uri] -= 1
                raise ConnectionResetError(f"connection reset reading {path}")
        return real(self, path, *a, **k)

    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)
    monkeypatch.setattr(part_mod, "RETRY_WAIT_S", 0.001)
    got = part_mod.build_part(item, cfg)
    assert got["rows"] == 1 and got["rejected"] == 1 and failures[flaky] == 0
    marker = json.loads(open(join(cfg.out_uri, "_done", "part-000000.json")).read())
    assert marker["sample_ids"] == [rl.sample_id(EPSG, 30, -1000)]
    (reject,) = marker["rejects"]
    assert reject["reason"] == "unreadable" and reject["file"] == dead and "ConnectionResetError" in reject["detail"]
    listed = {0: [rl.sample_id(EPSG, c, -1000) for c in (30, 31)]}
    assert parts_to_build(listed, {0: marker}) == [0]  # an unreadable sample is looked at again
    failures[dead] = 0  # the outage is over
    assert part_mod.build_part(item, cfg)["rows"] == 2
    marker = json.loads(open(join(cfg.out_uri, "_done", "part-000000.json")).read())
    assert parts_to_build(listed, {0: marker}) == []


def test_retry_rejects_reexamines_data_rejects():
    listed = {0: ["a", "b"], 1: ["c"]}
    markers = {0: {"sample_ids": ["a"], "rejects": [{"sample_id": "b", "reason": "corrupt"}]},
               1: {"sample_ids": ["c"], "rejects": []}}  # fmt: skip
    assert parts_to_build(listed, markers) == []
    assert parts_to_build(listed, markers, retry_rejects=True) == [0]


def test_second_spellings_of_a_file_are_reported_not_collapsed(tmp_path):
    root = str(tmp_path / "raw")
    canonical = join(root, S1, rl.file_name(EPSG, 903, -1000, 10))
    others = [join(root, S1, f"EPSG:{EPSG}_903_-1000_10.0.tif"), join(root, S1, f"EPSG:{EPSG}_0903_-1000_10.tif")]
    for uri in [canonical, *others, join(root, S1, rl.file_name(EPSG, 904, -1000, 10))]:
        Storage().write_bytes(uri, b"x")
    listing = rl.list_raw(root, Storage())
    assert listing.samples[rl.sample_id(EPSG, 903, -1000)] == {"sentinel1": [canonical]}
    assert sorted(u for _, u, _ in listing.duplicates) == sorted(others)
    assert all(kept == canonical and sid == rl.sample_id(EPSG, 903, -1000) for sid, _, kept in listing.duplicates)
    assert listing.files_found == 4 == listing.files_used + len(listing.duplicates) + len(listing.bad_names)
    with pytest.raises(ValueError, match="the same sample and bandset as"):
        rl.list_samples(root, Storage())


def test_an_unreadable_done_marker_counts_as_not_done(tmp_path, caplog):
    done = str(tmp_path / "_done")
    good = {"part": 0, "sample_ids": ["a"], "rejects": [], "rows": 1, "stats": []}
    Storage().write_text(join(done, "part-000000.json"), json.dumps(good))
    Storage().write_text(join(done, "part-000001.json"), json.dumps(dict(good, part=1))[:25])  # truncated
    with caplog.at_level(logging.WARNING):
        markers = _read_markers(Storage(), done)
    assert list(markers) == [0]
    assert "part-000001.json" in caplog.text and "built again" in caplog.text
    assert list(_read_markers(Storage(), done, [0, 1, 2])) == [0]  # 2: none written yet


def test_an_empty_or_mistyped_raw_uri_fails_and_saves_no_plan(tmp_path, monkeypatch, capsys):
    from ray_jobs import build_corpus as job

    out = str(tmp_path / "out")
    os.makedirs(tmp_path / "empty" / S1)
    for raw in (str(tmp_path / "empty"), str(tmp_path / "typo")):
        with pytest.raises(EmptyCorpusError, match="no raw corpus sample under"):
            build_corpus(BuildConfig(raw_uri=raw, out_uri=out))
    assert not os.path.exists(join(out, "plan.json"))
    monkeypatch.setattr(job, "init_ray", lambda: None)
    assert job.main(["--raw_uri", str(tmp_path / "typo"), "--out_uri", out]) == 2
    assert "no raw corpus sample under" in capsys.readouterr().err
    assert not os.path.exists(join(out, "plan.json"))


def test_a_wrong_sized_file_is_rejected_from_its_header_without_decoding(tmp_path):
    """A 4096 x 4096 Sentinel-1 file (128 MiB of float32 pixels once decoded) is rejected as `wrong_size`
    while the process allocates less than a tenth of that."""
    uri = str(tmp_path / S1 / rl.file_name(EPSG, 5, -1000, 10))
    big = np.full((2, 4096, 4096), 0.01, np.float32)
    Storage().write_bytes(uri, geotiff_bytes(big, EPSG, rl.cell_transform(5, -1000), -32768.0))
    del big
    sid = rl.sample_id(EPSG, 5, -1000)
    tracemalloc.start()
    try:
        with pytest.raises(RejectError) as e:
            load_bandsets(sid, {"sentinel1": [uri]}, {"sentinel1": [(0, D0, D0)]}, Storage())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.reason == "wrong_size" and "4096x4096" in e.value.detail
    assert peak < 12 * 2**20, peak


def test_build_reports_duplicates_and_timelines_retries_rejects_and_rebuilds_a_bad_marker(ray_cluster, tmp_path):
    """End to end on the session's Ray cluster (local paths): counts add up with a duplicate file and a
    `timeline` reject; a truncated done marker is rebuilt (not a JSONDecodeError); --retry_rejects rebuilds
    the parts holding rejects."""
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    far = [D0, D0 + dt.timedelta(days=400)]
    _raw(raw, [40, 41, 42, 43], periods={43: far})
    Storage().write_bytes(join(raw, S1, f"EPSG:{EPSG}_40_-1000_10.0.tif"), _s1(40))
    cfg = BuildConfig(raw_uri=raw, out_uri=out, samples_per_shard=2, seed=2)
    first = build_corpus(cfg)
    assert first["samples_found"] == 4 and first["samples_written"] == 3 and first["samples_rejected"] == 1
    assert first["rejected_by_reason"] == {"timeline": 1, "duplicate_file": 1}
    assert first["files_duplicate"] == 1 and first["files_found"] == 5 == first["files_used"] + 1
    rejects = [json.loads(line) for line in open(join(out, "rejects.jsonl"))]
    assert {r["reason"]: r["file"] for r in rejects}["duplicate_file"].endswith("_40_-1000_10.0.tif")
    markers = sorted(os.listdir(join(out, "_done")))
    with open(join(out, "_done", markers[0]), "r+") as fh:  # a marker cut short by a crash
        fh.truncate(20)
    again = build_corpus(cfg)
    assert again["parts_this_run"] == 1 and again["samples_written"] == 3 and again["samples_rejected"] == 1
    with_rejects = {json.loads(open(join(out, "_done", m)).read())["part"] for m in markers
                    if json.loads(open(join(out, "_done", m)).read())["rejects"]}  # fmt: skip
    retried = build_corpus(BuildConfig(**{**cfg.__dict__, "retry_rejects": True}))
    assert retried["parts_this_run"] == len(with_rejects) == 1 and retried["samples_rejected"] == 1
