"""The fine-tuning job's configuration: the labelled data, the model to start from and its head, training,
the learning-rate schedule and where the run lives; `validate` is the one place its numbers are checked.

    cfg = load_config(FinetuneConfig, argv)     # pipelines/common/config.py: YAML + --section.field flags
    validate(cfg)

The config object itself travels to the training workers (Ray pickles it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.common.storage import join
from pipelines.finetune.data import FinetuneData
from pipelines.pretrain.engine import resolve_precision

SCHEDULES = ("original", "layer_decay")
# The validation metric each task kind is judged by when train.best_metric is "auto"; rmse is minimised.
DEFAULT_METRIC = {"classification": "accuracy", "multilabel": "map", "segmentation": "miou",
                  "regression": "rmse", "pixel_regression": "rmse"}  # fmt: skip
METRICS = {"classification": ("accuracy", "macro_f1", "loss"), "multilabel": ("map", "micro_f1", "loss"),
           "segmentation": ("miou", "pixel_accuracy", "loss"), "regression": ("rmse", "loss"),
           "pixel_regression": ("rmse", "loss")}  # fmt: skip
MINIMISED = ("rmse", "loss")


@dataclass
class ModelSection:
    # the encoder to start from: anything olmoearth.load reads (a pretraining checkpoint or run folder's
    # checkpoint, an exported encoder, an original v1 folder, random:<size>[:<seed>]); its normalisation
    # statistics come with it
    init_from: str = "random:nano"
    # the head: linear (scene tasks) | upsample | unet (per-pixel tasks); empty: linear for scene tasks,
    # upsample for per-pixel ones
    head: str = ""
    # stochastic depth of every encoder block while fine-tuning (< 0: the encoder's own rate, 0.1 for the v1
    # sizes); on a random or weakly trained encoder dropped blocks change the pooled features more than the
    # chip does, so 0 trains far steadier there
    drop_path: float = -1.0


@dataclass
class TrainSection:
    epochs: int = 50  # passes over the training split
    batch_size: int = 8  # samples per worker per optimiser step
    eval_batch_size: int = 16  # samples per worker per validation / test forward
    lr: float = 1e-4  # peak learning rate of the head (the backbone's follows the schedule)
    weight_decay: float = 0.01  # AdamW weight decay (never on frozen parameters)
    grad_clip: float = 1.0  # gradients clipped to this global norm
    class_weights: list[float] = field(default_factory=list)  # per-class loss weights, in class order (empty: 1)
    augment: bool = True  # random D4 transforms (flips, 90-degree rotations) of inputs and per-pixel labels
    # validation metric that picks the best checkpoint (auto: accuracy | map | miou | rmse by task kind;
    # or loss, macro_f1, micro_f1, pixel_accuracy where the task has it)
    best_metric: str = "auto"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    zero_stage: int = 2  # DeepSpeed ZeRO stage 1, 2 or 3
    seed: int = 0  # seed of the head's initial weights, the epoch order and the augmentations
    log_every: int = 10  # steps between progress reports to the driver (metrics rows are per epoch; 0: none)
    num_workers: int = 2  # Ray Train workers (one DeepSpeed rank each)
    use_gpu: bool = False  # workers train on GPUs (NCCL); false: on CPUs (gloo)
    cpus_per_worker: float = 1.0  # Ray CPUs reserved by each worker
    gpus_per_worker: float = 1.0  # Ray GPUs reserved by each worker (when use_gpu)
    threads_per_worker: int = 0  # torch intra-op threads per worker; 0 leaves Ray's default (its CPUs)
    # before each evaluation the head's input statistics (FeatureNorm) are recomputed from the eval-mode
    # features of up to this many of the epoch's train rows per worker (0: keep BatchNorm's running ones)
    recalibrate_rows: int = 128


@dataclass
class ScheduleSection:
    # original: backbone frozen for the first freeze_fraction of the epochs, then trained at lr x
    # unfreeze_factor, ReduceLROnPlateau on the validation metric; layer_decay: every epoch trains all,
    # block i of L at lr x decay^(L - i), embeddings at decay^(L + 1), head at lr, warmup then cosine
    kind: str = "original"
    freeze_fraction: float = 0.2  # original: share of the epochs with the backbone frozen (floor of epochs x it)
    unfreeze_factor: float = 0.1  # original: backbone lr = lr x this once unfrozen
    plateau_factor: float = 0.2  # original: every lr x this when the validation metric stops improving
    plateau_patience: int = 2  # original: epochs without improvement before the lr drops
    min_lr: float = 0.0  # original: no group's lr goes below this
    layer_decay: float = 0.65  # layer_decay: lr ratio between consecutive blocks
    warmup_epochs: int = 1  # layer_decay: linear warmup over these epochs (by step), then cosine
    final_lr_ratio: float = 0.01  # layer_decay: the cosine ends at this fraction of each group's lr


@dataclass
class RunSection:
    name: str = "olmoearth-finetune"  # the run's name: a resubmitted name continues that run
    storage_path: str = "runs"  # local path or s3:// URI; the run lives in <storage_path>/<name>
    keep_checkpoints: int = 2  # the last K epoch checkpoints are kept (and the best one besides)
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before giving up
    resume: bool = True  # a resubmitted name continues from its latest checkpoint


@dataclass
class FinetuneConfig:
    """Fine-tune an encoder and a task head on labelled data with Ray Train + DeepSpeed."""

    data: FinetuneData = field(default_factory=FinetuneData)  # the labelled dataset, its splits and chips
    model: ModelSection = field(default_factory=ModelSection)  # the encoder to start from and the head
    train: TrainSection = field(default_factory=TrainSection)  # epochs, batch, optimiser, workers
    schedule: ScheduleSection = field(default_factory=ScheduleSection)  # the learning-rate schedule
    run: RunSection = field(default_factory=RunSection)  # where the run lives, failures, resume


def run_uri(cfg: FinetuneConfig) -> str:
    """The run's folder: checkpoints of all its attempts, metrics.jsonl, curve.png, best.json, report.json."""
    return join(cfg.run.storage_path, cfg.run.name)


