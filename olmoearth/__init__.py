"""OlmoEarth v1 model library: `build_model`, `load`, `encode`, `ModelConfig`, `NormStats`, `MODALITIES`;
fine-tuned models (encoder + task head, olmoearth/finetuned.py): `FineTunedModel`, `TaskSpec`,
`save_finetuned`, `load_finetuned`.

Importing the package stays light (numpy only); torch-backed names load on first use.
"""

from olmoearth.modalities import MODALITIES, NormStats

__all__ = ["build_model", "load", "load_model", "encode", "ModelConfig", "NormStats", "MODALITIES",
           "load_encoder", "save_encoder", "load_finetuned", "save_finetuned", "FineTunedModel", "TaskSpec"]

_LAZY = {
    "build_model": "olmoearth.model",
    "ModelConfig": "olmoearth.model",
    "LatentMIM": "olmoearth.model",
    "encode": "olmoearth.inference",
    "load": "olmoearth.loading",
    "load_model": "olmoearth.loading",
    "load_finetuned": "olmoearth.loading",
    "save_finetuned": "olmoearth.checkpoint",
    "FineTunedModel": "olmoearth.finetuned",
    "TaskSpec": "olmoearth.finetuned",
    "save_encoder": "olmoearth.checkpoint",
    "load_encoder": "olmoearth.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'olmoearth' has no attribute {name!r}")
