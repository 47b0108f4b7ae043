"""The original's pretraining recipe (issue #16): the published normalisation statistics in the stream (the
corpus's own as an option), the weight-decay option, the release configs stopped mid-cosine and
`model.init_from`."""

from __future__ import annotations

import glob
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch

from olmoearth.checkpoint import CheckpointError, save_encoder, save_model
from olmoearth.loading import random_model
from olmoearth.modalities import MODALITIES, NormStats
from pipelines.common.config import load_config
from pipelines.common.storage import Storage
from pipelines.pretrain.config import PretrainConfig, final_step, validate
from pipelines.pretrain.engine import lr_factor_fn
from pipelines.pretrain.stream import StreamConfig
from pipelines.pretrain.worker import check_init_from, init_weights, optimizer_groups

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")

# the released v1 checkpoints: size -> (lr, weight decay, step of the release)
RELEASES = {"nano": (1e-3, 0.002, 370_000), "tiny": (2e-4, 0.02, 360_000), "base": (1e-4, 0.02, 667_200),
            "large": (1e-4, 0.002, 560_000)}  # fmt: skip


def test_published_statistics_are_the_originals():
    """NormStats.default(): mean +- 2 std of the original's computed.json, CDL and canopy height hand-set,
    OSM 0..1 and WorldCereal 0..100 predefined."""
    s = NormStats.default()

    def window(name, band):
        i = MODALITIES[name].bands.index(band)
        return float(s.lo[name][i]), float(s.hi[name][i])

    for (name, band), (mean, std) in {
        ("sentinel2_l2a", "B04"): (1513.057, 1740.776), ("sentinel2_l2a", "B01"): (1115.849, 1955.699),
        ("sentinel1", "vv"): (-11.649, 10.84), ("sentinel1", "vh"): (-17.745, 10.216),
        ("landsat", "B10"): (21347.894, 10957.282), ("srtm", "srtm"): (677.022, 993.172),
        ("worldcover", "B1"): (34.046, 24.232), ("cdl", "cdl"): (100, 50), ("wri_canopy_height_map", "B1"): (10, 5),
    }.items():  # fmt: skip
        assert window(name, band) == pytest.approx((mean - 2 * std, mean + 2 * std), rel=1e-6), (name, band)
    assert all(window("openstreetmap_raster", b) == (0.0, 1.0) for b in MODALITIES["openstreetmap_raster"].bands)
    assert all(window("worldcereal", b) == (0.0, 100.0) for b in MODALITIES["worldcereal"].bands)


def test_norm_stats_choice_is_checked():
    assert StreamConfig().norm_stats == "published"
    with pytest.raises(ValueError, match="norm_stats"):
        StreamConfig(norm_stats="mine")


def test_weight_decay_groups_follow_the_option():
    model = random_model("nano")
    cfg = PretrainConfig()
    (group,) = optimizer_groups(cfg, model)  # the original: one decayed group of every trainable parameter
    assert group["weight_decay"] == cfg.optim.weight_decay
    assert len(group["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    cfg.optim.exempt_norms_and_biases = True
    decay, no_decay = optimizer_groups(cfg, model)
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert no_decay["params"] and all(p.ndim >= 2 for p in decay["params"])


@pytest.mark.parametrize("size", list(RELEASES))
def test_release_configs_stop_mid_cosine_of_the_full_schedule(size):
    lr, wd, stop = RELEASES[size]
    cfg = load_config(PretrainConfig, ["--config", os.path.join(CONFIGS, f"pretrain_{size}_v1.yaml")])
    grad_accum = validate(cfg)
    assert cfg.model.size == size and (cfg.optim.lr, cfg.optim.weight_decay) == (lr, wd)
    assert (cfg.optim.warmup_steps, cfg.train.max_steps, cfg.train.stop_at_step) == (8000, 667_200, stop)
    assert final_step(cfg) == stop and cfg.data.norm_stats == "published"
    assert not cfg.optim.exempt_norms_and_biases
    assert cfg.data.batch_size == 32 and cfg.train.global_batch_size == 512
    assert cfg.data.batch_size * cfg.scaling.num_workers * grad_accum == 512
    # the lr after the stop step: that of the 667,200-step cosine (warmup 8,000, down to 0.1 x peak)
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (stop - 8000) / (667_200 - 8000)))
    assert lr * lr_factor_fn(cfg.optim, cfg.train.max_steps)(stop) == pytest.approx(lr * cosine, rel=1e-12)
    if size != "base":
        assert cosine > 0.15  # mid-cosine, above the end of the schedule (0.1)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "pretrain_*.yaml"))))
