"""The decoder ("predictor"): decode-target queries cross-attend to the visible encoder tokens.

    encoder tokens -> LayerNorm -> Linear(enc_dim -> dec_dim) -> DECODER slots replaced by one learned
    mask token -> + the decoder's own composite encodings -> split: queries (DECODER), context (ENCODER)
    -> blocks of cross-attention only (no self-attention among queries) + MLP -> LayerNorm
    -> Linear(dec_dim -> enc_dim) shared by all bandsets.

Queries and context run without padding: the DECODER tokens of all samples back to back (K_q, dim) and the
ENCODER tokens likewise (K_c, dim), each sample's queries attending to its own context only (Attention's
seq_lengths / key_lengths); only those rows go through the layers. `forward_padded` is the same math over
the batch padded to the longest sample with a key-padding mask: the reference the tests compare against.

Names follow the original `Predictor` (mask_token, blocks, composite_encodings, encoder_to_decoder_embed,
to_output_embed, input_norm, norm). Deviation: outputs are computed for DECODER tokens only (the original
also projects the other slots; the loss never reads them); other slots are zeros here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from olmoearth import tokens as tk
from olmoearth.attention import Block, init_linear
from olmoearth.encodings import CompositeEncodings
from olmoearth.layout import DECODER, ENCODER
from olmoearth.modalities import BASE_GSD, MODALITIES


class Decoder(nn.Module):
    def __init__(self, encoder_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 modalities: tuple[str, ...] = tuple(MODALITIES), output_dim: int | None = None):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio, drop_path=0.0, cross_attn=True) for _ in range(depth)]
        )
        self.composite_encodings = CompositeEncodings(dim, tuple(modalities))
        self.encoder_to_decoder_embed = nn.Linear(encoder_dim, dim)
        self.to_output_embed = nn.Linear(dim, output_dim or encoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.input_norm = nn.LayerNorm(encoder_dim)
        self.norm = nn.LayerNorm(dim)
        self.apply(init_linear)

    def forward(self, tokens: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], months: torch.Tensor,
                patch_size: int, input_res: float = BASE_GSD):
        """tokens: {m: (B, h, w, T, S, enc_dim)} encoder output (maps: any values, e.g. zeros),
        mask: {m: (B, h, w, T, S)} for every modality of `tokens`.

        Returns (pred (B, Q, enc_dim), idx (B, Q) flat positions, valid (B, Q) bool, shapes): the packed
        predictions of the DECODER tokens, in flat sequence order per sample (zeros where not valid)."""
        seq, m, shapes = tk.collapse(tokens, {n: mask[n] for n in tokens})  # (B, N, enc_dim), (B, N)
        enc, _, _ = tk.collapse(self.encodings(tokens, months, patch_size, input_res), mask)  # (B, N, dim)
        is_query, is_context = m == DECODER, m == ENCODER
        context, c_lengths = tk.select(seq, is_context)  # (K_c, enc_dim)
        context = self.encoder_to_decoder_embed(self.input_norm(context))  # (K_c, dim)
        context = context + tk.select(enc, is_context)[0].to(context.dtype)
        queries, q_lengths = tk.select(enc, is_query)  # (K_q, dim)
        queries = self.mask_token.to(context.dtype) + queries.to(context.dtype)
        h = queries[None]  # (1, K_q, dim)
        if queries.shape[0] and context.shape[0]:
            for blk in self.blocks:
                h = blk(h, context[None], seq_lengths=q_lengths, key_lengths=c_lengths)  # (1, K_q, dim)
        pred = self.to_output_embed(self.norm(h[0]))  # (K_q, enc_dim)
        q_idx, q_valid = tk.pack_index(is_query)  # (B, Q)
        return tk.place(pred, q_valid), q_idx, q_valid, shapes

    def encodings(self, tokens: dict, months: torch.Tensor, patch_size: int, input_res: float) -> dict:
        """The decoder's composite encodings {m: (B, h, w, T, S, dim)} for token grids shaped as `tokens`."""
        ce = self.composite_encodings
        return {n: ce.encoding(n, (*t.shape[:-1], self.dim), months, patch_size, input_res)
                for n, t in tokens.items()}

    def forward_padded(self, tokens: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], months: torch.Tensor,
                       patch_size: int, input_res: float = BASE_GSD):
        """forward over the padded batch (every slot through the input layers, queries and context padded to
        the longest sample, a key-padding mask): the reference forward equals. Same inputs and outputs,
        except that pred's invalid slots hold whatever the padding computed."""
        x = {}
        for name, t in tokens.items():
            t = self.encoder_to_decoder_embed(self.input_norm(t))  # (B, h, w, T, S, dim)
            is_dec = (mask[name] == DECODER)[..., None]
            x[name] = torch.where(is_dec, self.mask_token.to(t.dtype), t)
        x = self.composite_encodings(x, months, patch_size, input_res)
        seq, m, shapes = tk.collapse(x, {n: mask[n] for n in x})  # (B, N, dim), (B, N)
        queries, q_idx, q_valid = tk.pack(seq, m == DECODER)  # (B, Q, dim)
        context, _, c_valid = tk.pack(seq, m == ENCODER)  # (B, M, dim)
        key_mask = tk.key_padding_mask(c_valid)
        if queries.shape[1] and context.shape[1]:
            for blk in self.blocks:
                queries = blk(queries, context, key_mask=key_mask)  # (B, Q, dim)
        pred = self.to_output_embed(self.norm(queries))  # (B, Q, enc_dim)
        return pred, q_idx, q_valid, shapes
