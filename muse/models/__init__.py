"""The two Muse transformers, their presets and loading.

`build_model(cfg.model)` makes the base (16x16) or super-resolution (64x64) model from a
preset (`muse.config.MODEL_PRESETS`) plus the config's overrides; `load_pretrained(dir)` reads `config.json` to pick
the class.
"""

from __future__ import annotations

import json
from pathlib import Path

from muse.config import MODEL_PRESETS
from muse.models.base import MuseConfig, MuseTransformer
from muse.models.superres import MultiAxisAttention, MuseSuperRes, MuseSuperResConfig

__all__ = ["MuseConfig", "MuseTransformer", "MuseSuperResConfig", "MuseSuperRes", "MultiAxisAttention",
           "build_model", "model_config", "load_pretrained"]


def model_config(model_cfg) -> MuseConfig:
    """The model dataclass config from `cfg.model` (a config.ModelConfig): preset + overrides."""
    values = dict(MODEL_PRESETS[model_cfg.preset])
    for key in ("hidden_size", "depth", "num_heads", "mlp_ratio", "mlp", "dropout", "downsample"):
        v = getattr(model_cfg, key)
        if v is not None:
            values[key] = v
    values.update(codebook_size=model_cfg.codebook_size, text_dim=model_cfg.text_dim)
    if model_cfg.kind == "superres":
        values.pop("downsample")  # every 64x64 token is a position (ModelConfig refuses another value)
        return MuseSuperResConfig(**values, low_res_depth=model_cfg.low_res_depth)
    return MuseConfig(**values)


def build_model(model_cfg):
    config = model_config(model_cfg)
    return MuseSuperRes(config) if isinstance(config, MuseSuperResConfig) else MuseTransformer(config)


def load_pretrained(directory: str | Path, map_location: str = "cpu"):
    kind = json.loads((Path(directory) / "config.json").read_text()).get("kind", "base")
    cls = MuseSuperRes if kind == "superres" else MuseTransformer
    return cls.from_pretrained(directory, map_location=map_location)