def test_every_pretrain_config_validates(path):
    cfg = load_config(PretrainConfig, ["--config", path])
    validate(cfg)
    if os.path.basename(path) != "pretrain_nano_cpu.yaml":  # the GPU configs: the original's microbatch
        assert cfg.data.batch_size == 32


def test_stop_at_step_is_checked():
    cfg = PretrainConfig()
    assert final_step(cfg) == cfg.train.max_steps  # 0: run to max_steps
    cfg.train.stop_at_step = cfg.train.max_steps + 1
    with pytest.raises(ValueError, match="stop_at_step"):
        validate(cfg)


# ----------------------------------------------------------------------------------------------------------
# init_from


def test_init_from_an_exported_encoder_loads_it_strictly(tmp_path):
    src = random_model("nano", seed=7)
    path = str(tmp_path / "enc.safetensors")
    save_encoder(src.encoder, path)
    model = random_model("nano", seed=1)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    assert init_weights(model, path, Storage()) == "encoder"
    for k, v in src.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v, rtol=0, atol=0)
    for k, v in decoder_before.items():  # the decoder stays as initialised
        torch.testing.assert_close(model.decoder.state_dict()[k], v, rtol=0, atol=0)


def test_init_from_a_whole_model_file_loads_every_tensor(tmp_path):
    src = random_model("nano", seed=3)
    path = str(tmp_path / "model.safetensors")
    save_model(src, path)
    model = random_model("nano", seed=1)
    assert init_weights(model, path, Storage()) == "model"
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert init_weights(random_model("nano"), "random:nano:3", Storage()) == "model"


