"""What a training worker sets up before its loop and keeps beside it: its process priority, the DeepSpeed
engine over the model, the model's FLOP shape, and the reference output saved with the final checkpoint.
The bench builds its in-process engine with `build_engine` too, so both run the same DeepSpeed setup."""

from __future__ import annotations

import os

import torch

from pipelines.pretrain.config import PretrainConfig, micro_batch_size
from pipelines.pretrain.engine import deepspeed_config, lr_factor_fn, use_own_torch_extensions_dir
from pipelines.pretrain.throughput import ModelShape


def normal_priority() -> bool:
    """Set every thread of this process to niceness 0. Ray starts its worker processes at niceness 15
    (RAY_worker_niceness), so on a node shared with other work the training workers would yield the CPU to
    any normal-priority process. Lowering a niceness needs CAP_SYS_NICE (root): without it nothing changes.
    Returns whether the calling thread now runs at niceness 0."""
    tids = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tids:  # on Linux the niceness is per thread; threads started later inherit their creator's
        try:
            if os.getpriority(os.PRIO_PROCESS, int(tid)) > 0:
                os.setpriority(os.PRIO_PROCESS, int(tid), 0)
        except ProcessLookupError:  # the thread has ended
            continue
        except PermissionError:
            break
    return os.getpriority(os.PRIO_PROCESS, 0) == 0


def build_engine(cfg: PretrainConfig, model, world_size: int, grad_accum: int, use_gpu: bool, precision: str):
    """The DeepSpeed engine over the model's trainable groups (the frozen target projection is not in them),
    with the config's ZeRO stage, AdamW, clipping and schedule."""
    import deepspeed

    use_own_torch_extensions_dir()  # before DeepSpeed compiles its ops
    ds_config = deepspeed_config(cfg.optim, cfg.train.zero_stage, micro_batch_size(cfg), world_size, grad_accum,
                                 use_gpu, precision)  # fmt: skip
    schedule = lr_factor_fn(cfg.optim, cfg.train.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.param_groups(cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )  # fmt: skip
    return engine


def model_shape(model) -> ModelShape:
    """The sizes that set the FLOPs of a step, from the model's own config."""
    c = model.config
    return ModelShape(enc_dim=c.encoder_dim, enc_depth=c.encoder_depth, dec_dim=c.decoder_dim,
                      dec_depth=c.decoder_depth, mlp_ratio=float(c.mlp_ratio))


def autocast(dtype: torch.dtype):
    """bf16 autocast when training runs in bf16 (the in-training encoder is called as it trains)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def reference_output(encoder, batch: dict, dtype: torch.dtype, max_samples: int = 2) -> dict:
    """A reference input (a few samples of a training batch, de-normalised to raw units with the corpus
    statistics) and what `olmoearth.encode` gives for it with the in-training encoder. Saved with the final
    checkpoint; `export` checks that the exported encoder reproduces it."""
    from olmoearth import encode
    from olmoearth.modalities import MODALITIES

    stats = encoder.norm_stats
    x = {}
    for name, v in batch["x"].items():
        if MODALITIES[name].encoder_input:
            lo, hi = (torch.as_tensor(a, dtype=torch.float32) for a in (stats.lo[name], stats.hi[name]))
            x[name] = v[:max_samples].float().cpu() * (hi - lo) + lo  # (b, H, W, T, C) raw units
    months = batch["months"][:max_samples].cpu()
    patch_size = int(batch["patch_size"])
    with autocast(dtype):
        out = encode(encoder, x, months, patch_size)
    return {"x": x, "months": months, "patch_size": patch_size, "precision": str(dtype).split(".")[-1],
            "pooled": out.pooled.float().cpu(), "patches": out.patches.float().cpu()}
