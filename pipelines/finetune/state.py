"""What a fine-tuning checkpoint records beside the DeepSpeed files: the pretraining run layout's
train_state.json (pipelines/pretrain/checkpoints.py TrainState: step, epoch, history, resumes, world size,
config, normalisation statistics) plus the task, the encoder's architecture, the plateau scheduler and the
best epoch so far. `run_kind: "finetune"` tells export (and anyone reading the folder) which kind it is.

    <storage_path>/<name>/
        TorchTrainer_<trial>/checkpoint_00000N/     one per epoch (ds/, train_state.json, complete.<rank>.json)
        metrics.jsonl, curve.png                    one row per epoch, rewritten at each checkpoint
        best.json                                   the best epoch by the chosen validation metric
        report.json                                 data counts (used / skipped per split with reasons), results
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipelines.common.storage import Storage, join
from pipelines.pretrain.checkpoints import TrainState, list_checkpoints

RUN_KIND = "finetune"
BEST_FILE = "best.json"
REPORT_FILE = "report.json"
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "curve.png"


@dataclass
class FinetuneState(TrainState):
    plateau: dict = field(default_factory=dict)  # schedule.Plateau as a dict
    best: dict = field(default_factory=dict)  # {"metric", "value", "epoch", "step"} of the best epoch so far

    def to_json(self, cfg, world_size: int, norm_stats, task: dict | None = None,
                encoder_config: dict | None = None) -> str:
        out = json.loads(super().to_json(cfg, world_size, norm_stats))
        out.update(run_kind=RUN_KIND, task=task or {}, encoder_config=encoder_config or {})
        return json.dumps(out)


def is_finetune_state(state: dict) -> bool:
    return state.get("run_kind") == RUN_KIND


def write_records(storage: Storage, run: str, history: list[dict], best: dict) -> None:
    """metrics.jsonl, curve.png and best.json of the run, rewritten whole from the rows so far."""
    from pipelines.finetune.curve import curve_png

    storage.write_text(join(run, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in history))
    if history:
        storage.write_bytes(join(run, CURVE_FILE), curve_png(history, title=run.rstrip("/").rsplit("/", 1)[-1]))
    if best:
        storage.write_text(join(run, BEST_FILE), json.dumps(best, indent=2))


def best_checkpoint(storage: Storage, run: str) -> str | None:
    """The checkpoint folder of the run's best epoch (best.json's step; the newest such when repeated)."""
    try:
        best = json.loads(storage.read_text(join(run, BEST_FILE)))
    except FileNotFoundError:
        return None
    found = [uri for step, uri in list_checkpoints(storage, run) if step == best.get("step")]
    return found[-1] if found else None
