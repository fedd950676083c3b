"""Finished image shards are checked, not trusted: a truncated shard is rebuilt by the next download.

A shard counts as finished when `images/NNNNN_stats.json` exists (written after the Parquet
file). A file cut short later (a copy that stopped, a bad disk) would keep its marker and be
skipped for ever, so planning compares each finished shard's (its newest generation's) size in one listing with the
`bytes` its marker records (no read at all); a shard that fails, or whose marker records no
`bytes` (not written by this code), loses its marker and is fetched again.
"""

from __future__ import annotations

import json
import sys

from muse.layout import IMAGES, done_generations, done_marker, shard_name
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
    (`muse plan`). Each shard's newest finished generation (the one readers take) is checked.
    Cost: one listing and one concurrent batch of marker reads."""
    whole, broken, _ = _check(storage)
    return whole, broken


def _check(storage: Storage) -> tuple[list[int], dict[int, str], dict[int, int]]:
    sizes = storage.sizes(IMAGES)
    gens = done_generations(storage, IMAGES, sizes)  # the same listing: images/ is listed once
    markers = {rel: json.loads(data) for rel, data in
               storage.read_many([done_marker(IMAGES, sid, g) for sid, g in gens.items()]).items()}
    problems = {sid: _problem(markers[done_marker(IMAGES, sid, g)], sizes.get(shard_name(IMAGES, sid, generation=g)))
                for sid, g in gens.items()}
    return [sid for sid in gens if not problems[sid]], {sid: why for sid, why in problems.items() if why}, gens


def whole_image_shards(storage: Storage) -> list[int]:
    """The finished image shards that are whole; the others lose their done marker (so the
    download that is planning now fetches them again) and are named on stderr. A broken
    generation K >= 1 (a retry pass's) loses its marker and generation K-1 is in force again,
    checked the same way."""
    while True:
        whole, broken, gens = _check(storage)
        for sid, why in broken.items():
            print(f"[download] {storage.url(shard_name(IMAGES, sid, generation=gens[sid]))}: {why}: "
                  f"{'fetching it again' if not gens[sid] else 'the generation before it is in force again'}",
                  file=sys.stderr, flush=True)
            storage.delete(done_marker(IMAGES, sid, gens[sid]))
        if not any(gens[sid] for sid in broken):  # only generation 0 went: nothing older to check
            return whole