def frozen_epochs(cfg: FinetuneConfig) -> int:
    """Epochs the original schedule trains with the backbone frozen: floor(epochs x freeze_fraction)."""
    if cfg.schedule.kind != "original":
        return 0
    return int(cfg.train.epochs * cfg.schedule.freeze_fraction)


def best_metric(cfg: FinetuneConfig, kind: str) -> tuple[str, bool]:
    """(metric name, whether higher is better) of the best checkpoint for a task kind."""
    name = DEFAULT_METRIC[kind] if cfg.train.best_metric == "auto" else cfg.train.best_metric
    if name not in METRICS[kind]:
        raise ValueError(f"train.best_metric {name!r} is not a metric of a {kind} task; choose from "
                         f"{['auto', *METRICS[kind]]}")  # fmt: skip
    return name, name not in MINIMISED


def _check_positive(section, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ValueError(f"{prefix}.{name} must be > 0, got {getattr(section, name)}")


def validate(cfg: FinetuneConfig) -> None:
    """Check the settings that must agree before any worker starts; the messages name the field."""
    t, s = cfg.train, cfg.schedule
    _check_positive(t, "train", ("epochs", "batch_size", "eval_batch_size", "lr", "num_workers", "grad_clip"))
    _check_positive(cfg.run, "run", ("keep_checkpoints",))
    if t.log_every < 0:
        raise ValueError(f"train.log_every must be >= 0, got {t.log_every}")
    if t.recalibrate_rows < 0:
        raise ValueError(f"train.recalibrate_rows must be >= 0, got {t.recalibrate_rows}")
    if cfg.model.drop_path >= 1.0:
        raise ValueError(f"model.drop_path must be < 1 (negative: the encoder's own), got {cfg.model.drop_path}")
    if t.weight_decay < 0:
        raise ValueError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if t.zero_stage not in (1, 2, 3):
        raise ValueError(f"train.zero_stage must be 1, 2 or 3, got {t.zero_stage}")
    resolve_precision(t.precision, t.use_gpu)
    if any(w < 0 for w in t.class_weights):
        raise ValueError(f"train.class_weights must be >= 0, got {t.class_weights}")
    if s.kind not in SCHEDULES:
        raise ValueError(f"schedule.kind must be one of {SCHEDULES}, got {s.kind!r}")
    if not 0.0 <= s.freeze_fraction < 1.0:
        raise ValueError(f"schedule.freeze_fraction must lie in [0, 1), got {s.freeze_fraction}")
    for name in ("unfreeze_factor", "plateau_factor", "layer_decay"):
        if not 0.0 < getattr(s, name) <= 1.0:
            raise ValueError(f"schedule.{name} must lie in (0, 1], got {getattr(s, name)}")
    if s.plateau_patience < 0 or s.min_lr < 0 or not 0.0 <= s.final_lr_ratio <= 1.0:
        raise ValueError("schedule.plateau_patience and schedule.min_lr must be >= 0 and schedule.final_lr_ratio "
                         f"in [0, 1], got {s.plateau_patience}, {s.min_lr}, {s.final_lr_ratio}")
    if not 0 <= s.warmup_epochs < t.epochs:
        raise ValueError(f"schedule.warmup_epochs must lie in [0, train.epochs={t.epochs}), got {s.warmup_epochs}")
    if t.best_metric != "auto" and t.best_metric not in {m for ms in METRICS.values() for m in ms}:
        raise ValueError(f"train.best_metric {t.best_metric!r} is no metric of any task kind")
    if not cfg.model.init_from:
        raise ValueError("model.init_from is required (random:<size> for a randomly initialised encoder)")
