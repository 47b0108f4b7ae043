"""`olmoearth eval` end to end on the labelled synthetic task of the corpus generator: a nano encoder
pretrained for a short CPU run (a plain in-process torch loop over `model(batch)`) against the random-init
encoder of the same size and the raw band-statistics baseline, embedded through Ray Data from the real
S3 server; plus the in-loop probe hook and the CLI on the real BigEarthNet patches."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import uuid

import numpy as np
import pytest
import torch

from olmoearth import build_model
from olmoearth.checkpoint import save_encoder
from olmoearth.masking import mask_batch, token_presence
from pipelines.common.storage import Storage, join
from pipelines.evaluation.hook import load_probe_set, probe
from pipelines.evaluation.run import DatasetConfig, EvalConfig, run_eval
from pipelines.evaluation.synth_task import SynthTaskReader, geo_block

CHIP, T, PATCH, CHIPS_PER_TILE = 32, 1, 4, 8  # single-date Sentinel-2 chips of 320 m, as EuroSAT
PRETRAIN_STEPS, PRETRAIN_BATCH, PRETRAIN_LR = 50, 16, 2e-3


@pytest.fixture(scope="module")
def bucket(s3_server):
    uri = f"s3://eval-{uuid.uuid4().hex[:10]}"
    Storage(s3_server.endpoint).makedirs(uri)
    return uri


@pytest.fixture(scope="module")
def corpus(bucket, s3_server):
    from pipelines.corpus.synth import SynthConfig, write_corpus

    uri = join(bucket, "synth")
    # curated like a benchmark (configs/synth_labelled.yaml): cloud-free, no missing months or modalities
    write_corpus(SynthConfig(num_samples=32, seed=3, labelled=True, cloud_rate=0.0, missing_timestep_rate=0.0,
                             missing_modality_rate=0.0), uri, Storage(s3_server.endpoint))
    return uri


def _reader(corpus, **kw):
    args = dict(root=corpus, chip_size=CHIP, chips_per_tile=CHIPS_PER_TILE, max_timesteps=T, split_block=2, fractions=(0.6, 0.0, 0.4),
                modalities=("sentinel2_l2a",))
    args.update(kw)
    return SynthTaskReader(**args)


def test_synth_task_splits_by_geography(corpus):
    reader = _reader(corpus)
    rows = reader.rows()
    info = reader.info()
    assert info.kind == "classification" and info.num_classes >= 2
    split_of_tile, split_of_block = {}, {}
    for r in rows:
        assert split_of_tile.setdefault(r["sample_id"], r["split"]) == r["split"]  # no tile in two splits
        b = geo_block(r["sample_id"], 2)
        assert split_of_block.setdefault(b, r["split"]) == r["split"]  # no block in two splits
    assert {"train", "test"} <= set(split_of_tile.values())
    x, months, y = reader.load(rows[0])
    assert x["sentinel2_l2a"].shape[:3] == (CHIP, CHIP, T) and months.shape == (T,) and y.shape == ()
    seg = _reader(corpus, kind="segmentation")
    _, _, ymap = seg.load(seg.rows()[0])
    assert ymap.shape == (CHIP, CHIP) and ymap.max() < info.num_classes


def _pretrain(chips, steps, seed=0, batch_size=PRETRAIN_BATCH, lr=PRETRAIN_LR):
    """A plain Latent MIM Lite loop on in-memory chips (x {modality: (H, W, T, C)} raw, months)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("nano").train()
    norm = model.encoder.norm_stats
    opt = torch.optim.AdamW(model.param_groups(0.002), lr=lr)
    presents = [token_presence(x, PATCH) for x, _ in chips]
    losses, t0 = [], time.time()
    for step in range(steps):
        idx = rng.choice(len(chips), size=min(batch_size, len(chips)), replace=False)
        x = {m: np.stack([chips[i][0][m] for i in idx]) for m in chips[0][0]}
        batch = {
            "x": {m: torch.nan_to_num(norm.normalise(m, torch.as_tensor(v))) for m, v in x.items()},
            "months": torch.as_tensor(np.stack([chips[i][1] for i in idx])),
            "patch_size": PATCH,
            "mask_a": {m: torch.as_tensor(v) for m, v in mask_batch([presents[i] for i in idx], rng).items()},
            "mask_b": {m: torch.as_tensor(v) for m, v in mask_batch([presents[i] for i in idx], rng).items()},
        }
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    print(f"pretrained {steps} steps in {time.time() - t0:.1f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return model, losses


@pytest.fixture(scope="module")
def pretrained(corpus):
    reader = _reader(corpus)
    train_rows = [r for r in reader.rows() if r["split"] == "train"]
    chips = [reader.load(r)[:2] for r in train_rows]
    model, losses = _pretrain(chips, steps=PRETRAIN_STEPS)
    return model, losses


@pytest.fixture(scope="module")
def eval_report(corpus, pretrained, bucket, ray_cluster, tmp_path_factory):
    """`run_eval` with the pretrained checkpoint on S3 -> (report, printed text, output URI, losses)."""
    model, losses = pretrained
    local = tmp_path_factory.mktemp("ckpt") / "encoder.safetensors"
    save_encoder(model.encoder, str(local))
    ckpt = join(bucket, "ckpt", "encoder.safetensors")
    Storage().write_bytes(ckpt, local.read_bytes())
    out = join(bucket, "eval")
    cfg = EvalConfig(
        dataset=DatasetConfig(format="synth", root=corpus, chip_size=CHIP, chips_per_tile=CHIPS_PER_TILE, max_timesteps=T,
                              split_block=2, fractions=[0.6, 0.0, 0.4], modalities=["sentinel2_l2a"]),
        checkpoint=ckpt, patch_size=PATCH, num_actors=2, batch_size=16, out=out)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report = run_eval(cfg)
    print(buf.getvalue())
    return report, buf.getvalue(), out, losses


def test_eval_run_end_to_end(eval_report):
    report, printed, out, losses = eval_report
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # the short pretraining run trained
    res = {(r["features"], r["probe"]): r for r in report["results"]}
    assert set(res) == {(f, p) for f in ("trained", "random", "band_stats") for p in ("knn", "linear")}
    assert all(0.0 <= r["value"] <= 1.0 and r["metric"] == "accuracy" for r in report["results"])
    # the report: JSON + Markdown on S3, one printed line per figure with task, split sizes and metric
    storage = Storage()
    saved = json.loads(storage.read_text(join(out, "eval.json")))
    assert saved["results"] == report["results"] and saved["splits"]["test"] == res["trained", "knn"]["n_eval"]
    assert saved["sources"]["random"]["overrides"]["encoder_dim"] == 128  # random twin of the same size
    md = storage.read_text(join(out, "eval.md"))
    assert "| trained |" in md and "| random |" in md and "| band_stats |" in md
    assert "eval task=synth features=trained probe=knn metric=accuracy" in printed and "n_test=" in printed


def test_pretrained_nano_beats_random_init_on_knn(eval_report):
    report, _, _, losses = eval_report
    res = {(r["features"], r["probe"]): r["value"] for r in report["results"]}
    print(f"kNN accuracy: trained {res['trained', 'knn']:.4f} random {res['random', 'knn']:.4f} "
          f"band_stats {res['band_stats', 'knn']:.4f}; pretrain steps {len(losses)}")
    assert res["trained", "knn"] > res["random", "knn"]


def test_probe_hook_in_loop(corpus, pretrained):
    model, _ = pretrained
    probe_set = load_probe_set(_reader(corpus, chips_per_tile=1), max_chips=40)
    enc = model.encoder.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    scores = probe(enc, probe_set, patch_size=PATCH, baselines=True)
    assert set(scores) == {"synth/knn_accuracy", "synth/linear_accuracy",
                           "synth/band_stats/knn_accuracy", "synth/band_stats/linear_accuracy"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert enc.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # nothing changed
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert probe(enc, probe_set, patch_size=PATCH, linear=False) == {"synth/knn_accuracy": scores["synth/knn_accuracy"]}


def test_cli_on_bigearthnet_with_random_encoder(ray_cluster, tmp_path, capsys):
    from pipelines.imagery import sample_data
    from ray_jobs.evaluate import main

    s2 = os.path.dirname(sample_data.bigearthnet_patches()[0]["s2_dir"])
    rc = main(["--dataset.format", "bigearthnet", "--dataset.root", s2,
               "--dataset.s1_root", s2.replace("BigEarthNet-S2-Example", "BigEarthNet-S1-Example"),
               "--dataset.fractions", "[0.5, 0.0, 0.5]", "--out", str(tmp_path), "--k", "3", "--patch_size", "8",
               "--Cs", "[0.1, 1.0]"])
    assert rc == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["splits"] == {"train": 3, "val": 0, "test": 3}
    assert {r["features"] for r in report["results"]} == {"random", "band_stats"}
    assert {r["metric"] for r in report["results"]} == {"micro_f1", "map"}
    assert "features=random probe=knn metric=micro_f1" in capsys.readouterr().out
