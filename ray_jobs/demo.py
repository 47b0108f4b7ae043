"""`make demo` / `olmoearth demo`: the whole system end to end on this machine, with the same job code that
runs on a cluster.

It starts a real S3 server (SeaweedFS) and a local Ray cluster, synthesises a raw corpus into the bucket, makes
a corpus of its own as the original did (cells chosen by OpenStreetMap category on a real extract; real imagery
materialised from a STAC catalog into the raw layout), builds the training shards, pretrains a nano model with
Ray Train + DeepSpeed, exports the encoder, evaluates it with kNN and linear probes against a random-init
baseline, fine-tunes it to per-pixel land cover and maps the predictions, starts the Ray Serve endpoint and
embeds a real place (the Virginia coast, through STAC) into a Cloud-Optimized GeoTIFF with a PNG preview,
prints where everything is, and stops what it started.

    olmoearth demo [--fast true] [--out demo_out] [--pretrain_steps 300]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

from pipelines.common.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class DemoConfig:
    """End-to-end demo on embedded defaults."""

    out: str = "demo_out"  # local folder for the S3 server's data, logs and copies of the results
    fast: bool = False  # a small run (CI): fewer samples and steps, same code path
    bucket: str = "olmoearth-demo"  # bucket on the demo's own S3 server that every step reads and writes
    raw_samples: int = 48  # unlabelled pretraining corpus (2560 m cells)
    labelled_samples: int = 64  # labelled corpus: a contiguous block for evaluation and the area embedding
    pretrain_steps: int = 300  # optimiser steps of the nano pretraining run
    area_cells: int = 3  # the embedded area is area_cells x area_cells grid cells (2.56 km each)
    own_cells: int = 2  # the real imagery materialised into the corpus: own_cells x own_cells cells
    finetune_epochs: int = 10  # epochs of the segmentation fine-tuning on the labelled block
    # months the fine-tuned model maps over the labelled block: in its acquisition year
    # (pipelines.corpus.synth.LABELLED_START)
    area_time: list[str] = field(default_factory=lambda: ["2021-06-01", "2021-08-30"])
    # keep the SeaweedFS data folder afterwards; `python -m pipelines.common.local_s3 serve <out>/seaweedfs`
    # serves it again (on the ports it remembers)
    keep_data: bool = False
    verbose: bool = False  # every log line: Ray workers, Ray Data operators, Serve access logs (OLMOEARTH_VERBOSE=1)


def _apply_fast(cfg: DemoConfig) -> DemoConfig:
    if cfg.fast:
        cfg.raw_samples, cfg.labelled_samples, cfg.pretrain_steps, cfg.area_cells, cfg.own_cells = 8, 16, 20, 2, 1
        cfg.finetune_epochs = 3
        cfg.area_time = ["2021-06-01", "2021-06-30"]  # one month: a third of the tokens per tile
    return cfg


class Step:
    """Prints a numbered headline per step and its wall time."""

    def __init__(self):
        self.n, self.t0 = 0, time.time()
        self.times: dict[str, float] = {}

    def __call__(self, title: str):
        self.n += 1
        print(f"\n=== [{self.n}] {title}", flush=True)
        self.current, self.t_step = title, time.time()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        dt = time.time() - self.t_step
        self.times[self.current] = dt
        if exc[0] is None:
            print(f"--- done in {dt:.1f}s", flush=True)


def run(cfg: DemoConfig) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
    from pipelines.common.local_s3 import SeaweedServer
    from pipelines.common.logs import set_verbose
    from pipelines.common.ray_start import init_ray
    from pipelines.common.storage import Storage

    if cfg.verbose:
        set_verbose(True)
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    _clear_previous_results(out)
    s3 = f"s3://{cfg.bucket}"
    raw, labelled, shards = f"{s3}/raw", f"{s3}/labelled", f"{s3}/shards"
    encoder_uri = f"{s3}/models/nano-demo.safetensors"
    step = Step()
    server = SeaweedServer(os.path.join(out, "seaweedfs"))
    results: dict = {}
    try:
        with step("start SeaweedFS (S3) and a local Ray cluster"):
            server.start()
            os.environ.update(server.env())  # every job and Ray worker reaches the bucket like AWS S3
            storage = Storage()
            storage.makedirs(s3)
            init_ray()
            print(f"S3 endpoint {server.endpoint}, bucket {s3}")

        from ray_jobs import build_corpus, evaluate, export, pretrain, synth

        with step(f"synthesise {cfg.raw_samples} raw samples + a labelled block of {cfg.labelled_samples}"):
            synth.main(["--out_uri", raw, "--num_samples", str(cfg.raw_samples), "--seed", "0",
                        "--ray_tasks", "4"])  # fmt: skip
            synth.main(["--config", os.path.join(ROOT, "configs/synth_labelled.yaml"), "--out_uri", labelled,
                        "--num_samples", str(cfg.labelled_samples), "--ray_tasks", "4"])  # fmt: skip

        with step("your own corpus: cells chosen from a real OSM extract; real imagery materialised from STAC"):
            catalog = _write_catalog(cfg, storage)
            results.update(_own_corpus(cfg, catalog, raw, out, storage))

        with step("build the corpus: validate, shard, normalisation statistics (Ray Data)"):
            # fast: shards of 4 cells, so that one of its 2 shards can be held out for validation
            build_corpus.main(["--config", os.path.join(ROOT, "configs/build_small.yaml"),
                               "--raw_uri", raw, "--out_uri", shards]
                              + (["--samples_per_shard", "4"] if cfg.fast else []))  # fmt: skip

        with step(f"pretrain nano for {cfg.pretrain_steps} steps (Ray Train + DeepSpeed, CPU)"):
            pretrain.main(["--config", os.path.join(ROOT, "configs/pretrain_nano_cpu.yaml"),
                           "--data.shards_uri", shards, "--run.storage_path", f"{s3}/runs",
                           "--run.name", "demo-nano", "--train.max_steps", str(cfg.pretrain_steps),
                           "--optim.warmup_steps", str(max(1, cfg.pretrain_steps // 10)),
                           "--train.probe_every", str(0 if cfg.fast else max(10, cfg.pretrain_steps // 6)), "--train.probe_uri", labelled,
                           # the last shard held out; its fixed batches scored at step 0 and every val_every steps
                           "--data.val_shards", "1", "--train.val_every", str(max(5, cfg.pretrain_steps // 12)),
                           "--train.val_max_samples", str(8 if cfg.fast else 0),
                           "--run.resume", "false"])  # fmt: skip
            run_uri = f"{s3}/runs/demo-nano"

        with step("export the encoder (safetensors)"):
            export.main(["--checkpoint", run_uri, "--out", encoder_uri])

        with step("evaluate: kNN and linear probe vs random-init and band-statistics baselines"):
            eval_out = os.path.join(out, "eval")
            evaluate.main(["--config", os.path.join(ROOT, "configs/eval_synth.yaml"),
                           "--dataset.root", labelled, "--checkpoint", encoder_uri, "--out", eval_out])  # fmt: skip
            results["eval"] = eval_out

        with step("fine-tune the encoder to per-pixel land cover, export it, map its predictions over the block"):
            results.update(_finetune_and_predict(cfg, labelled, encoder_uri, out))

        with step("serve the encoder (Ray Serve) and embed an area through the endpoint"):
            results.update(_serve_and_embed(cfg, catalog, encoder_uri, out))

        with step(f"copy the encoder, the run's metrics and its checkpoints summary into {out}"):
            results.update(_collect(storage, run_uri, encoder_uri, out))
    finally:
        _shutdown(server, keep=cfg.keep_data, out=out)
    return _report(results, step.times, out, cfg.keep_data)


def _report(results: dict, times: dict, out: str, kept: bool) -> dict:
    """demo_results.json and the closing lines: local paths only, each checked to exist (the bucket is gone)."""
    missing = sorted(k for k, path in results.items() if not os.path.exists(path))
    if missing:
        raise RuntimeError(f"the demo's results {', '.join(missing)} are missing under {out}")
    total = sum(times.values())
    print(f"\n=== demo finished in {total // 60:.0f} min {total % 60:.0f} s; steps: "
          + ", ".join(f"[{i}] {v:.0f} s" for i, v in enumerate(times.values(), 1)) + "; results:")  # fmt: skip
    width = max(map(len, results))
    print("\n".join(f"  {k:<{width}}  {path}" for k, path in results.items()))
    if kept:
        print(f"  S3 data kept in {out}/seaweedfs; serve it again: python -m pipelines.common.local_s3 serve "
              f"{out}/seaweedfs")  # fmt: skip
    summary = {"results": results, "step_seconds": times}
    from pipelines.common.storage import Storage

    Storage().write_text(os.path.join(out, "demo_results.json"), json.dumps(summary, indent=2))
    print(f"  (all of it in {os.path.join(out, 'demo_results.json')})")
    return results


def _collect(storage, run_uri: str, encoder_uri: str, out: str) -> dict:
    """Copies out of the demo's bucket what outlives it (the bucket goes when the demo ends, unless
    --keep_data): the exported encoder, the run's metrics and loss curve, and a summary of its checkpoints."""
    from olmoearth.checkpoint import STATE_FILE
    from pipelines.pretrain.checkpoints import list_checkpoints

    local_run, encoder = os.path.join(out, "run"), os.path.join(out, "model", os.path.basename(encoder_uri))
    with storage.fs(encoder_uri).open(encoder_uri, "rb") as src, storage.open_atomic(encoder) as dst:
        shutil.copyfileobj(src, dst, 2**22)
    found = {"encoder": encoder}
    for key, name in (("loss_curve", "loss_curve.png"), ("metrics", "metrics.jsonl")):
        if storage.exists(f"{run_uri}/{name}"):
            found[key] = os.path.join(local_run, name)
            storage.write_bytes(found[key], storage.read_bytes(f"{run_uri}/{name}"))
    checkpoints = []
    for step, uri in list_checkpoints(storage, run_uri):
        fs, base = storage.fs(uri), uri.split("://")[-1].rstrip("/") + "/"
        sizes = {p.split(base, 1)[-1]: int(fs.size(p)) for p in sorted(fs.find(uri))}
        state = json.loads(storage.read_text(f"{uri}/{STATE_FILE}"))
        kept = {k: state[k] for k in ("samples_seen", "tokens_seen", "epochs", "resumed_from", "world_size")
                if k in state}  # fmt: skip
        checkpoints.append({"step": step, "uri": uri, **kept, "bytes": sum(sizes.values()), "files": sizes})
    found["checkpoints"] = os.path.join(local_run, "checkpoints.json")
    storage.write_text(found["checkpoints"], json.dumps({"run": run_uri, "checkpoints": checkpoints}, indent=1))
    rows = [json.loads(line) for line in open(found["metrics"])] if "metrics" in found else []
    last = rows[-1] if rows else {}
    print(f"pretrain: step {last.get('step', '?')}, loss {last.get('loss', float('nan')):.4f}; "
          f"{len(checkpoints)} checkpoint(s) kept, the last at step {checkpoints[-1]['step'] if checkpoints else '?'}")
    return found


