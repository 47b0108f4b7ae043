"""`olmoearth export --checkpoint URI --out URI`: one model file from a training run.

- a pretraining checkpoint (or a run's latest checkpoint): its encoder as one safetensors file with its
  normalisation statistics and modality config, the format that serving and evaluation load;
- a fine-tuning checkpoint (or a fine-tuning run: its best epoch): the fine-tuned model, encoder + head +
  task (class names), which `olmoearth.load_finetuned`, `olmoearth predict` and serving load.

The checkpoint's train_state.json says which it is."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass


@dataclass
class ExportConfig:
    """Export a pretrained encoder."""

    checkpoint: str = ""  # a checkpoint folder (with train_state.json) or a run folder (pretraining or fine-tuning)
    out: str = ""  # the .safetensors file to write (local path or s3:// URI)
    verify_atol: float = 1e-4  # pretraining: max |diff| allowed against the run's final reference embedding
    onnx: str = ""  # write the encoder of --model as ONNX to this file instead (olmoearth/onnx_export.py)
    model: str = ""  # --onnx: the encoder, any source olmoearth.load takes (default: --checkpoint)
    onnx_modalities: str = "sentinel2_l2a"  # --onnx: comma-separated input modalities, the graph's inputs in order
    onnx_tile: int = 64  # --onnx: input H = W in px
    onnx_timesteps: int = 12  # --onnx: input timesteps T
    onnx_patch_size: int = 4  # --onnx: patch size p
    onnx_batch: int = 1  # --onnx: batch size B of the graph


def main(argv: list[str] | None = None) -> int:
    from pipelines.common.config import load_config
    from pipelines.common.storage import Storage
    from pipelines.finetune.export import export_finetuned, is_finetune_checkpoint
    from pipelines.pretrain.export import export_encoder

    cfg = load_config(ExportConfig, argv, description=__doc__)
    if cfg.onnx:
        return export_onnx_file(cfg)
    if not cfg.checkpoint or not cfg.out:
        raise SystemExit("olmoearth export: --checkpoint and --out are required")
    storage = Storage()
    if is_finetune_checkpoint(storage, cfg.checkpoint):
        summary = export_finetuned(cfg.checkpoint, cfg.out, storage)
    else:
        summary = export_encoder(cfg.checkpoint, cfg.out, storage, cfg.verify_atol)
    print(json.dumps(summary))
    return 0


def export_onnx_file(cfg: ExportConfig) -> int:
    """--onnx: the encoder for one input signature, checked against PyTorch with onnxruntime when installed."""
    import olmoearth
    from olmoearth.onnx_export import OnnxSignature, check_onnx, export_onnx
    from pipelines.common.storage import Storage

    source = cfg.model or cfg.checkpoint
    if not source:
        raise SystemExit("olmoearth export --onnx: --model (or --checkpoint) is required")
    sig = OnnxSignature(tuple(m.strip() for m in cfg.onnx_modalities.split(",") if m.strip()), cfg.onnx_tile,
                        cfg.onnx_timesteps, cfg.onnx_patch_size, cfg.onnx_batch)  # fmt: skip
    encoder = olmoearth.load(source)
    try:
        sig.check(encoder)
    except ValueError as e:  # a bad signature flag: its message names it, without a traceback
        raise SystemExit(str(e)) from None
    data = export_onnx(encoder, sig)
    summary = {"onnx": cfg.onnx, "bytes": len(data), **check_onnx(encoder, sig, data, cfg.verify_atol)}
    Storage().write_bytes(cfg.onnx, data)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
