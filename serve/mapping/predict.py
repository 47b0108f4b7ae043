"""A fine-tuned model's predictions over a whole area as one georeferenced map (`olmoearth predict`): the area
job of embed_area.py with the model's head in place of the embedding.

    plan:     the area's 10 m UTM grid and tiles (serve/mapping/plan.py). Per-pixel tasks (segmentation,
              pixel_regression): overlapping tiles as for embeddings, snapped to the encoder's patch size, so the
              grid equals `olmoearth embed`'s over the same bbox. Scene tasks (classification, multilabel,
              regression): the grid snapped to the model's chip size and cut into chip-sized windows without
              overlap: one value per window, a coarse map of chip_size x 10 m pixels.
    predict:  the same Ray Data actor pool or Serve engine (serve/mapping/worker.py); each tile's result is its
              per-class probabilities or values, (S, S, K) per pixel or (1, 1, K) per window, in the same tile
              store (resumable per tile)
    assemble: the same streaming blend (serve/mapping/assemble.py): overlaps average the probabilities / values
              with the linear ramps, then classmap.py takes the argmax per pixel and writes the COGs, classes.json
              and preview.png; report.json accounts for every tile
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import replace

from pipelines.common.storage import Storage, join
from pipelines.imagery.grid import Grid, Tile
from serve.mapping.assemble import StreamingMosaic
from serve.mapping.embed_area import encode_and_assemble, make_report
from serve.mapping.plan import check_manifest, job_signature, make_source, plan, refuse_zones
from serve.mapping.predict_config import PredictConfig, resolve
from serve.mapping.tile_store import finished_tiles


class PredictionMosaic(StreamingMosaic):
    """The streaming blend at the map's resolution (1 px per-pixel, one chip per scene task) into a
    ClassMapWriter instead of the embedding MosaicWriter."""

    def __init__(self, cfg: PredictConfig, task, grid: Grid, tiles: list[Tile], storage: Storage, workdir: str):
        self.options, self.task = cfg, task
        # the blend works in map pixels: patch_size here is the map's pixel side in grid pixels
        blend_cfg = replace(cfg, patch_size=map_pixel(task), int8=False, preview_detile=False)
        super().__init__(blend_cfg, grid, tiles, storage, workdir)

    def _open_writer(self, dim: int) -> None:
        from serve.mapping.classmap import ClassMapWriter

        if dim != self.task.num_outputs:
            raise RuntimeError(f"tile results have {dim} values per pixel, the model {self.task.num_outputs} outputs")
        c = self.options
        tags = {"model": c.model_uri, "patch_size": c.patch_size, "tile_size": c.tile_size, "overlap": c.overlap}
        self.writer = ClassMapWriter(self.workdir, self.grid, self.p, self.task, c.probabilities,
                                     c.probabilities_dtype, c.preview, tags=tags, block=self.bt)  # fmt: skip


def map_pixel(task) -> int:
    """The map's pixel side in 10 m grid pixels: 1 for per-pixel tasks, the chip size for scene tasks."""
    return 1 if task.per_pixel else task.chip_size


def load_task(model_uri: str):
    """The TaskSpec of a fine-tuned model file (a CheckpointError naming the file for any other model)."""
    import olmoearth

    return olmoearth.load_finetuned(model_uri).task


def plan_area(cfg: PredictConfig, task) -> tuple[Grid, list[Tile]]:
    """Per-pixel tasks: the embedding job's grid and tiles; scene tasks: a grid of whole chips, one tile each."""
    return plan(cfg if task.per_pixel else replace(cfg, patch_size=task.chip_size))


def check_endpoint(cfg: PredictConfig, task) -> None:
    """engine=serve: the endpoint must host the same fine-tuned model (its /info task), else a ValueError."""
    import os

    import requests

    token = os.environ.get("OLMOEARTH_SERVE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = requests.get(f"{cfg.serve_url.rstrip('/')}/info", headers=headers, timeout=60)
    if r.status_code != 200:
        raise ValueError(f"serve_url: {cfg.serve_url}/info answered {r.status_code}: {r.text[:200]}")
    got = r.json().get("task")
    keys = ("kind", "class_names", "head", "patch_size", "chip_size")
    if got is None or {k: got.get(k) for k in keys} != {k: getattr(task, k) for k in keys}:
        raise ValueError(f"serve_url: {cfg.serve_url} does not host the fine-tuned model {cfg.model_uri} (its task: "
                         f"{got}); serve that file (olmoearth serve --model_uri ...) or use engine=ray_data")  # fmt: skip


def predict_area(cfg: PredictConfig) -> dict:
    """Run the whole job; returns the report (also written to out/report.json)."""
    task = load_task(cfg.model_uri)
    cfg = resolve(cfg, task)
    refuse_zones(cfg, "olmoearth predict")  # one class map per grid: an area across zones is refused, named
    if cfg.engine == "serve":
        check_endpoint(cfg, task)
    storage = Storage()
    t_start = time.time()
    grid, tiles = plan_area(cfg, task)
    source = make_source(cfg, storage, grid)  # finds and checks the input on the driver, before any work
    check_manifest(storage, cfg, {**job_signature(cfg, grid), "task": task.to_dict()})
    done = finished_tiles(storage, cfg.out)
    todo = [t for t in tiles if done.get(t.id, {}).get("status") != "ok"]
    workdir = tempfile.mkdtemp(prefix="olmoearth-predict-")
    # a STAC source ships its items to the workers partitioned by tile block, as for embeddings
    spec = source.spec(todo, grid) if getattr(source, "items", None) and todo else source.spec()
    try:
        mosaic = PredictionMosaic(cfg, task, grid, tiles, storage, workdir)
        rows, outputs, seconds = encode_and_assemble(cfg, storage, grid, tiles, todo, spec, done, workdir,
                                                     mosaic=mosaic, desc="predicting")  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = make_report(cfg, grid, tiles, todo, done, rows, outputs, seconds, t_start)
    pixel = map_pixel(task)
    report["task"] = task.to_dict()
    report["map"] = {"pixel_size_m": grid.resolution * pixel, "width": grid.width // pixel,
                     "height": grid.height // pixel, "per_pixel": task.per_pixel}  # fmt: skip
    t = len(source.months)
    if t != task.num_timesteps:
        report["warnings"] = [f"the model was fine-tuned on {task.num_timesteps} timestep(s); the source gives {t}"]
    storage.write_text(join(cfg.out, "report.json"), json.dumps(report, indent=1))
    return report
