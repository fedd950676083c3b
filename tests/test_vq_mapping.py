"""open-muse checkpoint layouts -> diffusers: every tensor lands, outputs equal."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from muse.encode.image import (VQTokenizer, load_paella, load_vq, openmuse_paella_to_diffusers,
                               openmuse_vqgan_to_diffusers)
from muse.testing.tiny import build_tiny_paella, build_tiny_vq

torch.set_num_threads(1)


def to_openmuse_name(k: str, levels: int) -> str:
    """diffusers VQModel name -> the open-muse (taming) name, written out by hand from its layout."""
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder.down.\1.downsample.conv", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv", k)
    k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
    return k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def test_known_names_map_as_documented():
    m = openmuse_vqgan_to_diffusers({
        "encoder.down.0.block.1.conv1.weight": 0, "encoder.down.2.downsample.conv.bias": 0,
        "decoder.up.0.block.2.nin_shortcut.weight": 0, "decoder.up.4.upsample.conv.weight": 0,
        "encoder.mid.block_2.norm1.weight": 0, "decoder.norm_out.weight": 0, "quantize.embedding.weight": 0,
    }, num_levels=5)
    assert set(m) == {
        "encoder.down_blocks.0.resnets.1.conv1.weight", "encoder.down_blocks.2.downsamplers.0.conv.bias",
        "decoder.up_blocks.4.resnets.2.conv_shortcut.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "encoder.mid_block.resnets.1.norm1.weight", "decoder.conv_norm_out.weight", "quantize.embedding.weight"}


def test_openmuse_vqgan_checkpoint_loads_through_the_mapping(tmp_path):
    folder = build_tiny_vq(tmp_path / "diffusers")
    ref = load_vq(folder)
    state = ref.model.state_dict()
    # a random open-muse-layout checkpoint: same tensors, open-muse names, new random values
    g = torch.Generator().manual_seed(0)
    om = {to_openmuse_name(k, 5): torch.randn(v.shape, generator=g) for k, v in state.items()}
    assert len(om) == len(state) and any(".block." in k for k in om)
    back = openmuse_vqgan_to_diffusers(om, 5)
    assert set(back) == set(state)                                  # every tensor lands
    out = tmp_path / "openmuse"
    out.mkdir()
    save_file(om, str(out / "model.safetensors"))
    (out / "config.json").write_text((tmp_path / "diffusers" / "config.json").read_text())
    loaded = load_vq(str(out), fmt="open-muse")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, back[k]), k
    x = np.random.default_rng(0).integers(0, 255, (1, 256, 256, 3), dtype=np.uint8)
    assert loaded.encode(x).shape == (1, 16, 16)


def test_openmuse_vqgan_checkpoint_in_its_own_format_encodes_like_diffusers(tmp_path):
    """A small VQGAN saved the open-muse way (taming config keys, taming names, pytorch_model.bin)
    gives the same ids as the same weights in diffusers' VQModel built by hand."""
    from diffusers import VQModel

    torch.manual_seed(0)
    ref = VQModel(block_out_channels=(32, 32, 64, 64, 64), layers_per_block=1, latent_channels=8,
                  vq_embed_dim=8, num_vq_embeddings=64, mid_block_add_attention=False, lookup_from_codebook=True,
                  down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5).eval()
    out = tmp_path / "openmuse"
    out.mkdir()
    torch.save({to_openmuse_name(k, 5): v for k, v in ref.state_dict().items()}, str(out / "pytorch_model.bin"))
    (out / "config.json").write_text(json.dumps({
        "_class_name": "VQGANModel", "resolution": 256, "num_channels": 3, "hidden_channels": 32,
        "channel_mult": [1, 1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "no_attn_mid_block": True,
        "z_channels": 8, "num_embeddings": 64, "quantized_embed_dim": 8, "dropout": 0.0,
        "resample_with_conv": True, "commitment_cost": 0.25}))
    loaded = load_vq(str(out), fmt="open-muse")
    x = np.random.default_rng(0).integers(0, 255, (2, 256, 256, 3), dtype=np.uint8)
    expected = VQTokenizer(ref, torch.device("cpu"), 16).encode(x)
    assert torch.equal(loaded.encode(x), expected) and len(expected.unique()) > 1
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()),
                                                 "attn_resolutions": [16]}))
    with pytest.raises(ValueError, match="attn_resolutions"):
        load_vq(str(out), fmt="open-muse")