# what one demo run writes under --out (with the S3 data a kept run left); a new run starts from a new bucket,
# so old results are stale
RESULT_ENTRIES = ("area", "cells", "classes", "eval", "finetune", "run", "model", "seaweedfs", "demo_results.json")


def _clear_previous_results(out: str) -> None:
    """Removes the results of an earlier demo in the same --out folder (the area job refuses to mix tiles of
    different jobs, and stale files next to fresh ones would mislead)."""
    stale = [name for name in RESULT_ENTRIES if os.path.exists(os.path.join(out, name))]
    if stale:
        print(f"removing the previous demo's results in {out}: {', '.join(stale)}", flush=True)
    for name in stale:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _write_catalog(cfg: DemoConfig, storage) -> str:
    """A static STAC catalog of COGs made from the shipped real imagery (pipelines/imagery/sample_catalog.py:
    the Sentinel-2 scene of the Virginia coast, a Landsat-8 scene, BigEarthNet Sentinel-1 patches) in the demo
    bucket: what the materialisation and the mapping steps read, as they would read Earth Search."""
    from pipelines.imagery.sample_catalog import write_sample_catalog

    catalog = write_sample_catalog(storage, f"s3://{cfg.bucket}/sample-stac")
    print(f"STAC catalog of the shipped real imagery: {catalog}", flush=True)
    return catalog


