"""Transformer building blocks shared by the base and super-resolution models.

All attention goes through `F.scaled_dot_product_attention` (`attention`), so a GPU picks its fused
kernels (flash / memory-efficient); projections are fused (one QKV matmul, one KV matmul
for the text). Blocks are pre-norm with a residual around every sub-layer: self-attention,
cross-attention to the conditioning memory, MLP. (Two peers drop the MLP residual.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def key_padding_to_sdpa(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool (True = real token) -> [B, 1, 1, L] bool for SDPA (True = attend).

    A row with no real token would make softmax NaN; let it see its first key instead. Pure
    tensor ops, no `if`: a branch on `empty.any()` would sync the GPU with the host and break
    a `torch.compile` graph. The model builds this once per forward (`MemoryCache.mask`).
    """
    mask = mask.bool()
    first = torch.zeros_like(mask)
    first[:, 0] = True
    mask = mask | (first & ~mask.any(dim=1, keepdim=True))
    return mask[:, None, None, :]


def attention(q, k, v, attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, the one call every attention layer makes.

    On the meta device (`muse.memory` counts saved activations there) SDPA has only its math
    kernel, which keeps the (B, H, N, L) attention matrix for backward; a GPU's fused kernels
    keep q, k, v, the output and a logsumexp. Run the fused kernel's meta implementation there
    so the count is what a GPU will hold.
    """
    if q.device.type == "meta":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, attn_mask=attn_mask)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    """Full multi-head self-attention over the token grid."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        out = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys/values from the conditioning memory (text, low-res tokens)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's keys and values (B, H, L, Dh): they do not depend on the image tokens, so a
        sampler computes them once per call (`MuseTransformer.memory_cache`)."""
        B, L, _ = memory.shape
        k, v = self.kv(memory).view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, memory_mask: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`memory_mask`: (B, L) bool padding mask, or its `key_padding_to_sdpa` (B, 1, 1, L), which
        the model builds once per forward for all its blocks. `kv`: this layer's
        `project_memory(memory)`, computed before (then `memory` is unused)."""
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)             # (B, H, N, Dh)
        k, v = kv if kv is not None else self.project_memory(memory)
        attn_mask = memory_mask if memory_mask.dim() == 4 else key_padding_to_sdpa(memory_mask)
        out = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float, kind: str = "gelu", dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.kind = kind
        self.fc1 = nn.Linear(dim, 2 * hidden if kind == "geglu" else hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.kind == "geglu":
            a, gate = h.chunk(2, dim=-1)
            h = a * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.drop(self.fc2(h))


class Block(nn.Module):
    """Pre-norm block: x += SelfAttn(LN x); x += CrossAttn(LN x, memory); x += MLP(LN x).
    With `cross_attention=False` (the super-res model's low-res encoder) there is no memory."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mlp: str, dropout: float,
                 self_attn: nn.Module | None = None, cross_attention: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = self_attn if self_attn is not None else SelfAttention(dim, num_heads, dropout)
        if cross_attention:
            self.norm2 = nn.LayerNorm(dim)
            self.cross = CrossAttention(dim, num_heads, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, mlp, dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, kv: tuple | None = None) -> torch.Tensor:
        """`kv`: the cross-attention's keys and values of the memory, computed before."""
        x = x + self.attn(self.norm1(x))
        if memory is not None or kv is not None:
            x = x + self.cross(self.norm2(x), memory, memory_mask, kv)
        x = x + self.mlp(self.norm3(x))
        return x


class Grid2DPositions(nn.Module):
    """Learned 2-D positions: a row and a column table, summed (grid x grid tokens, row-major)."""

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.grid = grid
        self.row = nn.Parameter(torch.randn(grid, dim) * 0.02)
        self.col = nn.Parameter(torch.randn(grid, dim) * 0.02)

    def forward(self) -> torch.Tensor:
        return (self.row[:, None, :] + self.col[None, :, :]).reshape(self.grid * self.grid, -1)  # (N, C)
