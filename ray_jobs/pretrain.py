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
    from pipelines.pretrain.config import PretrainConfig, run_uri
    from pipelines.pretrain.job import fit

    cfg = load_config(PretrainConfig, argv, description=__doc__)
    probe = None
    if cfg.train.probe_every > 0 and cfg.train.probe_uri:  # (no probe_uri: fit says what is missing)
        from pipelines.evaluation.hook import make_probe

        t = cfg.train
        probe = make_probe(t.probe_uri, t.probe_chip_size, t.probe_max_timesteps, t.probe_max_chips, t.seed)
    fit(cfg, probe=probe)
    print(f"run: {run_uri(cfg)} (checkpoints, metrics.jsonl, loss_curve.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
