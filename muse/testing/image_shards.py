"""Phase-1 image shards written directly: the encode tests and `bench/encode.py` need no download."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from muse.layout import IMAGE_SCHEMA, IMAGES, PAGE_CHECKSUMS, done_marker, make_key, shard_name
from muse.storage import Storage


def picture(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BILINEAR)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_image_table(storage: Storage, shard_id: int, keys: list, captions: list, images: list[bytes],
                      size: int, replaced: list | None = None) -> None:
    """The one writer of test phase-1 shards: `images` (JPEGs, size x size) as rows that all
    succeeded, then the done marker, as a download leaves them."""
    n = len(keys)
    table = pa.table({
        "key": keys, "caption": captions, "caption_was_null": [False] * n,
        "url": [f"http://test/{k}.jpg" for k in keys], "image": images,
        "width": [size] * n, "height": [size] * n, "replaced": replaced or [False] * n,
        "status": ["success"] * n, "error_message": [""] * n, "reason": [""] * n,
    }, schema=IMAGE_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, **PAGE_CHECKSUMS)
    storage.write_bytes(shard_name(IMAGES, shard_id), buf.getvalue())
    storage.write_json(done_marker(IMAGES, shard_id), {"rows_in": n, "bytes": len(buf.getvalue())})


def write_image_shard(storage: Storage, shard_id: int, captions: list, size: int = 256,
                      replaced: list | None = None) -> list[bytes]:
    """A shard of seeded pictures under `captions`; returns the JPEGs."""
    n = len(captions)
    images = [jpeg(picture(shard_id * 1000 + i, size)) for i in range(n)]
    write_image_table(storage, shard_id, [make_key(shard_id, i, n) for i in range(n)], captions, images, size, replaced)
    return images
