"""Latent MIM Lite: the whole OlmoEarth v1 objective in one module, in the order it runs.

    for each of two views (its own mask, its own random D4 flip/rotation of x and mask alike):
        encoder(visible tokens) -> decoder(queries = DECODER tokens) -> predictions
        target = frozen random patch projection of the (augmented) input  (Latent MIM Lite)
        patch discrimination(predictions, targets)
    loss = mean over views of patch discrimination + 0.1 * InfoNCE(projected pooled view a, view b)

The target projection is a copy of the encoder's patch embedding at init, frozen (requires_grad False,
never in an optimiser group). `build_model("nano")` gives the v1 sizes; overrides build tiny test models.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from olmoearth import tokens as tk
from olmoearth.decoder import Decoder
from olmoearth.encoder import Encoder
from olmoearth.layout import ENCODER
from olmoearth.losses import info_nce, patch_discrimination
from olmoearth.modalities import MAX_PATCH_SIZE, MODALITIES, NormStats

# size -> (encoder dim, depth, heads, decoder dim, depth, heads): the original's MODEL_SIZE_ARGS
SIZES = {
    "nano": (128, 4, 8, 128, 4, 8),
    "tiny": (192, 12, 3, 192, 4, 3),
    "base": (768, 12, 12, 768, 4, 12),
    "large": (1024, 24, 16, 1024, 4, 16),
}


@dataclass
class ModelConfig:
    size: str = "nano"
    encoder_dim: int = 128
    encoder_depth: int = 4
    encoder_heads: int = 8
    decoder_dim: int = 128
    decoder_depth: int = 4
    decoder_heads: int = 8
    mlp_ratio: float = 4.0
    drop_path: float = 0.1  # every encoder block; decoder 0
    max_patch_size: int = MAX_PATCH_SIZE
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    patch_disc_tau: float = 0.1
    contrastive_tau: float = 0.1
    contrastive_weight: float = 0.1
    augment: bool = True  # random D4 flip/rotation per view inside forward

    @classmethod
    def preset(cls, size: str, **overrides) -> ModelConfig:
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; known: {', '.join(SIZES)}")
        ed, edep, eh, dd, ddep, dh = SIZES[size]
        cfg = cls(size=size, encoder_dim=ed, encoder_depth=edep, encoder_heads=eh,
                  decoder_dim=dd, decoder_depth=ddep, decoder_heads=dh)
        return cfg.replace(**overrides)

    def replace(self, **overrides) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"unknown ModelConfig field(s) {bad}; known: {sorted(names)}")
        cfg = dataclasses.replace(self, **overrides)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in self.modalities:
            if name not in MODALITIES:
                raise ValueError(f"ModelConfig.modalities: unknown modality {name!r}")
        if self.encoder_dim % self.encoder_heads or self.decoder_dim % self.decoder_heads:
            raise ValueError("ModelConfig: encoder_dim / decoder_dim must be divisible by their heads")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)


def d4(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate (B, H, W, ...) by k * 90 degrees over (H, W), then optionally flip W."""
    if k:
        x = torch.rot90(x, k, dims=(1, 2))
    return torch.flip(x, dims=(2,)) if flip else x


