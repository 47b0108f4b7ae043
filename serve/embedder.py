"""One model, ready to embed or predict numpy arrays: loaded by `olmoearth.load_model` from any source it takes
(an exported encoder or fine-tuned model on a path or s3://, a pretraining or original checkpoint folder,
`random:<size>[:<seed>]`), shared by the Serve deployment, the Ray Data actors of the large-area jobs
(`olmoearth embed`, `olmoearth predict`) and the benchmark.

A fine-tuned model file (olmoearth/finetuned.py) gives both: its encoder embeds, and `predict` runs encoder +
head. Inputs arrive validated (serve/inputs.py on the request path, the area job's own tiles); this module only
converts between numpy and torch and marks what has no data: NaN patches in embeddings, and in predictions
pixels (per-pixel tasks) or samples (scene tasks) without any input get class -1 and NaN probabilities / values.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from olmoearth.modalities import ENCODER_MODALITIES, MODALITIES

NO_CLASS = -1  # class id of a pixel / sample without input in a /predict answer


class Embedder:
    """encoder (+ head of a fine-tuned model) + the numpy in / numpy out calls used everywhere in serve/
    (thread-safe, no grad)."""

    def __init__(self, model_uri: str, device: str | None = None, num_threads: int | None = None,
                 precision: str = "auto"):
        """precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 (autocast; CPUs with native bf16 gain, see
        docs/serving.md) | fp32."""
        import olmoearth
        from olmoearth.finetuned import FineTunedModel
        from olmoearth.precision import resolve_precision

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device)
        model = olmoearth.load_model(model_uri)
        self.finetuned = model.to(self.device).eval() if isinstance(model, FineTunedModel) else None
        self.task = self.finetuned.task if self.finetuned is not None else None
        self.encoder = getattr(model, "encoder", model).to(self.device).eval()
        info = {"size": self.encoder.config.size, "source": model_uri, **self.encoder.checkpoint_meta}
        self.info = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}
        self.dim = int(self.encoder.embedding_dim)
        self._lock = threading.Lock()

    def describe(self) -> dict:
        mods = [m for m in ENCODER_MODALITIES if m in self.encoder.modalities]
        out = {
            "model": {k: v for k, v in self.info.items() if k != "source"},  # where it came from stays private
            "embedding_dim": self.dim,
            "num_parameters": sum(p.numel() for p in (self.finetuned or self.encoder).parameters()),
            "modalities": {m: {"bands": list(MODALITIES[m].bands),
                               "bandsets": [list(bs.bands) for bs in MODALITIES[m].bandsets]} for m in mods},
            "device": str(self.device),
            "precision": self.precision,
        }  # fmt: skip
        if self.task is not None:
            t = self.task
            out["task"] = {"kind": t.kind, "class_names": list(t.class_names), "head": t.head,
                           "patch_size": t.patch_size, "modalities": list(t.modalities),
                           "num_timesteps": t.num_timesteps, "chip_size": t.chip_size,
                           "outputs": list(prediction_outputs(t.kind))}  # fmt: skip
        return out

    def _tensors(self, x: dict[str, np.ndarray], months: np.ndarray) -> tuple[dict, torch.Tensor]:
        xt = {m: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device) for m, a in x.items()}
        return xt, torch.from_numpy(np.asarray(months, dtype=np.int64)).to(self.device)

    @torch.no_grad()
    def embed(self, x: dict[str, np.ndarray], months: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """x {m: (B, H, W, T, C)} raw units, NaN missing; months (B, T) -> (patches (B, H/p, W/p, D), pooled (B, D)).
        A patch with no visible token (no data in any modality, timestep or bandset) is NaN."""
        from olmoearth import encode
        from olmoearth.layout import ENCODER

        xt, mt = self._tensors(x, months)
        with self._lock:
            out = encode(self.encoder, xt, months=mt, patch_size=patch_size, precision=self.precision)
        seen = sum((mk == ENCODER).flatten(3).any(-1) for mk in out.mask.values()) > 0  # (B, h, w)
        patches = out.patches.masked_fill(~seen[..., None], float("nan"))  # encode's outputs are float32
        return patches.cpu().numpy(), out.pooled.cpu().numpy()

    @torch.no_grad()
    def predict(self, x: dict[str, np.ndarray], months: np.ndarray) -> dict[str, np.ndarray]:
        """The fine-tuned model's `predict` in numpy: classification / segmentation {"class" int64 (B[, H, W]),
        "probs" float32 (B, K[, H, W])}, multilabel {"probs", "labels" int64 (B, K)}, regression kinds
        {"value" float32 (B, K[, H, W])}; where the input has nothing (a pixel with no value in any modality,
        timestep or band; a sample with none at all) class / labels are -1 and probs / values NaN."""
        if self.finetuned is None:
            raise ValueError("predict needs a fine-tuned model file (olmoearth-finetuned/1); this one holds an encoder")
        from olmoearth.precision import autocast

        xt, mt = self._tensors(x, months)
        with self._lock, autocast(self.device, self.precision):
            out = self.finetuned.predict(xt, mt)
        has = input_coverage(x)  # (B, H, W)
        if not self.task.per_pixel:
            has = has.any(axis=(1, 2))  # (B,)
        res = {}
        for name, v in out.items():
            v = v.cpu().numpy()
            if name in ("class", "labels"):
                empty = ~has if name == "class" else ~has[:, None]
                res[name] = np.where(empty, NO_CLASS, v).astype(np.int64)
            else:
                res[name] = np.where(np.expand_dims(has, 1), v, np.nan).astype(np.float32)
        return res

    def prediction_maps(self, x: dict[str, np.ndarray], months: np.ndarray) -> np.ndarray:
        """What the area job blends: per tile (B, H, W, K) probabilities (class kinds) or values (regression)
        for per-pixel tasks, (B, 1, 1, K) for scene tasks; NaN without input."""
        return maps_from_outputs(self.task.kind, self.predict(x, months))


def prediction_outputs(kind: str) -> tuple[str, ...]:
    """The arrays /predict and `Embedder.predict` give for a task kind; the first is the default answer."""
    if kind in ("classification", "segmentation"):
        return ("class", "probs")
    if kind == "multilabel":
        return ("labels", "probs")
    return ("value",)


def maps_from_outputs(kind: str, out: dict[str, np.ndarray]) -> np.ndarray:
    """{"probs" | "value": (B, K[, H, W])} -> (B, H, W, K) (per-pixel) or (B, 1, 1, K) (scene) float32."""
    v = out["value"] if "value" in out else out["probs"]
    v = np.moveaxis(v, 1, -1) if v.ndim == 4 else v[:, None, None, :]
    return np.ascontiguousarray(v, dtype=np.float32)


def input_coverage(x: dict[str, np.ndarray]) -> np.ndarray:
    """(B, H, W) bool: the pixel has a finite value in some modality, timestep and band."""
    return np.logical_or.reduce([np.isfinite(a).any(axis=(3, 4)) for a in x.values()])