def _own_corpus(cfg: DemoConfig, catalog: str, raw: str, out: str, storage) -> dict:
    """The original's two corpus-making steps on shipped real data: choose cells by OpenStreetMap category on
    the Helsinki extract (summary table and map), and materialise own_cells x own_cells cells of the real
    Sentinel-2 scene's footprint from the STAC catalog into the raw corpus, where the build shards them with
    the synthetic cells (the extract and the imagery do not overlap, so the cells are given by a bbox)."""
    from pipelines.imagery import sample_data
    from pipelines.imagery.sample_catalog import sample_area
    from ray_jobs import materialize, select_cells

    cells = os.path.join(out, "cells")
    select_cells.main(["--config", os.path.join(ROOT, "configs/select_cells.yaml"),
                       "--osm", sample_data.helsinki_pbf(), "--out", cells])  # fmt: skip
    area = sample_area(side_m=cfg.own_cells * 2560.0)
    collections = {"sentinel2_l2a": "sentinel-2-l2a", "landsat": "landsat-c2-l1", "sentinel1": "sentinel-1-grd"}
    materialize.main(["--stac", catalog, "--collections", json.dumps(collections),
                      "--bbox", json.dumps(area["bbox"]), "--bbox_crs", area["crs"],
                      "--time_start", area["time_start"], "--time_end", area["time_end"], "--out", raw])  # fmt: skip
    report = os.path.join(out, "cells", "materialize_report.json")
    storage.write_bytes(report, storage.read_bytes(f"{raw}/materialize_report.json"))
    return {"cells_map": os.path.join(cells, "cells.png"), "cells_summary": os.path.join(cells, "summary.csv"),
            "materialize_report": report}


