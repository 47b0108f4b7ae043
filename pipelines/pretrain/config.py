"""The pretraining job's configuration: its sections, where a run lives, and `validate`, the one place where
the numbers that must agree are checked.

    cfg = load_config(PretrainConfig, argv)     # pipelines/common/config.py: YAML + --section.field flags
    grad_accum = validate(cfg)
    final_step(cfg)                             # where the run stops: train.stop_at_step or train.max_steps

The config object itself travels to the training workers (Ray pickles it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.common.storage import join
from pipelines.pretrain.engine import OptimConfig, grad_accum_steps, lr_factor_fn, resolve_precision
from pipelines.pretrain.stream import StreamConfig
from pipelines.pretrain.validation import check_patch_sizes


@dataclass
class ModelSection:
    size: str = "base"  # model size preset: nano | tiny | base | large
    # start a fresh run from these weights (anything olmoearth.load_model reads: an exported encoder, whose
    # decoder stays fresh; a whole-model file; an original v1 folder; a pretraining checkpoint), loaded
    # strictly (every shape that of `size`); a resumed run restores its checkpoint instead; "": none
    init_from: str = ""


@dataclass
class TrainSection:
    max_steps: int = 667_200  # optimiser steps of the schedule (the original: 300 epochs x 2,224 steps)
    # stop after this step, the lr schedule still that of max_steps (the v1 releases were taken mid-cosine);
    # 0: run to max_steps
    stop_at_step: int = 0
    global_batch_size: int = 512  # samples per optimiser step, all workers and microbatches together
    zero_stage: int = 2  # DeepSpeed ZeRO stage 1, 2 or 3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 3622  # seed of the model's initial weights (and of the probe's chip subset)
    log_every: int = 10  # steps between metrics rows
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the last K checkpoints are kept
    probe_every: int = 0  # steps between in-loop probes of the encoder (0: none)
    probe_uri: str = ""  # a labelled synthetic corpus (olmoearth synth --labelled) scored by the probe
    probe_max_chips: int = 256  # chips of the probe set, a seeded subset (0: all)
    # the probe task is pipelines.evaluation.synth_task.EUROSAT_LIKE (configs/eval_synth.yaml) with these two
    probe_chip_size: int = 32  # probe chip side, pixels
    probe_max_timesteps: int = 1  # timesteps per probe chip
    val_every: int = 0  # steps between validation losses on the held-out shards (data.val_shards; 0: none)
    # patch sizes of the validation batches: every held-out sample is cropped and masked once per size
    val_patch_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])
    val_max_samples: int = 0  # held-out 128 x 128 samples validated on, a seeded subset (0: all)


@dataclass
class ScalingSection:
    num_workers: int = 8  # Ray Train workers (one DeepSpeed rank each)
    use_gpu: bool = True  # workers train on GPUs (NCCL); false: on CPUs (gloo)
    cpus_per_worker: float = 1.0  # Ray CPUs reserved by each worker
    gpus_per_worker: float = 1.0  # Ray GPUs reserved by each worker (when use_gpu)
    threads_per_worker: int = 0  # torch intra-op threads per worker; 0 leaves Ray's default (its CPUs)
    normal_priority: bool = True  # run the training workers at niceness 0 (Ray starts workers at 15)


@dataclass
class RunSection:
    name: str = "olmoearth-pretrain"  # the run's name: a resubmitted name continues that run
    storage_path: str = "runs"  # local path or s3:// URI; the run lives in <storage_path>/<name>
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before giving up
    resume: bool = True  # a resubmitted name continues from its latest checkpoint


@dataclass
class PretrainConfig:
    """Latent MIM Lite pretraining with Ray Train + DeepSpeed."""

    model: ModelSection = field(default_factory=ModelSection)  # the model to train
    data: StreamConfig = field(default_factory=StreamConfig)  # the corpus stream
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and its schedule
    train: TrainSection = field(default_factory=TrainSection)  # steps, batch, ZeRO, logging, probe
    scaling: ScalingSection = field(default_factory=ScalingSection)  # workers and their resources
    run: RunSection = field(default_factory=RunSection)  # where the run lives, failures, resume


def run_uri(cfg: PretrainConfig) -> str:
    """The run's folder: checkpoints of all its attempts, metrics.jsonl, loss_curve.png."""
    return join(cfg.run.storage_path, cfg.run.name)


def micro_batch_size(cfg: PretrainConfig) -> int:
    """Samples per worker per forward/backward: the stream's batch (one collated batch per row)."""
    return int(cfg.data.batch_size)


def final_step(cfg: PretrainConfig) -> int:
    """The step the run ends at (its last checkpoint): train.stop_at_step when set, else train.max_steps."""
    return cfg.train.stop_at_step or cfg.train.max_steps


def validate(cfg: PretrainConfig) -> int:
    """Check the numbers that must agree; returns the gradient-accumulation steps."""
    t = cfg.train
    for name in ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, name) <= 0:
            raise ValueError(f"train.{name} must be > 0, got {getattr(t, name)}")
    if not 0 <= t.stop_at_step <= t.max_steps:
        raise ValueError(f"train.stop_at_step must lie in [0, train.max_steps={t.max_steps}] (0: run to "
                         f"max_steps), got {t.stop_at_step}")
    if cfg.scaling.num_workers <= 0:
        raise ValueError(f"scaling.num_workers must be > 0, got {cfg.scaling.num_workers}")
    resolve_precision(t.precision, cfg.scaling.use_gpu)
    lr_factor_fn(cfg.optim, t.max_steps)  # checks the warmup fits the run
    if t.zero_stage not in (1, 2, 3):
        raise ValueError(f"train.zero_stage must be 1, 2 or 3, got {t.zero_stage}")
    if t.val_every > 0:
        if cfg.data.val_shards <= 0:
            raise ValueError("train.val_every > 0 needs data.val_shards > 0 (the held-out validation shards)")
        check_patch_sizes(t.val_patch_sizes)
    if t.probe_every > 0 and not t.probe_uri:
        raise ValueError("train.probe_every > 0 needs train.probe_uri (a labelled synthetic corpus)")
    return grad_accum_steps(t.global_batch_size, micro_batch_size(cfg), cfg.scaling.num_workers)
