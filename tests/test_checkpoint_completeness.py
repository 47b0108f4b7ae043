"""A pretraining checkpoint counts only when complete (every rank's completeness manifest, every file it lists
with its size): listing, resume and export skip incomplete ones and say why; files from run storage are
loaded without unpickling code (no Ray, no training: folders laid out as the loop writes them)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile

import pytest
import torch

from olmoearth.checkpoint import DS_TAG, STATE_FILE
from pipelines.common.storage import Storage, join
from pipelines.pretrain.checkpoints import (
    list_checkpoints,
    resolve_checkpoint,
    resume_checkpoint,
    scan_checkpoints,
    write_completeness,
)

OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


def _checkpoint(folder: str, step: int, world: int = 2) -> str:
    """A checkpoint folder as the loop leaves it on storage: each rank's local part (its DeepSpeed shard;
    rank 0 also the model states and train_state.json) with its completeness manifest, merged."""
    for rank in range(world):
        part = tempfile.mkdtemp(prefix=f"rank{rank}-")
        files = {f"{DS_TAG}/{OPTIM.format(rank)}": b"o" * (100 + rank)}
        if rank == 0:
            files |= {f"{DS_TAG}/mp_rank_00_model_states.pt": b"m" * 50, f"{DS_TAG}/latest": b"ds",
                      STATE_FILE: json.dumps({"step": step, "world_size": world}).encode()}  # fmt: skip
        for rel, data in files.items():
            Storage().write_bytes(os.path.join(part, rel), data)
        write_completeness(part, rank)
        for dirpath, _, names in os.walk(part):  # Ray uploads every rank's folder into the one checkpoint
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), part)
                os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
                os.replace(os.path.join(dirpath, name), os.path.join(folder, rel))
    return folder


def test_incomplete_checkpoints_are_skipped_named_and_never_resumed_from(tmp_path, caplog):
    run = str(tmp_path / "run")
    ok = _checkpoint(join(run, "TorchTrainer_a", "checkpoint_000000"), 5)
    no_shard = _checkpoint(join(run, "TorchTrainer_a", "checkpoint_000001"), 10)
    os.remove(join(no_shard, DS_TAG, OPTIM.format(1)))  # an optimiser shard deleted
    cut = join(run, "TorchTrainer_b", "checkpoint_000000")  # the upload stopped after train_state.json
    Storage().write_text(join(cut, STATE_FILE), json.dumps({"step": 15, "world_size": 2}))
    short = _checkpoint(join(run, "TorchTrainer_b", "checkpoint_000001"), 20)
    with open(join(short, DS_TAG, OPTIM.format(0)), "r+b") as fh:
        fh.truncate(10)
    with caplog.at_level(logging.WARNING):
        assert list_checkpoints(Storage(), run) == [(5, ok)]
    for folder in (no_shard, cut, short):
        assert f"skipping incomplete checkpoint {folder}" in caplog.text
    _, incomplete = scan_checkpoints(Storage(), run)
    why = dict(incomplete)
    assert f"{DS_TAG}/{OPTIM.format(1)} is missing (listed in complete.1.json)" in why[no_shard]
    assert why[cut].startswith("no complete.0.json")
    assert "has 10 bytes, complete.0.json lists 100" in why[short]
    # export: a run folder gives its newest complete checkpoint, an incomplete folder is refused
    assert resolve_checkpoint(Storage(), run) == ok
    with pytest.raises(ValueError, match="incomplete checkpoint .*optim_states.pt is missing"):
        resolve_checkpoint(Storage(), no_shard)
    # resume: the checkpoint Ray hands over is checked; an incomplete one gives way to the newest complete one
    assert resume_checkpoint(Storage(), run, ok) == ok
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(Storage(), run, short) == ok
    assert f"not resuming from incomplete checkpoint {short}" in caplog.text and f"resuming from {ok}" in caplog.text
    os.remove(join(ok, "complete.1.json"))
    assert resume_checkpoint(Storage(), run, short) is None  # nothing complete: start afresh


class _Payload:
    """A pickle that runs code when loaded: it creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_files_from_run_storage_are_loaded_without_running_pickled_code(tmp_path):
    from olmoearth.checkpoint import consolidated_state_dict
    from pipelines.pretrain.export import _check_reference

    touched = str(tmp_path / "pwned")
    ref = str(tmp_path / "reference.pt")
    torch.save({"x": _Payload(touched), "precision": "float32"}, ref)
    with pytest.raises(pickle.UnpicklingError):
        _check_reference(ref, str(tmp_path / "enc.safetensors"), 1e-4, str(tmp_path))
    os.makedirs(tmp_path / "ck" / DS_TAG)
    torch.save({"module": {"w": torch.ones(2)}, "evil": _Payload(touched)},
               str(tmp_path / "ck" / DS_TAG / "mp_rank_00_model_states.pt"))  # fmt: skip
    with pytest.raises(pickle.UnpicklingError):
        consolidated_state_dict(str(tmp_path / "ck"))
    assert not os.path.exists(touched)