class LatentMIM(nn.Module):
    def __init__(self, config: ModelConfig, norm_stats: NormStats | None = None):
        super().__init__()
        config.validate()
        self.config = config
        mods = tuple(config.modalities)
        self.encoder = Encoder(config, norm_stats)
        self.decoder = Decoder(config.encoder_dim, config.decoder_dim, config.decoder_depth,
                               config.decoder_heads, config.mlp_ratio, mods)
        self.target_projection = copy.deepcopy(self.encoder.patch_embeddings)
        self.target_projection.requires_grad_(False)

    # ---------------------------------------------------------------------------------------------
    def param_groups(self, weight_decay: float, exempt_norms_and_biases: bool = False) -> list[dict]:
        """AdamW groups; the frozen target projection is never in one.

        Default, as the original (one optimiser group): every trainable parameter is decayed, biases,
        LayerNorms, channel embeddings and the mask token included. `exempt_norms_and_biases=True` is the
        common ViT practice instead: no decay on 1-d parameters (biases, norms, mask token) and channel
        embeddings, which decay would pull towards 0 for no regularising benefit."""
        trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        if not exempt_norms_and_biases:
            return [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
        decay, no_decay = [], []
        for name, p in trainable:
            (decay if p.ndim >= 2 and "channel_embeddings" not in name else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # ---------------------------------------------------------------------------------------------
    def augment(self, x: dict, mask: dict):
        square = all(v.shape[1] == v.shape[2] for v in x.values())
        k = int(torch.randint(0, 4, ()).item())
        if not square:
            k = 2 * (k % 2)  # 90-degree turns need square inputs; keep 0 / 180
        flip = bool(torch.randint(0, 2, ()).item())
        return {n: d4(v, k, flip) for n, v in x.items()}, {n: d4(v, k, flip) for n, v in mask.items()}

    def forward_view(self, x: dict, months: torch.Tensor, mask: dict, patch_size: int):
        """One masked view -> (patch-disc loss, projected pooled (B, D))."""
        for name, m in mask.items():
            if not MODALITIES[name].encoder_input and bool((m == ENCODER).any()):
                raise ValueError(f"mask marks decode-only map {name!r} as ENCODER; maps never reach the encoder")
        if self.config.augment and self.training:
            x, mask = self.augment(x, mask)
        enc_x = {n: v for n, v in x.items() if MODALITIES[n].encoder_input}
        out = self.encoder(enc_x, months, {n: mask[n] for n in enc_x}, patch_size)
        with torch.no_grad():
            target = self.target_projection(x, patch_size)  # {m: (B, h, w, T, S, D)} incl. maps
        # decoder input: encoder tokens, and zeros for the maps (never visible, only decoded)
        dec_in = {n: out.tokens[n] if n in out.tokens else target[n].new_zeros(target[n].shape) for n in target}
        pred, q_idx, q_valid, shapes = self.decoder(dec_in, mask, months, patch_size)  # (B, Q, D)
        tgt_seq, _, _ = tk.collapse(target, {n: mask[n] for n in target})  # (B, N, D)
        tgt = torch.gather(tgt_seq, 1, q_idx[..., None].expand(-1, -1, tgt_seq.shape[-1]))  # (B, Q, D)
        ids = torch.cat([torch.full((int(np.prod(s)),), i, dtype=torch.long)
                         for i, s in enumerate(shapes.values())]).to(q_idx.device)  # (N,)
        group = ids[q_idx]  # (B, Q)
        loss = patch_discrimination(pred, tgt, q_valid, group, self.config.patch_disc_tau)
        return loss, out.projected

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: the training batch of layout.py -> {"loss", "patch_disc", "contrastive"}."""
        x, months, p = batch["x"], batch["months"], int(batch["patch_size"])
        pd_a, proj_a = self.forward_view(x, months, batch["mask_a"], p)
        pd_b, proj_b = self.forward_view(x, months, batch["mask_b"], p)
        patch_disc = (pd_a + pd_b) / 2
        contrastive = info_nce(proj_a, proj_b, self.config.contrastive_tau)
        loss = patch_disc + self.config.contrastive_weight * contrastive
        return {"loss": loss, "patch_disc": patch_disc.detach(), "contrastive": contrastive.detach()}


def build_model(size: str | ModelConfig = "nano", norm_stats: NormStats | None = None, **overrides) -> LatentMIM:
    """build_model("nano"), build_model("tiny", encoder_depth=2) or build_model(ModelConfig(...)); the encoder
    normalises with `norm_stats` (default: the v1 statistics)."""
    cfg = ModelConfig.preset(size, **overrides) if isinstance(size, str) else size.replace(**overrides)
    return LatentMIM(cfg, norm_stats)


def original_name(ours: str) -> str | None:
    """Our state-dict key -> the original LatentMIM's key (None: ours has no stored counterpart).

    The whole table: identical names under encoder. / decoder., and
        target_projection.<rest>  <->  target_encoder.patch_embeddings.<rest>
    The original additionally stores composite_encodings.month_embed.weight (a fixed table, rebuilt here)
    and the unused rest of target_encoder (a frozen copy of the encoder at init): drop them when loading."""
    if ours.startswith("target_projection."):
        return "target_encoder.patch_embeddings." + ours[len("target_projection."):]
    return ours


def load_original_state_dict(model: LatentMIM, state_dict: dict) -> None:
    """Load the original LatentMIM's state dict (weights.pth) into `model` through `original_name`, strictly:
    every key of ours must be present, and the original's leftovers must be the documented extras."""
    ours = model.state_dict()
    missing = [original_name(k) for k in ours if original_name(k) not in state_dict]
    if missing:
        raise ValueError(f"original state dict lacks {len(missing)} key(s), e.g. {missing[:3]}")
    used = {original_name(k) for k in ours}
    extra = [k for k in state_dict if k not in used
             and not (k.endswith("month_embed.weight") or k.startswith("target_encoder."))]
    if extra:
        raise ValueError(f"original state dict has unmapped key(s) {extra[:5]}")
    model.load_state_dict({k: state_dict[original_name(k)] for k in ours}, strict=True)
