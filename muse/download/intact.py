"""Finished image shards are checked, not trusted: a truncated shard is rebuilt by the next download.

A shard counts as finished when `images/NNNNN_stats.json` exists (written after the Parquet
file). A file cut short later (a copy that stopped, a bad disk) would keep its marker and be
skipped for ever, so planning reads each finished shard's Parquet footer and compares its row
count with the marker's `rows_in`; a shard that fails loses its marker and is fetched again.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from muse.layout import IMAGES, done_marker, done_shards, shard_name
from muse.storage import Storage

CHECK_THREADS = 16  # footer reads are small and latency-bound on GCS


def _problem(storage: Storage, sid: int) -> str | None:
    """Why shard `sid` is not whole, or None."""
    try:
        expected = storage.read_json(done_marker(IMAGES, sid))["rows_in"]
        with storage.open(shard_name(IMAGES, sid)) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    except Exception as e:  # noqa: BLE001 - any unreadable shard is rebuilt
        return f"unreadable ({type(e).__name__}: {e})"
    return None if rows == expected else f"{rows} rows, its stats say {expected}"


def whole_image_shards(storage: Storage) -> list[int]:
    """The finished image shards that are whole; the others lose their done marker (so the
    download that is planning now fetches them again) and are named on stderr."""
    done = done_shards(storage, IMAGES)
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        problems = dict(zip(done, pool.map(lambda sid: _problem(storage, sid), done)))
    for sid, why in problems.items():
        if why:
            print(f"[download] {storage.url(shard_name(IMAGES, sid))}: {why}: fetching it again",
                  file=sys.stderr, flush=True)
            storage.delete(done_marker(IMAGES, sid))
    return [sid for sid in done if not problems[sid]]
