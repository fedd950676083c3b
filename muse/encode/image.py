"""Images <-> VQ token ids: the open-muse VQGAN f16 (base, 256px -> 16x16) through diffusers'
`VQModel`, and PaellaVQ f8 (super-resolution, 512px -> 64x64) through `PaellaVQModel`.

Both load diffusers-format weights (`from_pretrained` of a hub id or local folder) or an
original open-muse checkpoint (`fmt="open-muse"`) through a key mapping; `vq_from_ref` and
`paella_from_ref` load what a config's `ModelRef` names. Inputs are RGB in [0, 1]; the VQGAN runs
in fp32 (it produces NaN in fp16).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import threading
from pathlib import Path

import numpy as np
import torch

from muse.encode.loading import LOAD_LOCK

# The open-muse VQGAN f16/8192 architecture as diffusers VQModel arguments (FACTS: 128 x
# [1,2,2,4,6] channels, 2 res blocks per level, no attention, 64-d codes).
VQGAN_F16_CONFIG = dict(block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2, latent_channels=64,
                        vq_embed_dim=64, num_vq_embeddings=8192, mid_block_add_attention=False,
                        down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5)

# ----------------------------------------------------------------------------- key mappings

def openmuse_vqgan_to_diffusers(state: dict, num_levels: int) -> dict:
    """open-muse VQGAN (taming layout) state dict -> diffusers VQModel names (FACTS.md)."""
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"encoder\.down\.(\d+)\.block\.(\d+)", r"encoder.down_blocks.\1.resnets.\2", k)
        k = re.sub(r"encoder\.down\.(\d+)\.downsample\.conv", r"encoder.down_blocks.\1.downsamplers.0.conv", k)
        k = re.sub(r"decoder\.up\.(\d+)\.block\.(\d+)",
                   lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}", k)
        k = re.sub(r"decoder\.up\.(\d+)\.upsample\.conv",
                   lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv", k)
        k = re.sub(r"mid\.block_(\d)", lambda m: f"mid_block.resnets.{int(m[1]) - 1}", k)
        k = k.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")
        out[k] = value
    return out


def openmuse_paella_to_diffusers(state: dict) -> dict:
    """open-muse PaellaVQ state dict -> diffusers PaellaVQModel names (the codebook is renamed)."""
    return {k.replace("vquantizer.codebook.weight", "vquantizer.embedding.weight"): v for k, v in state.items()}


# ----------------------------------------------------------------------------- loading

def paella_class():
    """PaellaVQModel moved between diffusers versions."""
    try:
        from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    except ImportError:  # diffusers < 0.30
        from diffusers.pipelines.wuerstchen import PaellaVQModel
    return PaellaVQModel


def _resolve(name_or_path: str, subfolder: str | None, hub: dict) -> str:
    """Local folder (+subfolder), or a hub snapshot at hub["revision"] (open-muse format), downloading
    only the subfolder's files: an open-muse repository holds other models beside the one used."""
    p = Path(name_or_path)
    if not p.exists():
        from huggingface_hub import snapshot_download

        only = [f"{subfolder}/*"] if subfolder else None
        p = Path(snapshot_download(name_or_path, allow_patterns=only, **hub))
    return str(p / subfolder) if subfolder else str(p)


def _read_state(folder: str) -> dict:
    f = Path(folder)
    for name in ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.safetensors"):
        if (f / name).exists():
            from safetensors.torch import load_file

            return load_file(str(f / name))
    for name in ("pytorch_model.bin", "model.ckpt", "vqgan.ckpt"):
        if (f / name).exists():
            state = torch.load(str(f / name), map_location="cpu", weights_only=True)
            return state.get("state_dict", state)
    raise FileNotFoundError(f"{folder}: no model.safetensors / pytorch_model.bin")


def _load(cls, name_or_path: str, subfolder: str | None, fmt: str, convert, key: str, revision: str | None):
    from muse.hub import hub_kwargs, pin

    hub = hub_kwargs(name_or_path, key, subfolder, revision)  # before the load: no minute of retries offline
    with LOAD_LOCK:
        return _load_unlocked(cls, name_or_path, subfolder, fmt, convert, hub | pin(revision))


