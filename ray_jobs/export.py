"""`olmoearth export --checkpoint URI --out URI`: the encoder of a pretraining checkpoint (or of a run's
latest checkpoint) as one safetensors file with its normalisation statistics and modality config, the
format that serving and evaluation load."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass


@dataclass
class ExportConfig:
    """Export a pretrained encoder."""

    checkpoint: str = ""  # a checkpoint folder (with train_state.json) or a run folder
    out: str = ""  # the .safetensors file to write (local path or s3:// URI)
    verify_atol: float = 1e-4  # max |diff| allowed against the run's final reference embedding


def main(argv: list[str] | None = None) -> int:
    from pipelines.common.config import load_config
    from pipelines.common.storage import Storage
    from pipelines.pretrain.export import export_encoder

    cfg = load_config(ExportConfig, argv, description=__doc__)
    if not cfg.checkpoint or not cfg.out:
        raise SystemExit("olmoearth export: --checkpoint and --out are required")
    summary = export_encoder(cfg.checkpoint, cfg.out, Storage(), cfg.verify_atol)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
