"""Finished image shards are checked, not trusted: a truncated shard is rebuilt by the next download.

A shard counts as finished when `images/NNNNN_stats.json` exists (written after the Parquet
file). A file cut short later (a copy that stopped, a bad disk) would keep its marker and be
skipped for ever, so planning compares each finished shard's size in one listing with the
`bytes` its marker records (markers from before `bytes`: its Parquet footer's row count with
`rows_in`); a shard that fails loses its marker and is fetched again.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from muse.layout import IMAGES, done_marker, done_shards, shard_name
from muse.storage import Storage

CHECK_THREADS = 16  # footer reads are small and latency-bound on GCS


def _footer_problem(storage: Storage, sid: int, expected: int) -> str | None:
    """Why shard `sid` is not whole by its Parquet footer, or None (markers without `bytes`)."""
    try:
        with storage.open(shard_name(IMAGES, sid)) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    except Exception as e:  # noqa: BLE001 - any unreadable shard is rebuilt
        return f"unreadable ({type(e).__name__}: {e})"
    return None if rows == expected else f"{rows} rows, its stats say {expected}"


def _problem(storage: Storage, sid: int, marker: dict, size: int | None) -> str | None:
    """Why shard `sid` is not whole, or None: its size in the listing against the `bytes` its
    marker records (no read at all); markers written before `bytes` existed: the footer."""
    if size is None:
        return "missing"
    if "bytes" in marker:
        return None if size == marker["bytes"] else f"{size} bytes, its stats say {marker['bytes']}"
    if "rows_in" not in marker:
        return "its _stats.json records neither bytes nor rows_in"
    return _footer_problem(storage, sid, marker["rows_in"])


def whole_image_shards(storage: Storage) -> list[int]:
    """The finished image shards that are whole; the others lose their done marker (so the
    download that is planning now fetches them again) and are named on stderr. Cost: one
    listing and one concurrent batch of marker reads, whatever the number of shards."""
    sizes = storage.sizes(IMAGES)
    done = done_shards(storage, IMAGES, sizes)  # the same listing: images/ is listed once
    markers = {rel: json.loads(data) for rel, data in
               storage.read_many([done_marker(IMAGES, sid) for sid in done]).items()}
    with ThreadPoolExecutor(CHECK_THREADS) as pool:  # footers only for markers without `bytes`
        problems = dict(zip(done, pool.map(
            lambda sid: _problem(storage, sid, markers[done_marker(IMAGES, sid)],
                                 sizes.get(shard_name(IMAGES, sid))), done)))
    for sid, why in problems.items():
        if why:
            print(f"[download] {storage.url(shard_name(IMAGES, sid))}: {why}: fetching it again",
                  file=sys.stderr, flush=True)
            storage.delete(done_marker(IMAGES, sid))
    return [sid for sid in done if not problems[sid]]