def _load_unlocked(cls, name_or_path: str, subfolder: str | None, fmt: str, convert, hub: dict):
    if fmt == "diffusers":  # diffusers fetches only the subfolder's files
        return cls.from_pretrained(name_or_path, subfolder=subfolder, **hub)
    if fmt != "open-muse":
        raise ValueError(f"unknown VQ format {fmt!r}: diffusers or open-muse")
    folder = _resolve(name_or_path, subfolder, hub)
    config = json.loads((Path(folder) / "config.json").read_text())
    model = cls.from_config(openmuse_config(cls, config, f"{folder}/config.json"))
    state = convert(_read_state(folder), model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches: the config does not describe these weights
        raise ValueError(f"{folder}: open-muse weights do not fit the model built from its config.json: {e}") from e
    if missing or unexpected:
        raise ValueError(f"{folder}: open-muse checkpoint does not match after key mapping: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model


# ----------------------------------------------------------------------------- open-muse configs

def _need(config: dict, key: str, where: str):
    if key not in config:
        raise ValueError(f"{where}: open-muse config lacks {key!r}, which fixes the architecture; add it "
                         f"(the published values are in FACTS.md)")
    return config[key]


def _only(value, allowed, key: str, where: str, why: str) -> dict:
    if value != allowed:
        raise ValueError(f"{where}: {key}={value!r} is not supported ({why}); only {allowed!r} loads")
    return {}


def _vqgan_blocks(mult, c: dict, where: str) -> dict:
    ch, n = _need(c, "hidden_channels", where), len(mult)
    return dict(block_out_channels=[ch * m for m in mult], down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n)


# open-muse VQGANModel key -> (value, whole config, where) -> diffusers VQModel arguments.
# dropout is inactive in eval mode and commitment_cost is a training-loss weight: neither
# changes the encoder, so they are accepted and dropped.
_VQGAN_KEYS = {
    "resolution": lambda v, c, w: dict(sample_size=v),
    "num_channels": lambda v, c, w: dict(in_channels=v, out_channels=v),
    "hidden_channels": lambda v, c, w: (_need(c, "channel_mult", w), {})[1],
    "channel_mult": _vqgan_blocks,
    "num_res_blocks": lambda v, c, w: dict(layers_per_block=v),
    "attn_resolutions": lambda v, c, w: _only(list(v), [], "attn_resolutions", w,
                                              "diffusers' DownEncoderBlock2D has no attention"),
    "no_attn_mid_block": lambda v, c, w: _only(v, True, "no_attn_mid_block", w,
                                               "the key mapping has no mid-block attention names")
                                         | dict(mid_block_add_attention=False),
    "z_channels": lambda v, c, w: dict(latent_channels=v, vq_embed_dim=c.get("quantized_embed_dim", v)),
    "quantized_embed_dim": lambda v, c, w: dict(vq_embed_dim=v),
    "num_embeddings": lambda v, c, w: dict(num_vq_embeddings=v),
    "resample_with_conv": lambda v, c, w: _only(v, True, "resample_with_conv", w,
                                                "diffusers resamples with a convolution"),
    "dropout": lambda v, c, w: {},
    "commitment_cost": lambda v, c, w: {},
}
# open-muse PaellaVQModel key -> diffusers PaellaVQModel argument (same defaults on both sides).
_PAELLA_KEYS = {
    "c_hidden": lambda v, c, w: dict(embed_dim=v),
    "c_latent": lambda v, c, w: dict(latent_channels=v),
    "codebook_size": lambda v, c, w: dict(num_vq_embeddings=v),
}
_OPENMUSE = {"VQModel": ("VQGANModel", _VQGAN_KEYS), "PaellaVQModel": ("PaellaVQModel", _PAELLA_KEYS)}
# What open-muse's VQGAN does without a config key: look ids up in its codebook, run in fp32.
_OPENMUSE_FIXED = {"VQModel": dict(lookup_from_codebook=True, force_upcast=True), "PaellaVQModel": {}}


def openmuse_config(cls, config: dict, where: str = "config.json") -> dict:
    """open-muse config.json -> `cls.from_config` arguments. Keys the diffusers class takes pass
    through (repositories already converted); any other key would be silently ignored by diffusers
    (building its default architecture), so it is an error."""
    om_name, table = _OPENMUSE[cls.__name__]
    name = config.get("_class_name", om_name)
    if name not in (om_name, cls.__name__):
        raise ValueError(f"{where}: _class_name {name!r} is not an open-muse {om_name} ({cls.__name__}); "
                         f"point this setting at the right checkpoint")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    out = dict(_OPENMUSE_FIXED[cls.__name__]) if any(k in table for k in config) else {}
    for key, value in config.items():
        if key.startswith("_"):  # _class_name, _diffusers_version: metadata
            continue
        if key in table:
            out.update(table[key](value, config, where))
        elif key in accepted:
            out[key] = value
        else:
            raise ValueError(f"{where}: unknown key {key!r}: neither an open-muse {om_name} key "
                             f"({sorted(table)}) nor a {cls.__name__} argument; diffusers would ignore it "
                             f"and build a different model. Fix the config, or use format 'diffusers'")
    return out


def decode_latents(model, quant: torch.Tensor) -> torch.Tensor:
    """Quantized latents (B, C, h, w) -> pictures (B, 3, h*f, w*f), RGB in [0, 1] before clamping.

    Differentiable: the demo's VQ trainer (testing/shapes_vq.py) trains through it, `VQTokenizer.decode` decodes ids."""
    if type(model).__name__ == "PaellaVQModel":
        return model.decode(quant, force_not_quantize=True).sample
    return model.decoder(model.post_quant_conv(quant), None)


_EXACT_LOCK = threading.Lock()
_exact = {"depth": 0, "saved": None}  # threads inside exact_fp32 now, and the flags to restore


@contextlib.contextmanager
def exact_fp32():
    """TF32 off and the highest fp32 matmul precision, restored after. On Ampere and later GPUs
    TF32 (cuDNN convolutions use it by default) keeps 10 mantissa bits, enough to move an id
    that is near a codebook tie: the same image would get other ids on other GPUs or settings.

    The flags are process-wide and threads encode at once (Prefect task threads), so they are
    not saved and restored per call, which would let one thread's exit turn TF32 back on while
    another still encodes: the first thread in saves and clears them, the last one out restores
    them. (Encode worker processes clear them once at start, `shards._worker_start`.)"""
    with _EXACT_LOCK:
        if _exact["depth"] == 0:
            _exact["saved"] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                               torch.get_float32_matmul_precision())
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
        _exact["depth"] += 1
    try:
        yield
    finally:
        with _EXACT_LOCK:
            _exact["depth"] -= 1
            if _exact["depth"] == 0:
                saved = _exact["saved"]
                torch.set_float32_matmul_precision(saved[2])  # first: it sets matmul.allow_tf32 too
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]


