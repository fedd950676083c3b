"""Muse base transformer: 16x16 VQ tokens (256px) conditioned on a T5 sequence.

    ids (B, 256) --embed--> (B, 256, C) --merge d x d blocks, + 2-D pos--> x (B, 256/d², C)
    text (B, L, text_dim) --Linear + LN--> memory (B, L, C)
    depth x Block(self-attn, cross-attn(memory), MLP) --LN, Linear--> logits (B, 256, codebook)

`downsample` d (aMUSEd's UVit2DModel `downsample`): each d x d block of token embeddings is
concatenated and projected to one position, and the head predicts the block's d² tokens from
it. d = 1 (the presets but `demo`) is the paper's model; d = 2 runs the layers on 64 positions,
~3.5x the training samples/s on 2 CPU cores at the demo's size (bench/RESULTS.md).

The mask token is an extra input id (`mask_token_id == codebook_size`) that the head
never predicts. Weights are saved diffusers-style: `config.json` + `model.safetensors`; config.json
holds every config field, `_class_name` and `_schema_version` (`layout.MODEL_CONFIG_VERSION`), and a
config.json of another version, or one that lacks a field, is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from safetensors.torch import load_file, save_file

from muse.config import MODEL_PRESETS, ModelConfig
from muse.layout import MODEL_CONFIG_VERSION, check_version
from muse.models.layers import Block, Grid2DPositions, key_padding_to_sdpa

_BASE = MODEL_PRESETS["base"]


@dataclass
class MuseConfig:
    # Defaults: the base preset and the pipeline config's defaults, not a third copy of them.
    kind: str = "base"
    hidden_size: int = _BASE["hidden_size"]
    depth: int = _BASE["depth"]
    num_heads: int = _BASE["num_heads"]
    mlp_ratio: float = _BASE["mlp_ratio"]
    mlp: str = _BASE["mlp"]
    dropout: float = _BASE["dropout"]
    downsample: int = _BASE["downsample"]
    codebook_size: int = ModelConfig.model_fields["codebook_size"].default
    text_dim: int = ModelConfig.model_fields["text_dim"].default
    grid_size: int = 16
    text_len_for_flops: int = 77  # only used by num_flops_per_sample

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def num_positions(self) -> int:
        """The transformer's sequence length: one position per downsample x downsample tokens."""
        return (self.grid_size // self.downsample) ** 2

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.mlp not in ("gelu", "geglu"):
            raise ValueError(f"mlp must be gelu or geglu, got {self.mlp!r}")
        if self.downsample < 1 or self.grid_size % self.downsample:
            raise ValueError(f"downsample {self.downsample} must be >= 1 and divide grid_size {self.grid_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MuseConfig":
        """Every field, as `to_dict` wrote it: an unknown or a missing key is an error."""
        known = {f.name for f in fields(cls)}
        unknown, missing = set(d) - known, known - set(d)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
        if missing:
            raise ValueError(f"{cls.__name__}: config keys missing {sorted(missing)}")
        return cls(**d)


class MemoryCache(NamedTuple):
    """The conditioning as the blocks use it (`MuseTransformer.memory_cache`)."""
    mask: torch.Tensor                                  # (B, 1, 1, L) bool for SDPA, True = attend
    kv: list[tuple[torch.Tensor, torch.Tensor]]         # per block: keys, values (B, H, L, Dh)


class PretrainedMixin:
    """save_pretrained / from_pretrained with safetensors + config.json (diffusers layout)."""

    config_class = MuseConfig

    def save_pretrained(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"_class_name": type(self).__name__,
                                                   "_schema_version": MODEL_CONFIG_VERSION,
                                                   **self.config.to_dict()}, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(d / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu"):
        d = Path(directory)
        cfg = json.loads((d / "config.json").read_text())
        check_version(cfg.pop("_schema_version", None), MODEL_CONFIG_VERSION, str(d / "config.json"),
                      "save the model again with this code (or train it again)", ValueError)
        cfg.pop("_class_name", None)
        model = cls(cls.config_class.from_dict(cfg))
        model.load_state_dict(load_file(str(d / "model.safetensors"), device=map_location))
        return model


class MuseTransformer(PretrainedMixin, nn.Module):
    config_class = MuseConfig

    def __init__(self, config: MuseConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.codebook_size + 1, c.hidden_size)  # +1: the mask token
        if c.downsample > 1:
            self.merge = nn.Linear(c.downsample ** 2 * c.hidden_size, c.hidden_size)
        self.pos_emb = Grid2DPositions(c.grid_size // c.downsample, c.hidden_size)
        self.text_proj = nn.Linear(c.text_dim, c.hidden_size)
        self.text_norm = nn.LayerNorm(c.hidden_size)
        self._add_memory_modules(c)
        self.blocks = nn.ModuleList(Block(c.hidden_size, c.num_heads, c.mlp_ratio, c.mlp, c.dropout,
                                          self_attn=self._self_attention(c))
                                    for _ in range(c.depth))
        self.norm_out = nn.LayerNorm(c.hidden_size)
        self.head = nn.Linear(c.hidden_size, c.downsample ** 2 * c.codebook_size)
        self.apply(_init_weights)
        # Recompute each block's activations in the backward pass instead of keeping them
        # (`train.activation_checkpointing`): a runtime switch, not part of the saved config.
        self.activation_checkpointing = False

    # Subclass hooks, called in __init__ at the place their modules belong: the registration
    # order fixes the seeded initialisation, so a subclass adds modules here, not afterwards.
    def _add_memory_modules(self, c: MuseConfig) -> None:
        """Modules that build the cross-attention memory besides the text (none here)."""

    def _self_attention(self, c: MuseConfig) -> nn.Module | None:
        """A block's self-attention; None: full attention over all tokens."""
        return None

    def memory(self, encoder_hidden_states, encoder_attention_mask, low_res_ids=None):
        """The cross-attention memory and its mask: here the projected text only."""
        return self.text_norm(self.text_proj(encoder_hidden_states)), encoder_attention_mask.bool()

    def memory_cache(self, encoder_hidden_states, encoder_attention_mask, low_res_ids=None) -> MemoryCache:
        """All the blocks take from the conditioning: the memory's mask and every block's
        cross-attention keys/values. None of it depends on the image tokens, so `generate`
        computes it once per call instead of once per decoding step."""
        memory, mask = self.memory(encoder_hidden_states, encoder_attention_mask, low_res_ids)
        return MemoryCache(key_padding_to_sdpa(mask), [block.cross.project_memory(memory) for block in self.blocks])

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, low_res_ids: torch.Tensor | None = None,
                memory_cache: MemoryCache | None = None) -> torch.Tensor:
        """`memory_cache`: `self.memory_cache(...)` of the conditioning, computed before; the
        conditioning arguments are then unused. Training computes it here: one code path."""
        x = self._merge(self.tok_emb(input_ids)) + self.pos_emb()              # (B, P, C)
        if memory_cache is None:
            memory_cache = self.memory_cache(encoder_hidden_states, encoder_attention_mask, low_res_ids)
        for block, kv in zip(self.blocks, memory_cache.kv):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, None, memory_cache.mask, kv, use_reentrant=False)
            else:
                x = block(x, None, memory_cache.mask, kv)
        return self._split(self.head(self.norm_out(x)))                        # (B, N, codebook)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) token embeddings -> (B, P, C): each d x d block concatenated, projected."""
        d, g = self.config.downsample, self.config.grid_size // self.config.downsample
        if d == 1:
            return x
        B, _, C = x.shape
        blocks = x.view(B, g, d, g, d, C).permute(0, 1, 3, 2, 4, 5).reshape(B, g * g, d * d * C)
        return self.merge(blocks)

    def _split(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, P, d² K) -> (B, N, K): each position's d² predictions back to their tokens, row-major."""
        d, g = self.config.downsample, self.config.grid_size // self.config.downsample
        if d == 1:
            return logits
        B = logits.shape[0]
        return logits.view(B, g, g, d, d, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, self.config.num_tokens, -1)

    def num_flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) per sample, counted as the matmuls are run.

        Each Linear costs 2 x in x out per row it is applied to: the image tokens for most, the
        memory for the cross-attention K/V, the text for `text_proj` (`_linear_rows`). Embedding
        lookups and the learned positions are additions, not matmuls: they cost nothing here.
        Backward is twice the forward (input and weight gradients), except that `text_proj`'s
        input is data and gets no gradient. Attention adds, per layer, 4 x hidden x N x keys
        forward (QK^T and AV), keys = `_keys_per_query()` for self-attention and the memory
        length for cross-attention, plus `_memory_attention_flops()` (the super-res model's
        low-res encoder); the text length is taken as `text_len_for_flops`.
        """
        c = self.config
        forward = input_grads = 0
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                flops = 2 * m.in_features * m.out_features * self._linear_rows(name)
                forward += flops
                input_grads += 0 if name == "text_proj" else flops
        keys = self._keys_per_query() + self._memory_len()
        attention = 4 * c.depth * c.hidden_size * c.num_positions * keys + self._memory_attention_flops()
        # attention's backward: 2x its forward, both inputs
        return 3 * attention + forward + forward + input_grads

    def _linear_rows(self, name: str) -> int:
        """How many rows (per sample) the Linear called `name` is applied to."""
        if name == "text_proj":
            return self.config.text_len_for_flops
        if name.endswith(".cross.kv"):
            return self._memory_len()
        return self.config.num_positions

    def _keys_per_query(self) -> float:
        return self.config.num_positions

    def _memory_len(self) -> int:
        return self.config.text_len_for_flops

    def _memory_attention_flops(self) -> float:
        """Forward attention FLOPs (QK^T, AV) of layers that build the memory (none here)."""
        return 0


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
