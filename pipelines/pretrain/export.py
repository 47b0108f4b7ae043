"""Export a pretraining checkpoint's encoder as the one safetensors file that serving and evaluation load:
weights (fp32, consolidated from any ZeRO stage), the model size, the normalisation statistics the run
trained with (train_state.json: the published ones or the corpus's, `data.norm_stats`) and the modality
config (read by `olmoearth.load_model`, written by `olmoearth.checkpoint.save_encoder`).

    export_encoder("s3://bucket/runs/x", "s3://bucket/models/x.safetensors", Storage())

`checkpoint` is one complete checkpoint folder or a whole run (its newest complete checkpoint; the incomplete
ones passed over are named in a warning and in the summary's `incomplete_skipped`).
When the checkpoint holds the final step's reference batch and embedding, the exported encoder must
reproduce them (else the export is refused)."""

from __future__ import annotations

import json
import os
import tempfile

import torch

from olmoearth.checkpoint import REFERENCE_FILE, STATE_FILE
from pipelines.common.storage import Storage, is_s3
from pipelines.pretrain.checkpoints import resolve_checkpoint, scan_checkpoints


def _download(storage: Storage, uri: str, local: str) -> str:
    if not is_s3(uri):
        return uri
    fs = storage.fs(uri)
    fs.get(uri.rstrip("/") + "/", local, recursive=True)
    return local


def _check_reference(ref_path: str, exported: str, verify_atol: float, ckpt: str) -> float:
    """Max |diff| of the exported encoder's embedding of the reference batch; refuses a mismatch."""
    from olmoearth import encode
    from olmoearth.checkpoint import load_encoder

    ref = torch.load(ref_path, weights_only=True)  # tensors and plain values: no pickled code from run storage
    emb = encode(load_encoder(exported), ref["x"], ref["months"], ref["patch_size"])
    diff = float((emb.pooled - ref["pooled"]).abs().max())
    # bf16 training: the in-training encoder ran in bf16, the export holds the fp32 master weights
    tol = verify_atol if ref["precision"] == "float32" else 0.05 * float(ref["pooled"].abs().max())
    if not diff <= tol:
        raise ValueError(f"exported encoder does not reproduce the training encoder's reference output "
                         f"(max |diff| {diff:.3g} > {tol:.3g}); checkpoint {ckpt}")
    return diff


def export_encoder(checkpoint: str, out: str, storage: Storage, verify_atol: float = 1e-4) -> dict:
    """Write the encoder of `checkpoint` to `out` (.safetensors); returns a summary dict."""
    from olmoearth import load_model
    from olmoearth.checkpoint import save_encoder
    from pipelines.corpus.shards import load_norm_stats

    ckpt = resolve_checkpoint(storage, checkpoint)  # complete; a run folder's newest complete one
    skipped = [] if ckpt == checkpoint.rstrip("/") else scan_checkpoints(storage, checkpoint)[1]
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(storage, ckpt, os.path.join(tmp, "ckpt"))
        with open(os.path.join(local, STATE_FILE)) as fh:
            state = json.load(fh)
        size, corpus = state["config"]["model"]["size"], state["config"]["data"]["shards_uri"]
        encoder = load_model(local).encoder
        # which statistics: a checkpoint written before the choice existed trained with the corpus's
        choice = state["config"]["data"].get("norm_stats", "corpus")
        if "norm_stats" not in state:  # a checkpoint written before train_state.json held the statistics
            encoder.norm_stats = load_norm_stats(corpus, storage)
        meta = {"size": size, "step": int(state["step"]), "source": ckpt, "corpus": corpus, "norm_stats": choice}
        out_local = os.path.join(tmp, "encoder.safetensors")
        save_encoder(encoder, out_local, extra_meta=meta)
        summary = dict(meta, out=out, incomplete_skipped=[list(s) for s in skipped])
        ref_path = os.path.join(local, REFERENCE_FILE)
        if os.path.exists(ref_path):
            summary["reference_max_abs_diff"] = _check_reference(ref_path, out_local, verify_atol, ckpt)
        with open(out_local, "rb") as fh:
            storage.write_bytes(out, fh.read())
    return summary
