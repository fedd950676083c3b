"""Muse super-resolution transformer: 64x64 tokens (512px) conditioned on text + 16x16 tokens.

The low-resolution ids are embedded (with their own 2-D positions) and pass through
`low_res_depth` self-attention layers (the paper's low-res transformer, section 2.3 / Fig. 4);
their output, normalised, is concatenated with the projected text to form the high-res
transformer's cross-attention memory (text first, then the 16x16 tokens row-major).

Self-attention over 4096 tokens is multi-axis (MaxViT-style): the grid is cut into
patches of `patch_size` x `patch_size`; half of the heads attend within each patch
(block attention, P^2 keys per query), the other half across patches at the same
in-patch position (grid attention, (G/P)^2 keys per query). The two halves are
concatenated back in head order and only then go through the output projection (one
peer forgets it). Cost per layer is N * (P^2 + (G/P)^2) instead of N^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from muse.config import ModelConfig
from muse.models.base import MuseConfig, MuseTransformer
from muse.models.layers import Block, Grid2DPositions, attention


@dataclass
class MuseSuperResConfig(MuseConfig):
    kind: str = "superres"
    grid_size: int = 64
    low_res_grid_size: int = 16
    patch_size: int = 8
    low_res_depth: int = ModelConfig.model_fields["low_res_depth"].default

    def validate(self) -> None:
        super().validate()
        if self.downsample != 1:
            raise ValueError(f"the super-res model has no downsample (got {self.downsample}): it attends within patches")
        if self.grid_size % self.patch_size:
            raise ValueError(f"grid_size {self.grid_size} not divisible by patch_size {self.patch_size}")
        if self.num_heads < 2 or self.num_heads % 2:
            raise ValueError(f"multi-axis attention splits the heads in two: num_heads must be even, "
                             f"got {self.num_heads}")


class MultiAxisAttention(nn.Module):
    """Half the heads: block attention within patches; other half: grid attention across them."""

    def __init__(self, dim: int, num_heads: int, grid_size: int, patch_size: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.grid, self.patch = grid_size, patch_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        P, n, H, Dh = self.patch, self.grid // self.patch, self.num_heads, self.head_dim
        hb = H // 2
        drop = self.dropout if self.training else 0.0
        # token (r, c) with r = pr*P + ir, c = pc*P + ic  ->  axes (B, pr, ir, pc, ic, 3, H, Dh)
        qkv = self.qkv(x).view(B, n, P, n, P, 3, H, Dh)
        # block heads: one sequence per patch (pr, pc), ordered by in-patch position (ir, ic)
        blk = qkv[..., :hb, :].permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B * n * n, hb, P * P, Dh)
        ob = attention(blk[0], blk[1], blk[2], dropout_p=drop)
        ob = ob.view(B, n, n, hb, P, P, Dh).permute(0, 1, 4, 2, 5, 3, 6)      # (B, pr, ir, pc, ic, hb, Dh)
        # grid heads: one sequence per in-patch position (ir, ic), ordered by patch (pr, pc)
        grd = qkv[..., hb:, :].permute(5, 0, 2, 4, 6, 1, 3, 7).reshape(3, B * P * P, H - hb, n * n, Dh)
        og = attention(grd[0], grd[1], grd[2], dropout_p=drop)
        og = og.view(B, P, P, H - hb, n, n, Dh).permute(0, 4, 1, 5, 2, 3, 6)  # (B, pr, ir, pc, ic, hg, Dh)
        out = torch.cat([ob, og], dim=-2).reshape(B, N, C)                     # heads back in order
        return self.proj(out)


class MuseSuperRes(MuseTransformer):
    """The base transformer (its __init__, forward and weights layout) with two hooks filled in:
    low-res id embeddings in the memory, multi-axis self-attention in every block."""

    config_class = MuseSuperResConfig

    def _add_memory_modules(self, c: MuseSuperResConfig) -> None:
        """The low-res encoder: the low-resolution ids, embedded with their own 2-D positions,
        through `low_res_depth` pre-norm self-attention + MLP layers; its output joins the text memory."""
        self.low_res_emb = nn.Embedding(c.codebook_size, c.hidden_size)
        self.low_res_pos = Grid2DPositions(c.low_res_grid_size, c.hidden_size)
        self.low_res_layers = nn.ModuleList(Block(c.hidden_size, c.num_heads, c.mlp_ratio, c.mlp, c.dropout,
                                                  cross_attention=False) for _ in range(c.low_res_depth))
        self.low_res_norm = nn.LayerNorm(c.hidden_size)

    def _self_attention(self, c: MuseSuperResConfig) -> nn.Module:
        return MultiAxisAttention(c.hidden_size, c.num_heads, c.grid_size, c.patch_size, c.dropout)

    def memory(self, encoder_hidden_states, encoder_attention_mask, low_res_ids=None):
        if low_res_ids is None:
            raise ValueError("the super-resolution model needs low_res_ids (B, 256)")
        text = self.text_norm(self.text_proj(encoder_hidden_states))            # (B, L, C)
        low = self.low_res_emb(low_res_ids) + self.low_res_pos()               # (B, 256, C)
        for layer in self.low_res_layers:
            low = layer(low)
        low = self.low_res_norm(low)
        mask = torch.cat([encoder_attention_mask.bool(),
                          torch.ones(low.shape[:2], dtype=torch.bool, device=low.device)], dim=1)
        return torch.cat([text, low], dim=1), mask

    def _keys_per_query(self) -> float:
        c = self.config  # half the heads see P^2 keys, the other half (G/P)^2
        return 0.5 * (c.patch_size ** 2 + (c.grid_size // c.patch_size) ** 2)

    def _memory_len(self) -> int:
        return self.config.text_len_for_flops + self.config.low_res_grid_size ** 2

    def _linear_rows(self, name: str) -> int:
        if name.startswith("low_res_layers."):  # the low-res encoder runs over the 16x16 tokens
            return self.config.low_res_grid_size ** 2
        return super()._linear_rows(name)

    def _memory_attention_flops(self) -> float:
        c = self.config  # full self-attention among the low-res tokens, QK^T and AV
        return 4 * c.low_res_depth * c.hidden_size * c.low_res_grid_size ** 4
