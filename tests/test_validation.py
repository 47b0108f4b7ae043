"""The validation set of pretraining (issue 16): held-out shards that training never reads, batches drawn
once and the same at every evaluation and after a restart, a deterministic loss; the validation rows of a
real run (Ray Train + DeepSpeed) and the progress bar that shows them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipelines.pretrain.stream import StreamConfig, check_batch, epoch_plan, split_shards, to_torch
from pipelines.pretrain.validation import held_out_samples, validation_batches, validation_losses

T = 3


def write_tiny_corpus(root: str, shards: int = 3, rows: int = 2) -> str:
    """A corpus in the shard format (Sentinel-2 only, random reflectances), written without Ray."""
    from olmoearth.modalities import MODALITIES, NormStats
    from pipelines.corpus.raw_layout import cell_size, sample_id
    from pipelines.corpus.shards import (
        FORMAT_VERSION,
        MANIFEST_FILE,
        NORM_STATS_FILE,
        shard_path,
        shard_writer,
        write_sample,
    )
    from pipelines.corpus.stored import stored_resolution

    rng = np.random.default_rng(0)
    listed = []
    os.makedirs(os.path.join(root, "shards"))
    for part in range(shards):
        with open(os.path.join(root, shard_path(part)), "wb") as fh:
            writer = shard_writer(fh, 1)
            for r in range(rows):
                bands = [rng.integers(100, 5000, (T, bs.num_bands, n, n)).astype(np.uint16)
                         for bs in MODALITIES["sentinel2_l2a"].bandsets
                         for n in [cell_size(stored_resolution(bs.resolution))]]  # fmt: skip
                write_sample(writer, sample_id(32610, part, r), {"sentinel2_l2a": bands}, np.arange(T) + 3)
            writer.close()
        listed.append({"path": shard_path(part), "rows": rows})
    with open(os.path.join(root, MANIFEST_FILE), "w") as fh:
        json.dump({"format_version": FORMAT_VERSION, "shards": listed}, fh)
    with open(os.path.join(root, NORM_STATS_FILE), "w") as fh:
        json.dump(NormStats.default().to_dict(), fh)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipelines.common.storage import Storage

    root = write_tiny_corpus(str(tmp_path_factory.mktemp("corpus")))
    cfg = StreamConfig(shards_uri=root, batch_size=2, modalities=["sentinel2_l2a"], token_budget=400,
                       min_patch_size=2, max_patch_size=4, max_tokens_per_side=4, val_shards=1)  # fmt: skip
    return cfg, Storage()


def test_training_never_sees_the_held_out_shards(tiny):
    from pipelines.corpus.shards import load_manifest

    cfg, storage = tiny
    manifest = load_manifest(cfg.shards_uri, storage)
    train, held = split_shards(manifest, cfg.val_shards)
    assert [s["path"] for s in held] == ["shards/part-000002.parquet"]  # the manifest's last shard
    assert {s["path"] for s in train} == {"shards/part-000000.parquet", "shards/part-000001.parquet"}
    held_paths = {s["path"] for s in held}
    for shuffle in ("local", "full"):
        for epoch in range(4):
            import dataclasses

            plan = epoch_plan(dataclasses.replace(cfg, shuffle=shuffle), storage, epoch)
            seen = [tuple(s) for w in plan for s in w["subs"]]
            assert not {path for path, _, _ in seen} & held_paths
            # and every training sample is still there, once: holding out loses nothing else
            assert sorted(seen) == sorted((s["path"], r, q) for s in train for r in range(2) for q in range(4))
    assert {path for path, _, _ in held_out_samples(cfg, storage)} == held_paths
    with pytest.raises(ValueError, match="val_shards=3"):
        split_shards(manifest, 3)  # nothing left to train on


def test_validation_batches_are_drawn_once_and_identical_on_every_build(tiny):
    cfg, storage = tiny
    first = validation_batches(cfg, storage, patch_sizes=[2, 4])
    again = validation_batches(cfg, storage, patch_sizes=[2, 4])  # a restarted run builds them anew
    # 2 held-out cells = 8 samples, in batches of 2, once per patch size
    assert [b["patch_size"] for b in first] == [2] * 4 + [4] * 4
    assert sum(b["months"].shape[0] for b in first) == 16
    assert len(again) == len(first)
    for a, b in zip(first, again, strict=True):
        check_batch(a, cfg)
        assert a["patch_size"] == b["patch_size"]
        np.testing.assert_array_equal(a["months"], b["months"])
        for key in ("x", "mask_a", "mask_b"):
            for m in a[key]:
                np.testing.assert_array_equal(a[key][m], b[key][m])
    # the crops and masks were drawn: not all batches alike
    sides = {b["x"]["sentinel2_l2a"].shape[1] for b in first}
    assert len(sides) > 1 or len({b["mask_a"]["sentinel2_l2a"].tobytes() for b in first}) > 1
    subset = validation_batches(cfg, storage, patch_sizes=[4], max_samples=4)
    assert sum(b["months"].shape[0] for b in subset) == 4
    with pytest.raises(ValueError, match="val_patch_sizes"):
        validation_batches(cfg, storage, patch_sizes=[9])


def test_validation_loss_is_deterministic_and_leaves_the_model_as_it_was(tiny):
    from olmoearth import build_model

    cfg, storage = tiny
    batches = [to_torch(b) for b in validation_batches(cfg, storage, patch_sizes=[2, 4])]
    torch.manual_seed(0)
    model = build_model("nano")
    model.train()
    rng = torch.random.get_rng_state()
    first = validation_losses(model, batches)
    assert set(first) == {"val_loss", "val_patch_disc", "val_contrastive", "val_loss_p2", "val_loss_p4"}
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)
    assert validation_losses(model, batches) == first  # bit for bit
    rebuilt = [to_torch(b) for b in validation_batches(cfg, storage, patch_sizes=[2, 4])]
    assert validation_losses(model, rebuilt) == first  # after a restart
    assert first["val_loss"] == pytest.approx(first["val_patch_disc"] + 0.1 * first["val_contrastive"])
    assert first["val_loss"] == pytest.approx((first["val_loss_p2"] + first["val_loss_p4"]) / 2)
    with torch.no_grad():  # other weights, another loss: the figure measures the model
        for p in model.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert validation_losses(model, batches)["val_loss"] != first["val_loss"]


def test_progress_bar_keeps_the_last_validation_loss(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    from pipelines.pretrain.job import _progress_callback

    cb = _progress_callback(total=10, initial=0)
    cb.on_trial_result(0, [], None, {"step": 0, "val_loss": 2.5})
    cb.on_trial_result(1, [], None, {"step": 5, "loss": 3.25, "lr": 1e-3})
    assert cb.postfix == {"loss": "3.25", "val_loss": "2.5", "lr": "0.001"}
    cb.on_experiment_end([])


def test_a_run_logs_validation_from_step_0_and_scores_the_same_batches_after_a_restart(s3_server, ray_cluster):
    """A real run (2 CPU workers, ZeRO-2) with the learning rate at 0, so the weights never change: the
    validation loss must then be the same at every evaluation, before and after the worker group was
    restarted from a checkpoint (new processes that rebuilt the validation set)."""
    from corpora import synthetic_shards

    from pipelines.common.config import from_dict
    from pipelines.common.faults import FAULTS_ENV
    from pipelines.common.storage import join
    from pipelines.pretrain.config import PretrainConfig, run_uri
    from pipelines.pretrain.job import fit

    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    storage, bucket, _ = synthetic_shards("val", num_samples=6, seed=7, timesteps=2, samples_per_shard=2)
    cfg = from_dict(PretrainConfig, {
        "model": {"size": "nano"},
        "data": {"shards_uri": join(bucket, "shards"), "batch_size": 2, "min_patch_size": 2, "max_patch_size": 4,
                 "max_tokens_per_side": 3, "token_budget": 300, "num_cpus_per_task": 0.5, "val_shards": 1},
        "optim": {"lr": 0.0, "warmup_steps": 1},
        "train": {"max_steps": 6, "global_batch_size": 4, "precision": "fp32", "log_every": 1,
                  "checkpoint_every": 2, "val_every": 2, "val_patch_sizes": [2, 4], "val_max_samples": 4},
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1, "threads_per_worker": 1},
        "run": {"name": "val", "storage_path": join(bucket, "runs"), "max_failures": 1},
    })  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULTS_ENV, json.dumps({"train_step": 3}))
        fit(cfg)
    run = run_uri(cfg)
    errors = storage.fs(run).glob(run + "/*/error.txt")  # the worker group did fail and restart
    assert errors and "fault injection" in storage.read_text("s3://" + errors[0])
    rows = [json.loads(line) for line in storage.read_text(join(run, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows] == list(range(7))  # step 0: the untrained model's validation
    validated = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in validated] == [0, 2, 4, 6]
    for key in ("val_loss", "val_patch_disc", "val_contrastive", "val_loss_p2", "val_loss_p4"):
        values = [r[key] for r in validated]
        assert np.isfinite(values).all() and values == [values[0]] * 4, (key, values)
    # the training rows hold the loss per patch size of the interval's batches
    for r in rows[1:]:
        per_p = {k for k in r if k.startswith("loss_p")}
        assert per_p and per_p <= {"loss_p2", "loss_p3", "loss_p4"}, r
    assert storage.read_bytes(join(run, "loss_curve.png"))[:4] == b"\x89PNG"
