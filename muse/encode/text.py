"""Caption -> T5 encoder hidden states (real tokens only, EOS included, no padding).

`TextEncoder.from_pretrained` takes a hub id (`google/t5-v1_1-base`) or a local folder
holding a `T5EncoderModel` and its tokenizer; `TextEncoder.from_ref` the config's `ModelRef`.
T5 overflows in fp16, so only fp32 and bf16 are offered.
"""

from __future__ import annotations

import numpy as np
import torch

from muse.encode.loading import LOAD_LOCK

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# google/t5-v1_1-base as transformers' T5Config arguments: the text encoder of open-muse and of the
# paper's base model (tests and benches build it with random weights; the hub has no access here)
T5_BASE_CONFIG = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                      relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)


class TextEncoder:
    def __init__(self, model, tokenizer, max_length: int, device: torch.device):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.device = max_length, device
        self.dim = int(model.config.d_model)

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_length: int = 77, dtype: str = "fp32",
                        device: str = "cpu", key: str = "encode.text_model",
                        revision: str | None = None) -> "TextEncoder":
        """`key`: the config key that named the model, for the one-line error when it cannot come.
        `revision`: hub commit, tag or branch (None: the newest)."""
        from transformers import AutoTokenizer, T5EncoderModel

        from muse.hub import hub_kwargs, pin

        if dtype not in DTYPES:
            raise ValueError(f"encode.text_dtype must be one of {sorted(DTYPES)} (T5 overflows in fp16), got {dtype!r}")
        dev = torch.device(device)
        hub = hub_kwargs(name_or_path, key, revision=revision) | pin(revision)  # before the load: no retries offline
        with LOAD_LOCK:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub)
            model = T5EncoderModel.from_pretrained(name_or_path, dtype=DTYPES[dtype], **hub).to(dev).eval()
        return cls(model, tokenizer, max_length, dev)

    @classmethod
    def from_ref(cls, ref, max_length: int = 77, dtype: str = "fp32", device: str = "cpu") -> "TextEncoder":
        """The T5 a `muse.config.ModelRef` names (`EncodeConfig.text_ref`), at its pinned revision."""
        return cls.from_pretrained(ref.path, max_length, dtype, device, key=ref.key, revision=ref.revision)

    @torch.inference_mode()
    def encode_batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden (B, L, D) float32 on device, lengths (B,)) with L = longest caption in tokens."""
        tok = self.tokenizer(list(captions), max_length=self.max_length, truncation=True, padding="longest",
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return hidden, mask.sum(1)

    def encode(self, captions: list[str]) -> list[np.ndarray]:
        """-> one float32 array [L_i, D] per caption, real tokens only."""
        if not captions:
            return []
        hidden, lengths = self.encode_batch(captions)
        hidden = hidden.cpu().numpy()
        return [hidden[i, : int(n)] for i, n in enumerate(lengths.tolist())]