def _block_bbox(cfg: DemoConfig, labelled: str, storage) -> tuple[list[float], str]:
    """The first area_cells x area_cells cells of the labelled block (a contiguous set of grid cells) as a bbox
    in their UTM CRS."""
    from pipelines.corpus.raw_layout import cell_bounds, list_samples, parse_sample_id

    cells = [parse_sample_id(i) for i in list_samples(labelled, storage)]  # (epsg, col, row)
    cols = sorted({c for _, c, _ in cells})[: cfg.area_cells]
    rows = sorted({r for _, _, r in cells})[: cfg.area_cells]
    (x0, y0, _, _), (_, _, x1, y1) = cell_bounds(cols[0], rows[-1]), cell_bounds(cols[-1], rows[0])
    return [x0, y0, x1, y1], f"EPSG:{cells[0][0]}"


def _finetune_and_predict(cfg: DemoConfig, labelled: str, encoder_uri: str, out: str) -> dict:
    """Fine-tune the pretrained encoder with a segmentation head on the labelled block's land-cover maps (Ray
    Train + DeepSpeed, the pretraining run layout), export encoder + head + class names as one file, and map its
    predictions over the block: a uint8 class map with a colour table and a preview."""
    from pipelines.common.storage import Storage
    from ray_jobs import export, finetune, predict

    storage = Storage()
    run = f"s3://{cfg.bucket}/runs/demo-seg"
    model = f"s3://{cfg.bucket}/models/demo-seg.safetensors"
    finetune.main(["--config", os.path.join(ROOT, "configs/finetune_synth_seg.yaml"), "--data.root", labelled,
                   "--model.init_from", encoder_uri, "--train.epochs", str(cfg.finetune_epochs),
                   "--run.storage_path", f"s3://{cfg.bucket}/runs", "--run.name", "demo-seg"]
                  + (["--data.max_samples", "16"] if cfg.fast else []))  # fmt: skip
    export.main(["--checkpoint", run, "--out", model])
    finetuned = os.path.join(out, "finetune")
    for name in ("metrics.jsonl", "curve.png", "report.json", "best.json"):
        if storage.exists(f"{run}/{name}"):
            storage.write_bytes(os.path.join(finetuned, name), storage.read_bytes(f"{run}/{name}"))
    bbox, crs = _block_bbox(cfg, labelled, storage)
    classes = os.path.join(out, "classes")
    predict.main(["--source", labelled, "--bbox", json.dumps(bbox), "--bbox_crs", crs,
                  "--time_start", cfg.area_time[0], "--time_end", cfg.area_time[1],
                  "--model_uri", model, "--out", classes, "--probabilities", "true"])  # fmt: skip
    return {"finetune_curve": os.path.join(finetuned, "curve.png"), "class_map": os.path.join(classes, "classes.tif")}


def _serve_and_embed(cfg: DemoConfig, catalog: str, encoder_uri: str, out: str) -> dict:
    """Serve the encoder and map a real place through it: an area_cells x area_cells-cell square at the centre
    of the real Sentinel-2 scene (Virginia coast: farmland, marsh, lagoon, sea) read through the STAC catalog."""
    from pipelines.common.local_s3 import free_port
    from pipelines.imagery.sample_catalog import sample_area
    from ray_jobs import embed_area
    from serve.app import ServeConfig
    from serve.app import run as serve_run

    area = sample_area(side_m=cfg.area_cells * 2560.0)
    port = free_port()
    serve_run(ServeConfig(model_uri=encoder_uri, port=port, min_replicas=1, max_replicas=1))
    url = f"http://127.0.0.1:{port}"
    print(f"endpoint {url} (model {encoder_uri})", flush=True)
    area_out = os.path.join(out, "area")
    embed_area.main(["--stac", catalog, "--collections", json.dumps({"sentinel2_l2a": "sentinel-2-l2a"}),
                     "--bbox", json.dumps(area["bbox"]), "--bbox_crs", area["crs"],
                     "--time_start", area["time_start"], "--time_end", area["time_end"],
                     "--model_uri", encoder_uri, "--engine", "serve", "--serve_url", url,
                     "--out", area_out])  # fmt: skip
    from ray import serve

    serve.shutdown()
    return {"area": area_out}


def _shutdown(server, keep: bool, out: str) -> None:
    try:
        import ray

        if ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(os.path.join(out, "seaweedfs"), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    cfg = _apply_fast(load_config(DemoConfig, argv, description=__doc__))
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
