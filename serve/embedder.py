"""One encoder, ready to embed numpy arrays: loaded by `olmoearth.load` from any source it takes (an exported
encoder on a path or s3://, a pretraining or original checkpoint folder, `random:<size>[:<seed>]`), shared
by the Serve deployment, the Ray Data actors of the large-area job and the benchmark.

Inputs arrive validated (serve/inputs.py on the request path, the area job's own tiles); this module only
converts between numpy and torch and marks patches without data.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from olmoearth.modalities import ENCODER_MODALITIES, MODALITIES


class Embedder:
    """encoder + the numpy in / numpy out call used everywhere in serve/ (thread-safe, no grad)."""

    def __init__(self, model_uri: str, device: str | None = None, num_threads: int | None = None):
        import olmoearth

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = olmoearth.load(model_uri, map_location=str(self.device))
        info = {"size": self.encoder.config.size, "source": model_uri, **self.encoder.checkpoint_meta}
        self.info = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
        self.dim = int(self.encoder.embedding_dim)
        self._lock = threading.Lock()

    def describe(self) -> dict:
        mods = [m for m in ENCODER_MODALITIES if m in self.encoder.modalities]
        return {
            "model": {k: v for k, v in self.info.items() if k != "source"},  # where it came from stays private
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
