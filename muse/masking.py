"""The Muse training objective, as pure functions with an explicit `torch.Generator`.

- mask ratio r = cos(pi/2 * u), u ~ U(0, 1) per example (the cosine schedule; peers that
  mask a fixed 50% train a different model);
- mask round(r * N) positions (at least one) chosen uniformly, replace them by the mask id;
- cross-entropy with label smoothing on the masked positions only;
- conditioning dropout for classifier-free guidance: the caption is replaced by the
  empty-caption embedding with probability p, i.e. KEPT with probability 1 - p
  (open-muse and diffusers' aMUSEd script invert this and keep it only p of the time).

Also the one padding of variable-length T5 embeddings (`pad_embeddings`, `pad_to`), shared by
the loader's batches, conditioning dropout and the sampler's guidance.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def mask_ratio(u: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens to mask for u in [0, 1]: cos(pi/2 u) (1 at u=0, 0 at u=1)."""
    return torch.cos(math.pi / 2 * u)


def mask_tokens(ids: torch.Tensor, mask_token_id: int, generator: torch.Generator | None = None):
    """ids (B, N) -> (input_ids with mask ids, mask (B, N) bool: True where masked)."""
    B, N = ids.shape
    u = torch.rand(B, 1, generator=generator, device=ids.device)
    n_masked = (mask_ratio(u) * N).round().clamp(min=1, max=N)                  # (B, 1)
    scores = torch.rand(B, N, generator=generator, device=ids.device)
    rank = scores.argsort(dim=1).argsort(dim=1)                                 # a random permutation rank
    mask = rank < n_masked
    return torch.where(mask, torch.full_like(ids, mask_token_id), ids), mask


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                label_smoothing: float = 0.1, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over masked positions; `weights` (B,) scales each example.

    logits (B, N, V) in any dtype. Only the masked rows are gathered and upcast to fp32: the
    loss never materialises an fp32 copy of the whole (B, N, V) tensor (at the base preset,
    B=16, N=256, V=8192 that copy alone is 134 MB, and ~1/3 of the rows are unmasked on average).
    """
    rows = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none",
                           label_smoothing=label_smoothing)                    # (M,)
    if weights is not None:
        rows = rows * weights.float()[:, None].expand_as(mask)[mask]
    return rows.sum() / mask.sum().clamp(min=1)


def pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `x` along `dim` to `length` (unchanged if already as long)."""
    extra = length - x.shape[dim]
    if extra <= 0:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, extra]
    return F.pad(x, pad)


def pad_embeddings(embs, dtype: torch.dtype = torch.float32,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, D] arrays or tensors -> hidden (B, max L, D) zero-padded + mask (B, max L) bool (True = real token)."""
    L = max(e.shape[0] for e in embs)
    hidden = torch.zeros(len(embs), L, embs[0].shape[1], dtype=dtype, device=device)
    mask = torch.zeros(len(embs), L, dtype=torch.bool, device=device)
    for i, e in enumerate(embs):
        hidden[i, : e.shape[0]] = e if isinstance(e, torch.Tensor) else torch.from_numpy(np.asarray(e))
        mask[i, : e.shape[0]] = True
    return hidden, mask


def drop_condition(hidden: torch.Tensor, attn_mask: torch.Tensor, empty_hidden: torch.Tensor,
                   empty_mask: torch.Tensor, p: float, generator: torch.Generator | None = None):
    """Replace each example's text by the empty caption with probability p.

    hidden (B, L, D), attn_mask (B, L) bool; empty_hidden (Le, D) or (1, Le, D), empty_mask
    (Le,) or (1, Le). Returns (hidden, attn_mask, kept (B,) bool), padded to max(L, Le).
    """
    B = hidden.shape[0]
    empty_hidden = empty_hidden.reshape(1, -1, hidden.shape[-1]).to(hidden.dtype)
    empty_mask = empty_mask.reshape(1, -1).bool()
    L = max(hidden.shape[1], empty_hidden.shape[1])
    hidden, attn_mask = pad_to(hidden, L, 1), pad_to(attn_mask.bool(), L, 1)
    empty_hidden, empty_mask = pad_to(empty_hidden, L, 1), pad_to(empty_mask, L, 1)
    kept = torch.rand(B, generator=generator, device=hidden.device) >= p
    hidden = torch.where(kept[:, None, None], hidden, empty_hidden.expand(B, -1, -1))
    attn_mask = torch.where(kept[:, None], attn_mask, empty_mask.expand(B, -1))
    return hidden, attn_mask, kept
