"""Forward precision, one rule for training and serving: "auto" is bf16 on a CUDA device and fp32 elsewhere;
bf16 runs under torch.autocast (bf16 matmuls and attention, fp32 reductions and weights). Importing this
module does not import torch, so configs can check the field cheaply."""

from __future__ import annotations

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device, field: str = "precision") -> str:
    """"auto" -> "bf16" on a CUDA device, "fp32" elsewhere (bf16 on a CPU only when asked for: exact fp32
    stays the CPU default). device: "cpu", "cuda[:n]" or a torch.device. `field` names the setting in the error."""
    if precision not in PRECISIONS:
        raise ValueError(f"{field} must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if str(device).startswith("cuda") else "fp32"
    return precision


def autocast(device, precision: str):
    """The context a forward runs in at a resolved precision: torch.autocast to bf16, or a no-op for fp32."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