def test_openmuse_paella_checkpoint_in_its_own_format_encodes_like_diffusers(tmp_path):
    """A tiny PaellaVQ saved the open-muse way (c_hidden / c_latent / codebook_size, the codebook
    under its open-muse name, pytorch_model.bin) gives the same ids as the diffusers folder."""
    folder = build_tiny_paella(tmp_path / "diffusers")
    ref = load_paella(folder)
    state = {k.replace("vquantizer.embedding.weight", "vquantizer.codebook.weight"): v.contiguous()
             for k, v in ref.model.state_dict().items()}
    assert "vquantizer.codebook.weight" in state
    c = ref.model.config
    out = tmp_path / "openmuse"
    out.mkdir()
    torch.save(state, str(out / "pytorch_model.bin"))
    (out / "config.json").write_text(json.dumps({
        "_class_name": "PaellaVQModel", "levels": c.levels, "bottleneck_blocks": c.bottleneck_blocks,
        "c_hidden": c.embed_dim, "c_latent": c.latent_channels, "codebook_size": c.num_vq_embeddings,
        "scale_factor": c.scale_factor}))
    loaded = load_paella(str(out), fmt="open-muse")
    assert set(openmuse_paella_to_diffusers(state)) == set(ref.model.state_dict())
    x = np.random.default_rng(0).integers(0, 255, (1, 512, 512, 3), dtype=np.uint8)
    assert torch.equal(loaded.encode(x), ref.encode(x))


# ----------------------------------------------------------------------------- real on-disk format

# Copies of shared/facts/openmuse-*.txt: config.json and state-dict names/shapes/dtypes recorded from
# open-muse's own classes at the published configs (not from our mapping).

FIXTURES = Path(__file__).parent / "fixtures"


def read_facts(name: str) -> tuple[dict, dict]:
    """The published config.json and (name -> (shape, dtype)) of an open-muse checkpoint, from the
    facts file written from open-muse's own classes at the published configs."""
    text = (FIXTURES / f"openmuse-{name}.txt").read_text().splitlines()
    config = json.loads(next(line for line in text if line.startswith("# {")).removeprefix("# "))
    shapes = {}
    for line in text:
        if not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            shapes[key] = (tuple(json.loads(shape)), getattr(torch, dtype))
    return config, shapes


def write_openmuse_checkpoint(folder: Path, config: dict, shapes: dict) -> dict:
    """config.json + pytorch_model.bin with open-muse's names, shapes and dtypes. The float tensors
    are windows at distinct offsets into one random storage (torch.save writes a shared storage
    once), so the file stays small at the real sizes and no two same-shaped tensors are equal."""
    g = torch.Generator().manual_seed(0)
    floats = [k for k, (_, dt) in shapes.items() if dt.is_floating_point]
    big = max(int(np.prod(shapes[k][0])) for k in floats)
    storage = torch.rand(big + len(floats), generator=g) + 0.5     # positive: valid BatchNorm variances
    state = {}
    for i, (key, (shape, dtype)) in enumerate(shapes.items()):
        n = int(np.prod(shape))
        state[key] = storage[i:i + n].view(shape) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, str(folder / "pytorch_model.bin"))
    return state


@pytest.mark.parametrize("name, loader, convert", [
    ("paellavq-f8-8192", load_paella, openmuse_paella_to_diffusers),
    ("vqgan-f16-8192", load_vq, lambda s: openmuse_vqgan_to_diffusers(s, 5)),
])
def test_real_size_openmuse_checkpoint_loads_every_tensor(tmp_path, name, loader, convert):
    """The published config.json (with open-muse's own keys) builds the architecture its
    pytorch_model.bin was saved from: every tensor lands with its shape and values."""
    config, shapes = read_facts(name)
    written = write_openmuse_checkpoint(tmp_path / name, config, shapes)
    loaded = loader(str(tmp_path / name), fmt="open-muse").model.state_dict()
    expected = convert(written)
    assert set(loaded) == set(expected) and len(loaded) == len(shapes)
    for key, value in expected.items():
        assert loaded[key].shape == value.shape and torch.equal(loaded[key], value.to(loaded[key].dtype)), key


def test_openmuse_config_key_diffusers_would_ignore_is_an_error(tmp_path):
    config, shapes = read_facts("paellavq-f8-8192")
    write_openmuse_checkpoint(tmp_path / "ckpt", dict(config, c_hiden=512), shapes)
    with pytest.raises(ValueError, match="c_hiden"):
        load_paella(str(tmp_path / "ckpt"), fmt="open-muse")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(dict(config, _class_name="VQGANModel")))
    with pytest.raises(ValueError, match="VQGANModel"):
        load_paella(str(tmp_path / "ckpt"), fmt="open-muse")
