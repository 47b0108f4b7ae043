"""Fault injection for tests, kept out of every product config.

A test sets one environment variable in the driver before calling a job:

    OLMOEARTH_FAULTS='{"train_step": 10, "embed_tiles": ["r0002_c0003"]}'

The job reads the plan once in the driver (`fault_plan()`) and hands it to its workers beside its config
(workers of a shared Ray cluster do not see variables set after they started); the code under test asks
`plan.get(name)` at the point where the fault belongs. Without the variable the plan is empty and costs
nothing.
"""

from __future__ import annotations

import json
import os

FAULTS_ENV = "OLMOEARTH_FAULTS"

# The faults the code knows, and where each one fires.
KNOWN = {
    "train_step": "the last training worker raises at this optimiser step (fresh start only)",
    "embed_tiles": "these tile ids raise in the area job's encoder workers",
    "materialize_cells": "these cell ids raise in the materialisation task after writing their first file",
}


def fault_plan() -> dict:
    """The plan of this process's environment: {fault name: value}; {} when none is set."""
    text = os.environ.get(FAULTS_ENV, "").strip()
    if not text:
        return {}
    try:
        plan = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{FAULTS_ENV} is not JSON: {e}") from None
    if not isinstance(plan, dict):
        raise ValueError(f"{FAULTS_ENV} must be a JSON object of fault names, got {type(plan).__name__}")
    unknown = sorted(set(plan) - set(KNOWN))
    if unknown:
        raise ValueError(f"{FAULTS_ENV}: unknown faults {unknown}; known: {sorted(KNOWN)}")
    return plan
