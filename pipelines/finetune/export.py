"""Export a fine-tuning checkpoint as one model file (olmoearth-finetuned/1, olmoearth.checkpoint
save_finetuned): encoder + head weights (fp32, consolidated from any ZeRO stage), the encoder's config and
normalisation statistics, and the task (kind, class names, head, patch size, modalities, chip size), which
`olmoearth.load_finetuned` (prediction, serving) reads back.

    export_finetuned("s3://bucket/runs/seg", "s3://bucket/models/seg.safetensors", Storage())

`checkpoint` is a run folder (its best epoch's checkpoint, best.json; the newest complete one when the run
has no best yet) or one complete checkpoint folder. `olmoearth export` (ray_jobs/export.py) sends a
checkpoint here when its train_state.json says run_kind "finetune"."""

from __future__ import annotations

import json
import os
import tempfile

from olmoearth.checkpoint import STATE_FILE
from pipelines.common.storage import Storage, is_s3, join
from pipelines.finetune.state import best_checkpoint, is_finetune_state
from pipelines.pretrain.checkpoints import latest_checkpoint, resolve_checkpoint


def is_finetune_checkpoint(storage: Storage, uri: str) -> bool:
    """Whether `uri` is a fine-tuning checkpoint folder or run (its newest checkpoint's state says so)."""
    uri = uri.rstrip("/")
    state_uri = join(uri, STATE_FILE)
    if not storage.exists(state_uri):
        latest = latest_checkpoint(storage, uri)
        if latest is None:
            return False
        state_uri = join(latest, STATE_FILE)
    return is_finetune_state(json.loads(storage.read_text(state_uri)))


def finetune_checkpoint(storage: Storage, uri: str) -> str:
    """The checkpoint folder to export: `uri` itself if it is one (complete), else the run's best epoch."""
    uri = uri.rstrip("/")
    if storage.exists(join(uri, STATE_FILE)):
        return resolve_checkpoint(storage, uri)
    return best_checkpoint(storage, uri) or resolve_checkpoint(storage, uri)


def load_checkpoint_model(local: str):
    """(FineTunedModel with the checkpoint's fp32 weights, its train_state.json) of a local folder."""
    from olmoearth.checkpoint import consolidated_state_dict, load_weights
    from olmoearth.encoder import Encoder
    from olmoearth.finetuned import FineTunedModel, TaskSpec
    from olmoearth.modalities import NormStats
    from olmoearth.model import ModelConfig

    with open(os.path.join(local, STATE_FILE)) as fh:
        state = json.load(fh)
    if not is_finetune_state(state):
        raise ValueError(f"{local}: not a fine-tuning checkpoint ({STATE_FILE} has no run_kind 'finetune')")
    encoder = Encoder(ModelConfig.from_dict(state["encoder_config"]), NormStats.from_dict(state["norm_stats"]))
    model = FineTunedModel(encoder, TaskSpec.from_dict(state["task"]))
    load_weights(model, consolidated_state_dict(local), local)
    return model.eval(), state


def export_finetuned(checkpoint: str, out: str, storage: Storage) -> dict:
    """Write the fine-tuned model of `checkpoint` to `out` (.safetensors, local or s3://); returns a summary."""
    from olmoearth.checkpoint import save_finetuned

    ckpt = finetune_checkpoint(storage, checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        local = ckpt
        if is_s3(ckpt):
            local = os.path.join(tmp, "ckpt")
            storage.fs(ckpt).get(ckpt.rstrip("/") + "/", local, recursive=True)
        model, state = load_checkpoint_model(local)
        best = state.get("best") or {}
        meta = {"kind": "finetuned", "epoch": int(state["epoch"]), "step": int(state["step"]), "source": ckpt,
                "init_from": state["config"]["model"]["init_from"], "best": best}  # fmt: skip
        out_local = os.path.join(tmp, "model.safetensors")
        save_finetuned(model, out_local, extra_meta=meta)
        with open(out_local, "rb") as fh:
            storage.write_bytes(out, fh.read())
    return dict(meta, out=out, task=model.task.to_dict())
