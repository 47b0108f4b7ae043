"""What a training worker sets up before its loop and keeps beside it: its process priority, the initial
weights (`model.init_from`), the DeepSpeed engine over the model, the model's FLOP shape, and the reference
output saved with the final checkpoint. The bench builds its in-process engine with `build_engine` too, so
both run the same DeepSpeed setup."""

from __future__ import annotations

import os
import warnings

import torch

from pipelines.common.storage import Storage, is_s3
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


def init_weights(model, source: str, storage: Storage) -> str:
    """Load `source` into `model` strictly (`model.init_from`): anything `olmoearth.load_model` reads. An
    encoder export fills model.encoder (decoder and frozen target projection stay as initialised), any other
    source the whole model. A tensor missing, extra or shaped otherwise than the configured size's raises
    CheckpointError naming it and both shapes. The model keeps its own normalisation statistics (the
    stream's). Returns "encoder" or "model", what was filled."""
    from olmoearth import load_model
    from olmoearth.checkpoint import load_weights
    from olmoearth.encoder import Encoder

    src = load_model(source, fs=storage.fs(source) if is_s3(source) else None)
    if isinstance(src, Encoder):
        load_weights(model.encoder, src.state_dict(), f"model.init_from {source} (an encoder export)")
        return "encoder"
    load_weights(model, src.state_dict(), f"model.init_from {source}")
    return "model"


def check_init_from(cfg: PretrainConfig, storage: Storage) -> None:
    """The driver's check of `model.init_from` before any worker starts: the same strict load, into a model
    of the configured size built on the meta device (which holds no weights)."""
    from olmoearth import build_model

    if not cfg.model.init_from:
        return
    with torch.device("meta"):
        model = build_model(cfg.model.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that copying into meta tensors does nothing: the point
        init_weights(model, cfg.model.init_from, storage)


def optimizer_groups(cfg: PretrainConfig, model) -> list[dict]:
    """AdamW's parameter groups: one, every trainable parameter decayed (the original), or with
    `optim.exempt_norms_and_biases` none on biases, norms, channel embeddings and the mask token."""
    return model.param_groups(cfg.optim.weight_decay, exempt_norms_and_biases=cfg.optim.exempt_norms_and_biases)


def build_engine(cfg: PretrainConfig, model, world_size: int, grad_accum: int, use_gpu: bool, precision: str):
    """The DeepSpeed engine over the model's trainable groups (the frozen target projection is not in them),
    with the config's ZeRO stage, AdamW, clipping and schedule."""
    import deepspeed

    use_own_torch_extensions_dir()  # before DeepSpeed compiles its ops
    ds_config = deepspeed_config(cfg.optim, cfg.train.zero_stage, micro_batch_size(cfg), world_size, grad_accum,
                                 use_gpu, precision)  # fmt: skip
    schedule = lr_factor_fn(cfg.optim, cfg.train.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=optimizer_groups(cfg, model), config=ds_config,
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
    from olmoearth.precision import autocast as precision_autocast

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return precision_autocast(device, "bf16" if dtype == torch.bfloat16 else "fp32")


def reference_output(encoder, batch: dict, dtype: torch.dtype, max_samples: int = 2) -> dict:
    """A reference input (a few samples of a training batch, de-normalised to raw units with the statistics
    the encoder carries, those the stream normalised with) and what `olmoearth.encode` gives for it with the
    in-training encoder. Saved with the final checkpoint; `export` checks that the exported encoder
    reproduces it."""
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
