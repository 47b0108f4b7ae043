"""`olmoearth eval`: kNN and linear probes of a frozen encoder (and its baselines) on a labelled dataset.

    olmoearth eval --config configs/eval_synth.yaml --checkpoint runs/x/encoder.safetensors
The logic lives in pipelines/evaluation/; this only parses the config and runs it."""

from __future__ import annotations

import sys

from pipelines.common.config import load_config
from pipelines.evaluation.run import EvalConfig, run_eval


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(EvalConfig, argv, description=__doc__)
    run_eval(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
