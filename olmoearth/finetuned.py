"""A fine-tuned model: the encoder plus a task head, trained end to end on labels.

    task = TaskSpec("segmentation", ["water", "land"], head="unet", patch_size=4)
    model = FineTunedModel(olmoearth.load("random:nano"), task)
    logits = model({"sentinel2_l2a": x}, months)     # x (B, H, W, T, C) raw units, NaN missing -> (B, K, H, W)
    loss = task_loss(task, logits, labels)             # labels (B, H, W) class ids, -1 unlabelled
    model.predict(x, months)["class"]                  # (B, H, W) int64

The model normalises and masks raw inputs itself (olmoearth.inference.prepare, the encoder's own norm
stats), so a saved fine-tuned model (olmoearth/checkpoint.py save_finetuned) takes what `encode` takes.
Scene tasks pool all visible tokens (B, D); per-pixel tasks pool each patch over time, bandsets and
modalities (B, h, w, D) and the head brings it back to pixels (olmoearth/heads.py).

`layer_groups` splits the parameters for layer-wise learning-rate decay (rslearn's recommendation: the
deepest group gets lr, each group below it lr * decay**depth); `backbone_parameters` / `head_parameters`
serve the frozen-then-unfrozen schedule of the original's fine-tuning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from olmoearth.heads import build_head
from olmoearth.inference import pool_patches, prepare
from olmoearth.modalities import MAX_PATCH_SIZE, MODALITIES

TASK_KINDS = ("classification", "multilabel", "segmentation", "regression", "pixel_regression")
HEADS = ("linear", "upsample", "unet")
PER_PIXEL_KINDS = ("segmentation", "pixel_regression")
IGNORE = -1  # class id of an unlabelled pixel / sample


@dataclass
class TaskSpec:
    kind: str  # one of TASK_KINDS
    class_names: list[str]  # the classes, or for regression the target names (one per output)
    head: str = "linear"  # one of HEADS: linear for scene tasks, upsample or unet for per-pixel tasks
    patch_size: int = 4  # encoder patch size (pixels per token side)
    modalities: list[str] = field(default_factory=lambda: ["sentinel2_l2a"])  # encoder inputs, in order
    num_timesteps: int = 1  # timesteps per sample the model was trained on
    chip_size: int = 32  # chip side in pixels the model was trained on

    def __post_init__(self):
        self.class_names = list(self.class_names)
        self.modalities = list(self.modalities)
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task.kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.head not in HEADS:
            raise ValueError(f"task.head must be one of {HEADS}, got {self.head!r}")
        if self.per_pixel and self.head == "linear":
            raise ValueError(f"task.head: {self.kind} is per pixel and needs head 'upsample' or 'unet', "
                             "not 'linear'")
        if not self.per_pixel and self.head != "linear":
            raise ValueError(f"task.head: {self.kind} is a scene task and needs head 'linear', not {self.head!r}")
        self._check_names()
        if not isinstance(self.patch_size, int) or not 1 <= self.patch_size <= MAX_PATCH_SIZE:
            raise ValueError(f"task.patch_size must be an integer in 1..{MAX_PATCH_SIZE}, got {self.patch_size!r}")
        if not isinstance(self.chip_size, int) or self.chip_size < 1 or self.chip_size % self.patch_size:
            raise ValueError(f"task.chip_size must be a positive multiple of patch_size {self.patch_size}, "
                             f"got {self.chip_size!r}")
        if not isinstance(self.num_timesteps, int) or not 1 <= self.num_timesteps <= 12:
            raise ValueError(f"task.num_timesteps must be an integer in 1..12, got {self.num_timesteps!r}")
        bad = [m for m in self.modalities if m not in MODALITIES or not MODALITIES[m].encoder_input]
        if not self.modalities or bad:
            raise ValueError(f"task.modalities must be encoder inputs of {list(MODALITIES)}, got {self.modalities}")

    def _check_names(self) -> None:
        names = self.class_names
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"task.class_names must be a non-empty list of names, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"task.class_names has duplicates: {names}")
        if self.kind in ("classification", "segmentation") and len(names) < 2:
            raise ValueError(f"task.class_names: {self.kind} needs at least 2 classes, got {names}")

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    @property
    def per_pixel(self) -> bool:
        return self.kind in PER_PIXEL_KINDS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"task: unknown field(s) {extra}; known: {sorted(known)}")
        return cls(**d)


class FineTunedModel(nn.Module):
    def __init__(self, encoder: nn.Module, task: TaskSpec):
        super().__init__()
        self.encoder = encoder
        self.task = task
        self.head = build_head(task.head, encoder.embedding_dim, task.num_outputs, task.patch_size)

    def forward(self, x: dict, months) -> torch.Tensor:
        """x {m: (B, H, W, T, C)} raw units, NaN missing; months (B, T) -> (B, K) or (B, K, H, W)."""
        p = self.task.patch_size
        xs, months_t, masks = prepare(self.encoder, x, months, p)
        dtype = next(self.encoder.parameters()).dtype  # bf16 under DeepSpeed on GPU
        xs = {m: v.to(dtype) for m, v in xs.items()}
        out = self.encoder(xs, months_t, masks, p)
        if not self.task.per_pixel:
            return self.head(out.pooled)  # (B, K)
        return self.head(pool_patches(out.tokens, masks))  # (B, h, w, D) -> (B, K, H, W)

    def train_for(self, frozen: bool) -> FineTunedModel:
        """Train mode for an epoch; with the backbone frozen the encoder stays in eval mode (no drop path),
        so the head learns from the features the frozen linear probe sees, not noisy ones."""
        self.train()
        if frozen:
            self.encoder.eval()
        return self

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """[embeddings], [block 0], ..., [block L-1], [final norm + projection + head]: every parameter
        in exactly one group, shallowest first (for layer-wise learning-rate decay)."""
        enc = self.encoder
        blocks = [list(b.parameters()) for b in enc.blocks]
        in_blocks = {id(q) for g in blocks for q in g}
        top_modules = [enc.norm, enc.project_and_aggregate, self.head]
        top = [q for m in top_modules for q in m.parameters()]
        in_top = {id(q) for q in top}
        embeddings = [q for q in enc.parameters() if id(q) not in in_blocks and id(q) not in in_top]
        return [embeddings, *blocks, top]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    @torch.no_grad()
    def predict(self, x: dict, months) -> dict:
        """Eval-mode outputs: classification / segmentation {"class", "probs"}, multilabel {"probs",
        "labels"}, regression kinds {"value"}; float32 on the model's device."""
        was_training = self.training
        self.eval()
        try:
            out = self(x, months).float()  # (B, K[, H, W])
        finally:
            self.train(was_training)
        kind = self.task.kind
        if kind in ("classification", "segmentation"):
            probs = out.softmax(dim=1)
            return {"class": probs.argmax(dim=1), "probs": probs}
        if kind == "multilabel":
            probs = out.sigmoid()
            return {"probs": probs, "labels": (probs > 0.5).long()}
        return {"value": out}