def test_init_from_a_wrong_size_names_the_tensor_and_both_shapes(tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    save_encoder(random_model("tiny").encoder, path)
    with pytest.raises(CheckpointError, match=r"model.init_from .*tiny.safetensors.*tensor '.+' has shape "
                                              r"\(192,?.*\), the model needs \(128,?.*\)"):  # fmt: skip
        init_weights(random_model("nano"), path, Storage())
    cfg = PretrainConfig()
    cfg.model.size, cfg.model.init_from = "nano", path
    with pytest.raises(CheckpointError, match="has shape"):  # the driver's check, before any worker starts
        check_init_from(cfg, Storage())
    with pytest.raises(CheckpointError, match="not found"):
        init_weights(random_model("nano"), str(tmp_path / "nothing.safetensors"), Storage())


# ----------------------------------------------------------------------------------------------------------
# On a real corpus (SeaweedFS, the session's Ray cluster)


@pytest.fixture(scope="module")
def corpus(s3_server, ray_cluster):
    """2 synthetic cells (8 training samples, 3 timesteps) built into shards."""
    from corpora import synthetic_shards

    return synthetic_shards("recipe", num_samples=2, seed=11, timesteps=3, samples_per_shard=2)


def first_batch(shards: str, storage: Storage, choice: str) -> dict:
    from pipelines.pretrain.stream import epoch_windows

    cfg = StreamConfig(shards_uri=shards, batch_size=2, min_patch_size=4, max_patch_size=4, max_tokens_per_side=4,
                       token_budget=400, norm_stats=choice)  # fmt: skip
    items, fn = epoch_windows(cfg, storage)
    return pickle.loads(fn(items[0])[0]["batch"])


def test_stream_normalises_with_the_chosen_statistics(corpus):
    """The same batch (same crops, same masks) under each choice: a Sentinel-2 B04 pixel of raw value v is
    (v - (mean - 2 std)) / (4 std) with the published figures, resp. the corpus's own."""
    from pipelines.common.storage import join
    from pipelines.corpus.shards import NORM_STATS_FILE

    storage, _, shards = corpus
    own = json.loads(storage.read_text(join(shards, NORM_STATS_FILE)))["sentinel2_l2a"]["B04"]
    published, by_corpus = first_batch(shards, storage, "published"), first_batch(shards, storage, "corpus")
    assert np.array_equal(published["mask_a"]["sentinel2_l2a"], by_corpus["mask_a"]["sentinel2_l2a"])
    i = MODALITIES["sentinel2_l2a"].bands.index("B04")
    xp, xc = published["x"]["sentinel2_l2a"][..., i], by_corpus["x"]["sentinel2_l2a"][..., i]
    valid = (xp != 0) | (xc != 0)  # missing pixels are 0 under both
    assert valid.sum() >= 16
    raw = xc[valid] * 4 * own["std"] + own["mean"] - 2 * own["std"]
    assert raw.min() >= 0 and raw.max() < 20000  # reflectance x 10,000
    np.testing.assert_allclose(xp[valid], (raw - (1513.057 - 2 * 1740.776)) / (4 * 1740.776), atol=2e-5)
    assert abs(own["mean"] - 1513.057) > 1  # the synthetic corpus's own statistics differ: the test can fail


def test_release_style_run_from_an_encoder_export(corpus, tmp_path):
    """One worker, init_from an exported random encoder, a 6-step schedule stopped at step 3, the published
    statistics (default): the run stops at 3 with the lr of the 6-step cosine, the trained encoder is the
    file's (lr 1e-9: it barely moves) and the export carries the published statistics."""
    from olmoearth import load_encoder, load_model
    from pipelines.common.config import from_dict
    from pipelines.pretrain.checkpoints import latest_checkpoint
    from pipelines.pretrain.export import export_encoder
    from pipelines.pretrain.job import fit

    storage, bucket, shards = corpus
    src = random_model("nano", seed=5).encoder
    init = f"{bucket}/models/init.safetensors"
    local = str(tmp_path / "init.safetensors")
    save_encoder(src, local)
    with open(local, "rb") as fh:
        storage.write_bytes(init, fh.read())
    lr = 1e-9
    cfg = from_dict(PretrainConfig, {
        "model": {"size": "nano", "init_from": init},
        "data": {"shards_uri": shards, "batch_size": 2, "min_patch_size": 4, "max_patch_size": 4,
                 "max_tokens_per_side": 3, "token_budget": 300, "num_cpus_per_task": 0.5},
        "optim": {"lr": lr, "weight_decay": 0.02, "warmup_steps": 1},
        "train": {"max_steps": 6, "stop_at_step": 3, "global_batch_size": 2, "precision": "fp32",
                  "log_every": 1, "checkpoint_every": 10, "keep_checkpoints": 1},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1, "threads_per_worker": 1},
        "run": {"name": "release-style", "storage_path": f"{bucket}/runs", "max_failures": 0},
    })  # fmt: skip
    assert fit(cfg).metrics["step"] == 3
    ckpt = latest_checkpoint(storage, f"{bucket}/runs/release-style")
    state = json.loads(storage.read_text(ckpt + "/train_state.json"))
    assert state["step"] == 3 and [r["step"] for r in state["history"]] == [1, 2, 3]
    expected_lr = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (3 - 1) / (6 - 1))))
    assert state["history"][-1]["lr"] == pytest.approx(expected_lr, rel=1e-6)
    assert NormStats.from_dict(state["norm_stats"]).to_dict() == NormStats.default().to_dict()
    out = f"{bucket}/models/out.safetensors"
    export_encoder(ckpt, out, storage)
    exported = load_encoder(storage.read_bytes(out))
    assert exported.norm_stats.to_dict() == NormStats.default().to_dict()
    assert exported.checkpoint_meta["norm_stats"] == "published"
    trained = exported.state_dict()
    for k, v in src.state_dict().items():  # 3 AdamW steps of lr 1e-9 move a weight by ~3e-9 at most
        torch.testing.assert_close(trained[k], v, rtol=0, atol=1e-7)
    assert load_model(ckpt).encoder.norm_stats.to_dict() == NormStats.default().to_dict()
