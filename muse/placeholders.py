"""Solid-colour stand-ins for rows whose image could not be fetched.

The colour comes from a hash of the row's key (not from any RNG), so every run, process
and machine produces the same placeholder for the same row.
"""

from __future__ import annotations

import hashlib

from PIL import Image


def color_of(key: str) -> tuple[int, int, int]:
    """The RGB colour for `key`: the first three bytes of its SHA-256."""
    d = hashlib.sha256(key.encode("utf-8")).digest()
    return d[0], d[1], d[2]


def solid_color(key: str, size: int | tuple[int, int]) -> Image.Image:
    """An RGB image of `size` (int: square, or (width, height)) filled with `color_of(key)`."""
    wh = (size, size) if isinstance(size, int) else tuple(size)
    return Image.new("RGB", wh, color_of(key))
