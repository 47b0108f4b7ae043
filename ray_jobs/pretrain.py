"""`olmoearth pretrain`: Latent MIM Lite pretraining with Ray Train + DeepSpeed.

    olmoearth pretrain --config configs/pretrain_nano_cpu.yaml [--train.max_steps 100 ...]
    ray job submit --working-dir . -- python ray_jobs/pretrain.py --config configs/pretrain_base_cluster.yaml

Resubmitting the same run.name continues from its latest checkpoint."""

from __future__ import annotations

import os
import sys

# The Ray Train API this job is written and tested against (Ray 2.60 defaults to V2); set before ray.train
# is imported, and inherited by the workers of a cluster started from this process.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    from pipelines.common.config import load_config
    from pipelines.pretrain.train import PretrainConfig, fit, run_uri

    cfg = load_config(PretrainConfig, argv, description=__doc__)
    fit(cfg)
    print(f"run: {run_uri(cfg)} (checkpoints, metrics.jsonl, loss_curve.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
