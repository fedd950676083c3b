"""Phase-1 image shards written directly: the encode tests and `bench/encode.py` need no download.

`generation=K` writes a shard's generation K as a retry pass leaves it (layout.py "Generations"):
the same keys and captions, the rows named in `changed` with another picture (the ones fetched
again), an int32 `retries` column that generation 0 lacks, under `images/NNNNN.gK.*`."""

from __future__ import annotations

import io
from collections.abc import Iterable

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
                      size: int, replaced: list | None = None, generation: int = 0,
                      retries: list[int] | None = None) -> None:
    """The one writer of test phase-1 shards: `images` (JPEGs, size x size) as rows that all
    succeeded, then the done marker, as a download leaves them (`generation` K >= 1: as a retry
    pass leaves its rewrite, with `retries` per row, 0 by default)."""
    n = len(keys)
    table = pa.table({
        "key": keys, "caption": captions, "caption_was_null": [False] * n,
        "url": [f"http://test/{k}.jpg" for k in keys], "image": images,
        "width": [size] * n, "height": [size] * n, "replaced": replaced or [False] * n,
        "status": ["success"] * n, "error_message": [""] * n, "reason": [""] * n,
    }, schema=IMAGE_SCHEMA)
    if generation:
        table = table.append_column(pa.field("retries", pa.int32()), pa.array(retries or [0] * n, pa.int32()))
    buf = io.BytesIO()
    pq.write_table(table, buf, **PAGE_CHECKSUMS)
    storage.write_bytes(shard_name(IMAGES, shard_id, generation=generation), buf.getvalue())
    storage.write_json(done_marker(IMAGES, shard_id, generation), {"rows_in": n, "bytes": len(buf.getvalue())})


def write_image_shard(storage: Storage, shard_id: int, captions: list, size: int = 256,
                      replaced: list | None = None, generation: int = 0, changed: Iterable[int] = ()) -> list[bytes]:
    """A shard of seeded pictures under `captions`; returns the JPEGs. `generation` K >= 1 with
    `changed` rows: those rows get another seeded picture (and `retries` 1), the others the
    picture generation 0 has."""
    n, changed = len(captions), set(changed)
    seeds = [shard_id * 1000 + i + (500 * generation if i in changed else 0) for i in range(n)]
    images = [jpeg(picture(seed, size)) for seed in seeds]
    write_image_table(storage, shard_id, [make_key(shard_id, i, n) for i in range(n)], captions, images, size,
                      replaced, generation, [int(i in changed) for i in range(n)] if generation else None)
    return images
