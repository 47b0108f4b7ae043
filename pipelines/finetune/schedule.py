"""Optimiser parameter groups and the two fine-tuning schedules, as plain functions of (epoch, step).

original (the OlmoEarth evaluation recipe): two groups, backbone and head.
    epochs e < F = floor(epochs x freeze_fraction): backbone lr 0 and weight decay 0 (AdamW decays a weight
        even when its gradient is 0, so both must be 0 for the backbone to stay bit-identical), head lr
    afterwards: backbone lr x unfreeze_factor, head lr
    both times the plateau scale: ReduceLROnPlateau on the validation metric, x plateau_factor after more than
        plateau_patience epochs without improvement, never below min_lr
layer_decay (BEiT-style, what rslearn recommends): one group per layer of model.layer_groups()
        [embeddings], [block 0], ..., [block L-1], [final norm + head]
    group lr = lr x decay^(L + 1 - j) for group j (embeddings j = 0, block i j = i + 1, head j = L + 1), so
        block i trains at lr x decay^(L - i), the embeddings at decay^(L + 1), the head at lr
    times a per-step factor: linear warmup over warmup_epochs, then cosine to final_lr_ratio

    groups = param_groups(model, cfg)                    # for deepspeed.initialize(model_parameters=...)
    apply_schedule(optimizer.param_groups, cfg, epoch, step, steps_per_epoch, plateau.scale)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipelines.finetune.config import FinetuneConfig, frozen_epochs
from pipelines.pretrain.engine import lr_factor


def param_groups(model, cfg: FinetuneConfig) -> list[dict]:
    """AdamW's groups for the schedule: dicts of params plus "name", "scale" (the group's share of
    train.lr) and "backbone" (frozen in the original schedule's first epochs). Every trainable parameter
    is in exactly one group (checked)."""
    if cfg.schedule.kind == "original":
        groups = [{"params": list(model.backbone_parameters()), "name": "backbone", "scale": 1.0, "backbone": True},
                  {"params": list(model.head_parameters()), "name": "head", "scale": 1.0, "backbone": False}]
    else:
        layers = model.layer_groups()
        depth = len(layers) - 2  # embeddings, L blocks, final norm + head
        d = cfg.schedule.layer_decay
        groups = [{"params": list(ps), "name": _layer_name(j, depth), "scale": d ** (depth + 1 - j),
                   "backbone": j <= depth} for j, ps in enumerate(layers)]  # fmt: skip
    _check_cover(model, groups)
    for g in groups:
        g["lr"] = cfg.train.lr * g["scale"]
        g["weight_decay"] = cfg.train.weight_decay
    return [g for g in groups if g["params"]]


def _layer_name(j: int, depth: int) -> str:
    return "embeddings" if j == 0 else "head" if j == depth + 1 else f"block{j - 1}"


def _check_cover(model, groups: list[dict]) -> None:
    seen: dict[int, str] = {}
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"parameter in two optimiser groups: {seen[id(p)]} and {g['name']}")
            seen[id(p)] = g["name"]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"trainable parameters in no optimiser group: {missing[:5]} ({len(missing)} in all)")


def group_settings(group: dict, cfg: FinetuneConfig, epoch: int, step: int, steps_per_epoch: int,
                   plateau_scale: float) -> tuple[float, float]:
    """(lr, weight decay) of one group before optimiser step `step` (0-based, all epochs) in `epoch`."""
    t, s = cfg.train, cfg.schedule
    if s.kind == "original":
        if group["backbone"] and epoch < frozen_epochs(cfg):
            return 0.0, 0.0
        base = t.lr * (s.unfreeze_factor if group["backbone"] else 1.0)
        return max(s.min_lr, base * plateau_scale), t.weight_decay
    total = t.epochs * steps_per_epoch
    factor = lr_factor(step, s.warmup_epochs * steps_per_epoch, total, s.final_lr_ratio)
    return t.lr * group["scale"] * factor, t.weight_decay


def apply_schedule(optimizer_groups: list[dict], metas: list[dict], cfg: FinetuneConfig, epoch: int, step: int,
                   steps_per_epoch: int, plateau_scale: float) -> dict[str, float]:
    """Set every optimiser group's lr and weight decay for the next step; returns {group name: lr}.
    `metas`: the dicts of param_groups(), in the optimiser's group order (DeepSpeed rebuilds the groups)."""
    if len(optimizer_groups) != len(metas):
        raise RuntimeError(f"optimiser has {len(optimizer_groups)} groups, the schedule {len(metas)}")
    lrs = {}
    for group, meta in zip(optimizer_groups, metas, strict=True):
        lr, wd = group_settings(meta, cfg, epoch, step, steps_per_epoch, plateau_scale)
        group["lr"], group["weight_decay"] = lr, wd
        lrs[meta["name"]] = lr
    return lrs


def is_frozen(cfg: FinetuneConfig, epoch: int) -> bool:
    """Whether the backbone is frozen in `epoch` (the original schedule's first epochs)."""
    return epoch < frozen_epochs(cfg)


@dataclass
class Plateau:
    """ReduceLROnPlateau as torch's (mode max/min, relative threshold 1e-4): after more than `patience`
    epochs without improvement every lr is multiplied by `factor`. Plain data, saved in the run state."""

    higher_is_better: bool = True
    factor: float = 0.2
    patience: int = 2
    best: float | None = None
    bad_epochs: int = 0
    scale: float = 1.0

    def update(self, value: float) -> bool:
        """Count one epoch's validation metric; True when the lr scale dropped."""
        if self.best is None or self._better(value):
            self.best, self.bad_epochs = float(value), 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.bad_epochs = 0
            return True
        return False

    def _better(self, value: float) -> bool:
        margin = 1e-4 * abs(self.best)
        return value > self.best + margin if self.higher_is_better else value < self.best - margin

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plateau:
        return cls(**d)
