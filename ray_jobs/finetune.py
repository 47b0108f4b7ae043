"""`olmoearth finetune`: fine-tune an encoder and a task head on labelled data with Ray Train + DeepSpeed.

    olmoearth finetune --config configs/finetune_synth_seg.yaml --data.root s3://bucket/labelled \
        --model.init_from s3://bucket/models/nano.safetensors --run.storage_path s3://bucket/runs
    ray job submit --working-dir . -- python ray_jobs/finetune.py --config configs/finetune_bigearthnet.yaml

The run folder holds the epoch checkpoints, metrics.jsonl, curve.png, best.json and report.json;
`olmoearth export --checkpoint <run> --out model.safetensors` writes its best epoch as one model file.
Resubmitting the same run.name continues from its latest checkpoint."""

from __future__ import annotations

import os
import sys

# The Ray Train API this job is written and tested against (as ray_jobs/pretrain.py)
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    from pipelines.common.config import load_config
    from pipelines.finetune.config import FinetuneConfig, run_uri
    from pipelines.finetune.job import fit

    cfg = load_config(FinetuneConfig, argv, description=__doc__)
    fit(cfg)
    print(f"run: {run_uri(cfg)} (checkpoints, metrics.jsonl, curve.png, best.json, report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