def task_loss(task: TaskSpec, out: torch.Tensor, target: torch.Tensor,
              class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The task's training loss, in float32.
    classification (B, K) vs (B,) / segmentation (B, K, H, W) vs (B, H, W): cross-entropy, targets -1 ignored;
    multilabel (B, K) vs (B, K) 0/1: BCE with logits, `class_weights` weighting each class's term;
    regression (B, K) / pixel_regression (B, K, H, W) (or (B, H, W) when K = 1): MSE over finite targets,
    `class_weights` weighting each output. A batch with nothing to learn from gives a zero loss that
    still reaches every output (so every rank runs the same backward)."""
    out = out.float()
    w = None if class_weights is None else class_weights.to(out.device, torch.float32)
    if task.kind in ("classification", "segmentation"):
        target = target.to(out.device).long()
        if not bool((target != IGNORE).any()):
            return out.sum() * 0.0
        return F.cross_entropy(out, target, weight=w, ignore_index=IGNORE)
    target = target.to(out.device).float()
    if task.kind == "pixel_regression" and target.ndim == out.ndim - 1:
        target = target[:, None]  # (B, H, W) -> (B, 1, H, W)
    if target.shape != out.shape:
        raise ValueError(f"task_loss: {task.kind} target shape {tuple(target.shape)} != output {tuple(out.shape)}")
    if task.kind == "multilabel":
        loss = F.binary_cross_entropy_with_logits(out, target, reduction="none")  # (B, K)
        return (loss * w).mean() if w is not None else loss.mean()
    valid = torch.isfinite(target)
    if not bool(valid.any()):
        return out.sum() * 0.0
    err = (out - torch.nan_to_num(target)) ** 2  # (B, K[, H, W])
    if w is not None:
        err = err * w.view(1, -1, *([1] * (out.ndim - 2)))
    return err[valid].mean()
