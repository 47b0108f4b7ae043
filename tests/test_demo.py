"""The demo's own bookkeeping (the demo itself runs end to end in CI, `.ci/run`)."""

import os

from ray_jobs.demo import DemoConfig, _apply_fast, _clear_previous_results


def test_rerun_in_same_out_folder_clears_only_previous_results(tmp_path):
    # an earlier run left an area of another time range: the area job would refuse to mix its tiles
    (tmp_path / "area" / "tiles").mkdir(parents=True)
    (tmp_path / "area" / "manifest.json").write_text("{}")
    (tmp_path / "eval").mkdir()
    (tmp_path / "demo_results.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")  # not the demo's: kept
    _clear_previous_results(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    _clear_previous_results(str(tmp_path))  # nothing to clear: no error


def test_fast_mode_is_smaller_and_full_mode_untouched():
    full, fast = _apply_fast(DemoConfig()), _apply_fast(DemoConfig(fast=True))
    assert fast.raw_samples < full.raw_samples and fast.pretrain_steps < full.pretrain_steps
    assert fast.area_cells <= full.area_cells
    assert full.area_time == DemoConfig().area_time
