"""Export a pretraining checkpoint's encoder as the one safetensors file that serving and evaluation load:
weights (fp32, consolidated from any ZeRO stage), the model size, the corpus's normalisation statistics and
the modality config (written by `olmoearth.checkpoint.save_encoder`).

    export_encoder("s3://bucket/runs/x", "s3://bucket/models/x.safetensors", Storage(endpoint))

`checkpoint` is one checkpoint folder (holding train_state.json) or a whole run (its latest checkpoint).
When the checkpoint holds the final step's reference batch and embedding, the exported encoder must
reproduce them (else the export is refused)."""

from __future__ import annotations

import json
import os
import tempfile

import torch

from olmoearth.checkpoint import REFERENCE_FILE, STATE_FILE, consolidated_state_dict
from pipelines.common.storage import Storage, is_s3, join
from pipelines.pretrain.train import PretrainConfig, latest_checkpoint


def resolve_checkpoint(storage: Storage, uri: str) -> str:
    """A checkpoint folder URI from either a checkpoint folder or a run folder."""
    uri = uri.rstrip("/")
    if storage.exists(join(uri, STATE_FILE)):
        return uri
    latest = latest_checkpoint(storage, uri)
    if latest is None:
        raise FileNotFoundError(f"no pretraining checkpoint (folder with {STATE_FILE}) at or under {uri}")
    return latest


def _download(storage: Storage, uri: str, local: str) -> str:
    if not is_s3(uri):
        return uri
    fs = storage.fs(uri)
    fs.get(uri.rstrip("/") + "/", local, recursive=True)
    return local


def export_encoder(checkpoint: str, out: str, storage: Storage, verify_atol: float = 1e-4) -> dict:
    """Write the encoder of `checkpoint` to `out` (.safetensors); returns a summary dict."""
    from olmoearth import build_model, encode
    from olmoearth.checkpoint import load_encoder, save_encoder
    from pipelines.pretrain.stream import load_norm_stats

    ckpt = resolve_checkpoint(storage, checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(storage, ckpt, os.path.join(tmp, "ckpt"))
        with open(os.path.join(local, STATE_FILE)) as fh:
            state = json.load(fh)
        from pipelines.common.config import from_dict

        cfg = from_dict(PretrainConfig, state["config"])
        model = build_model(cfg.model.size)
        missing, unexpected = model.load_state_dict(consolidated_state_dict(local), strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {ckpt} does not match a {cfg.model.size} model: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        encoder = model.encoder
        encoder.norm_stats = load_norm_stats(cfg.data.shards_uri, storage)
        meta = {"size": cfg.model.size, "step": int(state["step"]), "source": ckpt,
                "corpus": cfg.data.shards_uri}
        out_local = os.path.join(tmp, "encoder.safetensors")
        save_encoder(encoder, out_local, extra_meta=meta)

        summary = dict(meta, out=out)
        ref_path = os.path.join(local, REFERENCE_FILE)
        if os.path.exists(ref_path):
            ref = torch.load(ref_path, weights_only=False)
            loaded = load_encoder(out_local)
            emb = encode(loaded, ref["x"], ref["months"], ref["patch_size"])
            diff = float((emb.pooled - ref["pooled"]).abs().max())
            # bf16 training: the in-training encoder ran in bf16, the export holds the fp32 master weights
            tol = verify_atol if ref["precision"] == "float32" else 0.05 * float(ref["pooled"].abs().max())
            summary["reference_max_abs_diff"] = diff
            if not diff <= tol:
                raise ValueError(f"exported encoder does not reproduce the training encoder's reference output "
                                 f"(max |diff| {diff:.3g} > {tol:.3g}); checkpoint {ckpt}")
        with open(out_local, "rb") as fh:
            storage.write_bytes(out, fh.read())
    return summary
