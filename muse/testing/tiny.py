"""Tiny random-init encoders, built on the spot, saved the way the real ones are published.

Tests, the demo and the CPU benches cannot reach the Hugging Face Hub, so they make:
- a T5EncoderModel (d_model 32) with a tokenizer trained here on a small corpus
  (`tokenizers` Unigram + T5's `</s>` post-processor), saved with `save_pretrained`;
- a diffusers VQModel with 5 levels (f16: 256px -> 16x16) and a 64-code codebook;
- a PaellaVQModel with f8 (512px -> 64x64), 64 codes;
- for `muse eval`: a CLIPModel (width 32) with a byte-level CLIP tokenizer (no merges) and a
  CLIPProcessor, and a torch.export FID feature extractor (two convolutions, 16 features).
They are loaded back by exactly the code users run (`TextEncoder.from_pretrained`,
`load_vq`, `load_paella`, `muse.evaluate.Clip`, `muse.evaluate.fid_extractor`).
"""

from __future__ import annotations

from pathlib import Path

import torch

CODEBOOK = 64
TEXT_DIM = 32

_CORPUS = [
    "a photograph of a red fox in the snow", "a blue square on a white background",
    "a green circle", "an oil painting of a lighthouse at dusk", "two cats sleeping on a sofa",
    "a yellow triangle next to a purple star", "city skyline at night with bright lights",
    "a bowl of fresh fruit on a wooden table", "the quick brown fox jumps over the lazy dog",
    "portrait of a woman wearing a hat", "a small boat on a calm lake", "orange and black stripes",
    "café crème brûlée naïve façade", "日本の風景 富士山", "emoji 🦊 and symbols % & #",
]


def build_tokenizer(out_dir: Path, vocab_size: int = 200, words: tuple[str, ...] = ()):
    """A Unigram tokenizer trained on `_CORPUS`; each of `words` becomes one whole token (the demo
    passes its world's colour and shape names: with 200 pieces " yellow" was 5 tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.add_tokens([AddedToken(w, single_word=True) for w in words])
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_t5(out_dir: str | Path, seed: int = 0, words: tuple[str, ...] = ()) -> str:
    from transformers import T5Config, T5EncoderModel

    out = Path(out_dir)
    tokenizer = build_tokenizer(out, words=words)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    T5EncoderModel(cfg).eval().save_pretrained(str(out))
    return str(out)


def build_tiny_vq(out_dir: str | Path, seed: int = 0) -> str:
    from diffusers import VQModel

    torch.manual_seed(seed)
    vq = VQModel(block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1, latent_channels=4, vq_embed_dim=4,
                 num_vq_embeddings=CODEBOOK, norm_num_groups=4, mid_block_add_attention=False,
                 down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
                 lookup_from_codebook=True, sample_size=256)
    vq.save_pretrained(str(out_dir))
    return str(out_dir)


def build_tiny_paella(out_dir: str | Path, seed: int = 0) -> str:
    from muse.encode.image import paella_class

    torch.manual_seed(seed)
    model = paella_class()(up_down_scale_factor=2, levels=3, bottleneck_blocks=1, embed_dim=16,
                           latent_channels=4, num_vq_embeddings=CODEBOOK)
    model.eval().save_pretrained(str(out_dir))
    return str(out_dir)


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character per byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    chars = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [chars[b] for b in range(256)]


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> str:
    """A random CLIPModel + CLIPProcessor (32px images, byte-level tokenizer) in `out_dir`."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(out), model_max_length=77)
    size = 32
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out))
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                                  "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                     vision_config={"image_size": size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 2, "num_attention_heads": 4},
                     projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(str(out))
    return str(out)


class _TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 (B, 3, H, W) -> (B, 16)
        h = torch.relu(self.conv1(x.float() / 255.0))
        return torch.relu(self.conv2(h)).mean(dim=(2, 3))


def build_tiny_fid_features(path: str | Path, seed: int = 0) -> str:
    """A random two-convolution extractor, uint8 [B,3,H,W] -> [B,16], saved with torch.export.save
    (batch and image size dynamic)."""
    from torch.export import Dim, export, save

    torch.manual_seed(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    dims = {0: Dim("batch", min=1, max=65536), 2: Dim("height", min=8, max=4096), 3: Dim("width", min=8, max=4096)}
    save(export(_TinyFeatures().eval(), (x,), dynamic_shapes={"x": dims}), str(path))
    return str(path)


def build_tiny_encoders(out_dir: str | Path, superres: bool = False) -> dict:
    """-> {"text_model", "vq_model", ["superres_vq_model"]}: local folders for the encode config."""
    out = Path(out_dir)
    paths = {"text_model": build_tiny_t5(out / "t5"), "vq_model": build_tiny_vq(out / "vqgan")}
    if superres:
        paths["superres_vq_model"] = build_tiny_paella(out / "paella")
    return paths


def tiny_encode_overrides(paths: dict) -> list[str]:
    """`--set` overrides that point a pipeline config at the tiny encoders (and size the model for them)."""
    sets = [f"encode.text_model={paths['text_model']}", f"encode.vq_model={paths['vq_model']}",
            "encode.vq_subfolder=null", "encode.vq_format=diffusers",
            f"model.codebook_size={CODEBOOK}", f"model.text_dim={TEXT_DIM}"]
    if "superres_vq_model" in paths:
        sets += [f"encode.superres_vq_model={paths['superres_vq_model']}", "encode.superres_vq_subfolder=null",
                 "encode.superres_vq_format=diffusers"]
    return sets
