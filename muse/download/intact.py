"""Finished image shards are checked, not trusted: a truncated shard is rebuilt by the next download.

A shard counts as finished when `images/NNNNN_stats.json` exists (written after the Parquet
file). A file cut short later (a copy that stopped, a bad disk) would keep its marker and be
skipped for ever, so planning compares each finished shard's size in one listing with the
`bytes` its marker records (no read at all); a shard that fails, or whose marker records no
`bytes` (not written by this code), loses its marker and is fetched again.
"""

from __future__ import annotations

import json
import sys

from muse.layout import IMAGES, done_marker, done_shards, shard_name
from muse.storage import Storage


def _problem(marker: dict, size: int | None) -> str | None:
    """Why a shard is not whole, or None: its size in the listing against the `bytes` its marker records."""
    if size is None:
        return "missing"
    if "bytes" not in marker:
        return "its _stats.json records no bytes (not written by this code's download)"
    return None if size == marker["bytes"] else f"{size} bytes, its stats say {marker['bytes']}"


def check_image_shards(storage: Storage) -> tuple[list[int], dict[int, str]]:
    """(the finished image shards that are whole, {finished but broken shard: why}), read only
    (`muse plan`). Cost: one listing and one concurrent batch of marker reads."""
    sizes = storage.sizes(IMAGES)
    done = done_shards(storage, IMAGES, sizes)  # the same listing: images/ is listed once
    markers = {rel: json.loads(data) for rel, data in
               storage.read_many([done_marker(IMAGES, sid) for sid in done]).items()}
    problems = {sid: _problem(markers[done_marker(IMAGES, sid)], sizes.get(shard_name(IMAGES, sid)))
                for sid in done}
    return [sid for sid in done if not problems[sid]], {sid: why for sid, why in problems.items() if why}


def whole_image_shards(storage: Storage) -> list[int]:
    """The finished image shards that are whole; the others lose their done marker (so the
    download that is planning now fetches them again) and are named on stderr."""
    whole, broken = check_image_shards(storage)
    for sid, why in broken.items():
        print(f"[download] {storage.url(shard_name(IMAGES, sid))}: {why}: fetching it again",
              file=sys.stderr, flush=True)
        storage.delete(done_marker(IMAGES, sid))
    return whole
