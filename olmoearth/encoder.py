"""The encoder: patch embed -> composite encodings -> keep the ENCODER tokens -> pre-norm ViT -> norm.

Full attention over all visible tokens of all modalities, timesteps and bandsets; tokens not visible in
this view (IGNORED, DECODER, MISSING) are removed. The visible tokens of all samples run back to back, each
sample attending within itself (encode_unpadded), in training and eval; encode_padded (samples padded to the
longest, a key-padding mask) is the reference it equals, and the original's eval mode when
mask_padding_in_eval=False.
Maps (decode-only modalities) are refused: they can never reach the encoder.

Names follow the original `Encoder` (patch_embeddings, composite_encodings, blocks, norm,
project_and_aggregate.projection.0) so its state dict maps by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn

from olmoearth import tokens as tk
from olmoearth.attention import Block, init_linear
from olmoearth.encodings import CompositeEncodings
from olmoearth.layout import ENCODER
from olmoearth.modalities import BASE_GSD, MODALITIES, NormStats
from olmoearth.patch_embed import MultiModalPatchEmbed

if TYPE_CHECKING:
    from olmoearth.model import ModelConfig


class EncoderOutput(NamedTuple):
    tokens: dict[str, torch.Tensor]  # {m: (B, h, w, T, S, D)}, zeros where not encoded
    mask: dict[str, torch.Tensor]  # {m: (B, h, w, T, S)} the view's mask, as given
    pooled: torch.Tensor  # (B, D) mean of the visible (ENCODER) tokens
    projected: torch.Tensor  # (B, D) project_and_aggregate: Linear(pooled), for the contrastive loss


class ProjectAndAggregate(nn.Module):
    """Mean of the visible tokens, then Linear(D, D) (aggregate_then_project, one layer: the v1 setting)."""

    def __init__(self, dim: int):
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(pooled)


class Encoder(nn.Module):
    """The encoder of `config` (a ModelConfig), normalising raw inputs with `norm_stats` (default: the v1
    statistics). `checkpoint_meta` stays empty unless olmoearth.load filled it with what the loaded file
    says about the model (step, source, ...)."""

    def __init__(self, config: ModelConfig, norm_stats: NormStats | None = None, mask_padding_in_eval: bool = True):
        super().__init__()
        config.validate()
        self.config = config
        self.norm_stats = norm_stats or NormStats.default()
        self.checkpoint_meta: dict = {}
        dim = config.encoder_dim
        self.embedding_dim = dim
        self.max_patch_size = config.max_patch_size
        # The original skips the key-padding mask in eval mode (padded slots then take part in attention).
        # We mask always (mask_padding_in_eval=True), so an embedding does not depend on its batch-mates;
        # set False to reproduce the released evaluations bit for bit.
        self.mask_padding_in_eval = mask_padding_in_eval
        self.modalities = tuple(config.modalities)
        self.blocks = nn.ModuleList([Block(dim, config.encoder_heads, config.mlp_ratio, drop_path=config.drop_path)
                                     for _ in range(config.encoder_depth)])
        self.composite_encodings = CompositeEncodings(dim, self.modalities)
        self.apply(init_linear)
        # patch embeddings of every modality (maps too): the frozen target projection copies them all
        self.patch_embeddings = MultiModalPatchEmbed(self.modalities, dim, self.max_patch_size)
        self.norm = nn.LayerNorm(dim)
        self.project_and_aggregate = ProjectAndAggregate(dim)
        self.project_and_aggregate.apply(init_linear)

    def check_inputs(self, x: dict, mask: dict, patch_size: int) -> None:
        """Cheap guards against programming errors; user input is validated before it gets here
        (olmoearth.encode, serve/inputs.py)."""
        for name, v in x.items():
            if not MODALITIES[name].encoder_input:
                raise ValueError(f"modality {name!r} is a decode-only map and cannot be an encoder input")
            if name not in self.modalities:
                raise ValueError(f"modality {name!r} is not supported by this encoder ({self.modalities})")
            B, H, W, T, _ = v.shape
            want = (B, H // patch_size, W // patch_size, T, MODALITIES[name].num_bandsets)
            if tuple(mask[name].shape) != want:
                raise ValueError(f"mask of {name} must have shape {want}, got {tuple(mask[name].shape)}")

    def forward(self, x: dict[str, torch.Tensor], months: torch.Tensor, mask: dict[str, torch.Tensor],
                patch_size: int, input_res: float = BASE_GSD) -> EncoderOutput:
        """x: {m: (B, H, W, T, C)} normalised, 0 where missing; months (B, T); mask {m: (B, h, w, T, S)}."""
        self.check_inputs(x, mask, patch_size)
        tokens = self.patch_embeddings(x, patch_size)  # {m: (B, h, w, T, S, D)}
        tokens = self.composite_encodings(tokens, months, patch_size, input_res)
        seq, m, shapes = tk.collapse(tokens, {n: mask[n] for n in tokens})  # (B, N, D), (B, N)
        visible = m == ENCODER  # (B, N)
        if self.training or self.mask_padding_in_eval:
            out, pooled = self.encode_unpadded(seq, visible)
        else:
            out, pooled = self.encode_padded(seq, visible)
        return EncoderOutput(tk.expand(out, shapes), {n: mask[n] for n in shapes}, pooled,
                             self.project_and_aggregate(pooled))

    def encode_padded(self, seq: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer over the visible tokens, padded to the longest sample: (B, N, D), (B, N) bool ->
        tokens (B, N, D) (zeros where not visible), pooled (B, D). The reference for encode_unpadded; with
        mask_padding_in_eval=False in eval it reproduces the original's eval mode (padding is attended to)."""
        h, idx, valid = tk.pack(seq, visible)  # (B, L, D)
        key_mask = tk.key_padding_mask(valid) if (self.training or self.mask_padding_in_eval) else None
        for blk in self.blocks if h.shape[1] else []:
            h = blk(h, key_mask=key_mask)  # (B, L, D)
        h = self.norm(h)
        return tk.unpack(h, idx, valid, seq.shape[1]), tk.masked_mean(h, valid)

    def encode_unpadded(self, seq: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_padded with its key-padding mask, computed without padding: the visible tokens of all
        samples back to back, each sample attending within itself. No padded rows in the linear layers, no
        sort, and SDPA stays on its unmasked kernel. Same inputs and outputs as encode_padded; in training,
        drop path draws the same one value per sample (DropPath), so the same RNG state drops the same
        samples in both."""
        flat, lengths = tk.select(seq, visible)  # (K, D)
        if len(set(lengths)) == 1:  # equal lengths (e.g. nothing missing): one batched, unmasked attention
            h, seq_lengths = flat.view(len(lengths), lengths[0], flat.shape[-1]), None  # (B, L, D)
        else:
            h, seq_lengths = flat[None], lengths  # (1, K, D)
        for blk in self.blocks if flat.shape[0] else []:
            h = blk(h, seq_lengths=seq_lengths)
        h = self.norm(h).reshape(flat.shape)  # (K, D)
        return tk.place(h, visible), tk.segment_mean(h, lengths)
