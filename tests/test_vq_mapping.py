"""open-muse checkpoint layouts -> diffusers: every tensor lands, outputs equal."""

import json
import re

import numpy as np
import torch
from safetensors.torch import save_file

from muse.encode.image import (load_paella, load_vq, openmuse_paella_to_diffusers,
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


def test_openmuse_paella_codebook_is_renamed(tmp_path):
    folder = build_tiny_paella(tmp_path / "diffusers")
    ref = load_paella(folder)
    state = {k.replace("vquantizer.embedding.weight", "vquantizer.codebook.weight"): v
             for k, v in ref.model.state_dict().items()}
    assert "vquantizer.codebook.weight" in state
    out = tmp_path / "openmuse"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(json.loads((tmp_path / "diffusers" / "config.json").read_text())))
    loaded = load_paella(str(out), fmt="open-muse")
    assert set(openmuse_paella_to_diffusers(state)) == set(ref.model.state_dict())
    x = np.random.default_rng(0).integers(0, 255, (1, 512, 512, 3), dtype=np.uint8)
    assert torch.equal(loaded.encode(x), ref.encode(x))
