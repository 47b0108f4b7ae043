"""One encoder, ready to embed numpy arrays: loaded from any URI, shared by the Serve deployment, the Ray Data
actors of the large-area job and the benchmark.

Model URIs:
    s3://bucket/x.safetensors or /path/x.safetensors   an encoder exported by `olmoearth export`
    any other path / URI                              an original OlmoEarth v1 checkpoint (converted on load
                                                      by `olmoearth.load_model`: folder with config.json +
                                                      weights.pth, or its converted safetensors)
    random:<size>[:<seed>]                            a random-init encoder (demos, tests, benchmarks)
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from olmoearth.modalities import ENCODER_MODALITIES, MODALITIES
from pipelines.common.storage import Storage, is_s3


def load_encoder_uri(uri: str, storage: Storage | None = None) -> tuple[torch.nn.Module, dict]:
    """(encoder in eval mode, info {"size", "source", ...}) from any supported model URI."""
    storage = storage or Storage()
    if uri.startswith("random:"):
        from olmoearth import build_model

        parts = uri.split(":")
        size, seed = parts[1], int(parts[2]) if len(parts) > 2 else 0
        torch.manual_seed(seed)
        encoder = build_model(size).encoder
    else:
        from olmoearth.convert import load_model

        if not storage.exists(uri):
            raise FileNotFoundError(f"model_uri {uri!r}: no such file or folder")
        model = load_model(uri, fs=storage.fs(uri) if is_s3(uri) else None)
        encoder = getattr(model, "encoder", model)
    cfg = getattr(encoder, "config", None)
    info = {"size": getattr(cfg, "size", "?"), "source": uri, **getattr(encoder, "checkpoint_meta", {})}
    info = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
    encoder.eval()
    return encoder, info


class Embedder:
    """encoder + the numpy in / numpy out call used everywhere in serve/ (thread-safe, no grad)."""

    def __init__(self, model_uri: str, storage: Storage | None = None, device: str | None = None,
                 num_threads: int | None = None):  # fmt: skip
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder, self.info = load_encoder_uri(model_uri, storage)
        self.encoder.to(self.device)
        self.dim = int(self.encoder.embedding_dim)
        self._lock = threading.Lock()

    def describe(self) -> dict:
        mods = [m for m in ENCODER_MODALITIES if m in getattr(self.encoder, "modalities", ENCODER_MODALITIES)]
        return {
            "model": self.info,
            "embedding_dim": self.dim,
            "num_parameters": sum(p.numel() for p in self.encoder.parameters()),
            "modalities": {m: {"bands": list(MODALITIES[m].bands),
                               "bandsets": [list(bs.bands) for bs in MODALITIES[m].bandsets]} for m in mods},
            "device": str(self.device),
        }  # fmt: skip

    @torch.no_grad()
    def embed(self, x: dict[str, np.ndarray], months: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """x {m: (B, H, W, T, C)} raw units, NaN missing; months (B, T) -> (patches (B, H/p, W/p, D), pooled (B, D)).
        A patch with no visible token (no data in any modality, timestep or bandset) is NaN."""
        from olmoearth import encode
        from olmoearth.layout import ENCODER

        xt = {m: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device) for m, a in x.items()}
        mt = torch.from_numpy(np.asarray(months, dtype=np.int64)).to(self.device)
        with self._lock:
            out = encode(self.encoder, xt, months=mt, patch_size=patch_size)
        seen = sum((mk == ENCODER).flatten(3).any(-1) for mk in out.mask.values()) > 0  # (B, h, w)
        patches = out.patches.float().masked_fill(~seen[..., None], float("nan"))
        return patches.cpu().numpy(), out.pooled.float().cpu().numpy()
