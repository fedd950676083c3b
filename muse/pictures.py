"""Phase-1 pictures as the models see them: the one resize rule for the JPEGs in images/ shards.

Encode (`muse/encode/shards.py`) turns them into VQ ids with it, and eval (`muse/evaluate.py`)
scores generated pictures against the real ones read with it, so both see the same pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_picture(jpeg: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> uint8 (size, size, 3): the one resize rule, shared by encode and eval's real images."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=None)
    return np.asarray(img)
