"""The DeepSpeed engine's settings for pretraining: ZeRO stage, precision, batch arithmetic, AdamW, gradient
clipping, and the learning-rate schedule (linear warmup from 0, cosine decay to 0.1 x peak, as the original's
OLMo-core `CosWithWarmup`).

    ds = deepspeed_config(OptimConfig(), zero_stage=2, micro_batch=4, world_size=2, grad_accum=2, use_gpu=False,
                          precision="fp32")
    engine, *_ = deepspeed.initialize(model=m, model_parameters=trainable, config=ds,
                                      lr_scheduler=lambda opt: LambdaLR(opt, lr_factor_fn(cfg, max_steps)))
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass


@dataclass
class OptimConfig:
    """AdamW and its schedule (defaults: the original's Base recipe)."""

    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.02  # AdamW weight decay
    # false: the original's one group, weight decay on every trainable parameter (biases, norms, channel
    # embeddings and mask token included); true: none on those (the common ViT practice)
    exempt_norms_and_biases: bool = False
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    warmup_steps: int = 8000  # linear warmup from 0 to lr
    final_lr_ratio: float = 0.1  # cosine decays to this fraction of lr at max_steps
    grad_clip: float = 1.0  # gradients clipped to this global norm
    fused: str = "auto"  # fused AdamW kernel: "auto" (on GPU), "true", "false"


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """"auto" means bf16 on GPU and fp32 on CPU; bf16 on CPU is allowed when asked for (the rule's owner:
    olmoearth.precision, which serving uses too)."""
    from olmoearth.precision import resolve_precision as resolve

    return resolve(precision, "cuda" if use_gpu else "cpu", field="train.precision")


def lr_factor(step: int, warmup_steps: int, max_steps: int, final_ratio: float) -> float:
    """Multiplier of the peak lr before optimiser step `step` (0-based): linear warmup 0 -> 1 over
    warmup_steps, then half a cosine from 1 down to final_ratio at max_steps, flat afterwards."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor_fn(optim: OptimConfig, max_steps: int):
    """The schedule as a function of the step, for torch's LambdaLR (which DeepSpeed steps once per
    optimiser step and saves in its checkpoints)."""
    if not 0 <= optim.warmup_steps < max_steps:
        raise ValueError(f"optim.warmup_steps={optim.warmup_steps} must be >= 0 and below train.max_steps={max_steps}")

    def factor(step: int) -> float:
        return lr_factor(step, optim.warmup_steps, max_steps, optim.final_lr_ratio)

    return factor


def torch_extensions_dir() -> str:
    """Where DeepSpeed caches the ops it compiles at start-up (on CPU: its shared-memory all-reduce), one
    folder per Python environment. torch's default (~/.cache/torch_extensions/py311_cpu) is shared by all of
    a user's environments; the build command names the environment's paths, so a run from another checkout
    or venv (a clean-clone CI, say) rewrites it and the next run here compiles the op again, which costs
    every worker start-up a compilation."""
    env = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", f"env-{env}")


def use_own_torch_extensions_dir() -> None:
    """Point torch's JIT builds at this environment's own cache (an explicit TORCH_EXTENSIONS_DIR wins); call
    before DeepSpeed initialises in the process."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Microbatches per worker per optimiser step; the global batch must split evenly."""
    per_step = micro_batch * world_size
    if global_batch <= 0 or micro_batch <= 0:
        raise ValueError(f"train.global_batch_size ({global_batch}) and the micro batch ({micro_batch}) must be > 0")
    if global_batch % per_step:
        raise ValueError(
            f"train.global_batch_size={global_batch} is not a multiple of micro batch {micro_batch} x "
            f"{world_size} workers = {per_step}"
        )
    return global_batch // per_step


def deepspeed_config(
    optim: OptimConfig,
    zero_stage: int,
    micro_batch: int,
    world_size: int,
    grad_accum: int,
    use_gpu: bool,
    precision: str = "auto",
) -> dict:
    """The DeepSpeed JSON config as a dict. The optimiser is torch's AdamW built by DeepSpeed
    (`torch_adam`), which works under ZeRO 1-3 on CPU and GPU without compiling an op; on GPU it runs
    torch's fused kernel. Gradients are clipped by global norm."""
    if zero_stage not in (1, 2, 3):
        raise ValueError(f"train.zero_stage must be 1, 2 or 3, got {zero_stage}")
    precision = resolve_precision(precision, use_gpu)
    if optim.fused not in ("auto", "true", "false"):
        raise ValueError(f"optim.fused must be auto, true or false, got {optim.fused!r}")
    fused = use_gpu if optim.fused == "auto" else optim.fused == "true"
    adamw = {
        "lr": optim.lr,
        "betas": [optim.beta1, optim.beta2],
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
        "torch_adam": True,
    }
    if fused:
        adamw["fused"] = True
    # ZeRO 1/2 on CPU: no contiguous gradient buffer. With it, each parameter's backward hook copies its
    # gradient into a bucket and the epilogue copies it again into the partition buffer; without it the
    # gradients are flattened once at the reduction (ZeRO-1 then needs no per-parameter hooks at all), a
    # good part of DeepSpeed's per-step cost on CPU. The buffer only avoids memory fragmentation, which
    # matters on GPU (kept there); it is not in the checkpoints. ZeRO-3 has its own gradient path: unchanged.
    contiguous = use_gpu or zero_stage == 3
    zero: dict = {"stage": zero_stage, "contiguous_gradients": contiguous, "overlap_comm": use_gpu}
    if zero_stage == 3:
        # consolidated 16-bit weights on save, so an inference copy can be written without zero_to_fp32
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": micro_batch * world_size * grad_accum,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": adamw},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own metrics log replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