class VQTokenizer:
    """Batched image <-> ids with a diffusers VQModel or PaellaVQModel."""

    def __init__(self, model, device: torch.device, factor: int):
        self.model, self.device, self.factor = model.to(device).eval(), device, factor
        self.is_paella = type(model).__name__ == "PaellaVQModel"
        quant = model.vquantizer if self.is_paella else model.quantize
        self.codebook_size = int(quant.embedding.weight.shape[0])

    def _quantizer(self):
        return self.model.vquantizer if self.is_paella else self.model.quantize

    @torch.inference_mode()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> ids (B, H/f, W/f) int64 (on CPU)."""
        x = torch.as_tensor(images).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        with exact_fp32():  # ids are data: the same on every GPU, not only close
            latents = self.model.encode(x).latents
            _, _, (_, _, idx) = self._quantizer()(latents)
        B, _, h, w = latents.shape
        return idx.reshape(B, h, w).cpu()

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> np.ndarray:
        """ids (B, h, w) -> uint8 images (B, h*f, w*f, 3)."""
        ids = ids.to(self.device).long()
        B, h, w = ids.shape
        q = self._quantizer()
        C = q.embedding.weight.shape[1]
        quant = q.embedding(ids.reshape(-1)).view(B, h, w, C).permute(0, 3, 1, 2).contiguous()
        x = decode_latents(self.model, quant)
        return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _factor(model) -> int:
    if type(model).__name__ == "PaellaVQModel":
        c = model.config
        return int(c.up_down_scale_factor * 2 ** (c.levels - 1))
    return int(2 ** (len(model.config.block_out_channels) - 1))


def load_vq(name_or_path: str, subfolder: str | None = None, fmt: str = "diffusers",
            device: str = "cpu", key: str = "encode.vq_model", revision: str | None = None) -> VQTokenizer:
    """The base tokenizer (open-muse VQGAN f16) as a VQTokenizer, fp32."""
    from diffusers import VQModel

    def convert(state, model):
        return openmuse_vqgan_to_diffusers(state, len(model.config.block_out_channels))

    model = _load(VQModel, name_or_path, subfolder, fmt, convert, key, revision).float()
    return VQTokenizer(model, torch.device(device), _factor(model))


def load_paella(name_or_path: str, subfolder: str | None = None, fmt: str = "diffusers",
                device: str = "cpu", key: str = "encode.superres_vq_model",
                revision: str | None = None) -> VQTokenizer:
    """The super-resolution tokenizer (PaellaVQ f8) as a VQTokenizer, fp32, eval mode (BatchNorm)."""
    model = _load(paella_class(), name_or_path, subfolder, fmt, lambda s, m: openmuse_paella_to_diffusers(s),
                  key, revision).float()
    return VQTokenizer(model, torch.device(device), _factor(model))


def vq_from_ref(ref, device: str = "cpu") -> VQTokenizer:
    """The base tokenizer a `muse.config.ModelRef` names (`EncodeConfig.vq_ref`), at its pinned revision."""
    return load_vq(ref.path, ref.subfolder, ref.format, device, key=ref.key, revision=ref.revision)


def paella_from_ref(ref, device: str = "cpu") -> VQTokenizer:
    """The super-res tokenizer a `muse.config.ModelRef` names (`EncodeConfig.superres_vq_ref`)."""
    return load_paella(ref.path, ref.subfolder, ref.format, device, key=ref.key, revision=ref.revision)
