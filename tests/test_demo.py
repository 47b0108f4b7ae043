"""The demo's own bookkeeping (the demo itself runs end to end in CI, `.ci/run`)."""

import os

import pytest

from ray_jobs.demo import DemoConfig, _apply_fast, _clear_previous_results


def test_rerun_in_same_out_folder_clears_only_previous_results(tmp_path):
    # an earlier run left an area of another time range: the area job would refuse to mix its tiles
    (tmp_path / "area" / "tiles").mkdir(parents=True)
    (tmp_path / "area" / "manifest.json").write_text("{}")
    (tmp_path / "eval").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "seaweedfs").mkdir()  # S3 data a `--keep_data true` run left: the new run has a new bucket
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


def _fake_run(root):
    """A run folder as pretraining leaves it: two trials' checkpoints, metrics, loss curve; an encoder file."""
    import json

    from pipelines.pretrain.checkpoints import write_completeness

    run = root / "bucket" / "runs" / "demo-nano"
    for trial, step in (("TorchTrainer_a", 10), ("TorchTrainer_b", 20)):
        ck = run / trial / f"checkpoint_{step:06d}"
        (ck / "ds").mkdir(parents=True)
        (ck / "ds" / "shard.pt").write_bytes(b"x" * 100)
        (ck / "train_state.json").write_text(json.dumps({"step": step, "samples_seen": step * 4, "history": [1]}))
        write_completeness(str(ck), rank=0)  # what makes a checkpoint count as complete
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 2.5}\n{"step": 20, "loss": 1.25}\n')
    (run / "loss_curve.png").write_bytes(b"\x89PNG")
    model = root / "bucket" / "models" / "nano-demo.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights" * 1000)
    return str(run), str(model)


def test_results_outlive_the_bucket_and_every_printed_path_exists(tmp_path, capsys):
    import json
    import shutil

    from pipelines.common.storage import Storage
    from ray_jobs.demo import _collect, _report

    run_uri, encoder_uri = _fake_run(tmp_path)
    out = tmp_path / "demo_out"
    found = _collect(Storage(), run_uri, encoder_uri, str(out))
    shutil.rmtree(tmp_path / "bucket")  # the demo's S3 data goes when it ends
    assert open(found["encoder"], "rb").read() == b"weights" * 1000
    assert found["metrics"].startswith(str(out)) and open(found["metrics"]).read().count("\n") == 2
    summary = json.load(open(found["checkpoints"]))
    assert [c["step"] for c in summary["checkpoints"]] == [10, 20]
    last = summary["checkpoints"][-1]
    assert last["samples_seen"] == 80 and "history" not in last
    assert last["files"]["ds/shard.pt"] == 100 and "train_state.json" in last["files"]
    assert last["bytes"] == sum(last["files"].values())
    assert "step 20, loss 1.2500" in capsys.readouterr().out

    results = _report({**found, "eval": str(out / "run")}, {"a step": 1.0}, str(out), kept=True)
    printed = capsys.readouterr().out
    for path in results.values():
        assert path in printed and os.path.exists(path)
    assert f"local_s3 serve {out}/seaweedfs" in printed
    assert json.load(open(out / "demo_results.json"))["results"] == results
    with pytest.raises(RuntimeError, match="area"):  # a result that is not there is an error, not a dead path
        _report({**found, "area": str(out / "area")}, {}, str(out), kept=False)


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_by_default_and_everything_back_when_verbose(monkeypatch, verbose):
    import logging
    import warnings

    import ray.data

    from pipelines.common.logs import VERBOSE_ENV, quiet_driver, ray_init_options, serve_logging_config

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    if verbose:
        from ray_jobs.demo import run

        with pytest.raises(OSError):  # `--verbose true` sets the variable before anything starts
            run(DemoConfig(verbose=True, out="/proc/no-such-dir/x"))
        assert os.environ[VERBOSE_ENV] == "1"
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_operator_progress_bars", not verbose)
    monkeypatch.setattr(ctx, "print_on_execution_start", not verbose)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_driver()
        warnings.warn("`ray.train.RunConfig(verbose)` is deprecated", DeprecationWarning, stacklevel=1)
        warnings.warn("a warning of ours", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen][-1] == "a warning of ours"
    assert len(seen) == (2 if verbose else 1)  # the known noise only goes when quiet
    assert ctx.enable_operator_progress_bars is verbose and ctx.print_on_execution_start is verbose
    slow_tune = logging.getLogger("ray.tune.utils.util")  # Tune's "may be a performance bottleneck" lines
    assert slow_tune.isEnabledFor(logging.WARNING) is verbose and slow_tune.isEnabledFor(logging.ERROR)
    assert ray_init_options()["log_to_driver"] is verbose
    assert ray_init_options()["logging_level"] == (logging.INFO if verbose else logging.WARNING)
    cfg = serve_logging_config()
    assert cfg.enable_access_log is verbose and cfg.log_level == ("INFO" if verbose else "WARNING")
