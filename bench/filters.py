"""Source filters benchmark: selecting rows of a 1M-row LAION-like Parquet list vs reading it.

The reference is a plain `pyarrow.parquet.read_table` of the same file (every column), which
`muse download` does anyway to hand the rows to img2dataset; ours is `select()` with the
LAION-aesthetics style filters (pwatermark, punsafe, AESTHETIC_SCORE, WIDTH, HEIGHT), an
aspect range and URL dedup (reading the URL column is most of its cost; a line shows the
selection without it), counting every dropped row by reason. Rounds run A-B-B-A, best of each. The last line is the ratio of rows/s (filter / plain read; above 1: the filter
costs less than the read it precedes).

    python bench/filters.py             # 1,000,000 rows
    python bench/filters.py --tiny      # 10,000 rows: for the test that the table prints
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from muse.config import load_config  # noqa: E402
from muse.download.sources import select  # noqa: E402

SELECTION = {"filters": [{"column": "pwatermark", "max": 0.8}, {"column": "punsafe", "max": 0.1},
                         {"column": "AESTHETIC_SCORE", "min": 5.0}, {"column": "WIDTH", "min": 256},
                         {"column": "HEIGHT", "min": 256}],
             "min_aspect": 0.5, "max_aspect": 2.0, "dedup_urls": True}


def laion_list(path: Path, n: int, seed: int = 0) -> None:
    """LAION-like columns and value ranges; 1% null pwatermark, 1% repeated URLs."""
    rng = np.random.default_rng(seed)
    ids = np.arange(n)
    ids[rng.random(n) < 0.01] = 0  # repeats of one URL
    pw = rng.random(n)
    table = pa.table({
        "SAMPLE_ID": pa.array(np.arange(n)),
        "URL": pa.array([f"https://images.example.com/{i:09d}/photo.jpg" for i in ids]),
        "TEXT": pa.array([f"a photograph of thing number {i} in a field" for i in range(n)]),
        "HEIGHT": pa.array(rng.integers(64, 2048, n)), "WIDTH": pa.array(rng.integers(64, 2048, n)),
        "similarity": pa.array(rng.uniform(0.28, 0.45, n)),
        "punsafe": pa.array(rng.beta(0.5, 8, n)),
        "pwatermark": pa.array(pw, mask=rng.random(n) < 0.01),
        "AESTHETIC_SCORE": pa.array(rng.normal(5.2, 0.8, n)),
    })
    pq.write_table(table, path, row_group_size=128 * 1024)


def timed(fn, times: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--rows", type=int, help="rows in the list (default 1,000,000; 10,000 with --tiny)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    n = args.rows or (10_000 if args.tiny else 1_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part-00000.parquet"
        laion_list(path, n)
        src = load_config(None, data={"source": {"paths": [str(path)], **SELECTION}}).source
        no_dedup = load_config(None, data={"source": {"paths": [str(path)],
                                                      **dict(SELECTION, dedup_urls=False)}}).source
        plain, ours, light = [], [], []
        for _ in range(args.rounds):  # A-B-B-A: load drift on a shared machine hits both sides
            timed(lambda: pq.read_table(path), plain)
            timed(lambda: select(str(path), src), ours)
            timed(lambda: select(str(path), src), ours)
            timed(lambda: pq.read_table(path), plain)
            timed(lambda: select(str(path), no_dedup), light)
        sel = select(str(path), src)
        mb = path.stat().st_size / 2**20
    print(f"rows {n:,}, kept {len(sel.indices):,} ({100 * len(sel.indices) / n:.1f}%), file {mb:.0f} MiB")
    for reason, c in sorted(sel.filtered.items(), key=lambda x: -x[1]):
        print(f"  filtered: {reason:<26}{c:>10,}  {100 * c / n:5.1f}%")
    print(f"{'plain pq.read_table (reference)':<36}{min(plain):8.3f} s  {n / min(plain):14,.0f} rows/s")
    print(f"{'muse select (filters+aspect+dedup)':<36}{min(ours):8.3f} s  {n / min(ours):14,.0f} rows/s")
    print(f"{'muse select, dedup_urls off':<36}{min(light):8.3f} s  {n / min(light):14,.0f} rows/s")
    print(f"ratio filter/plain-read rows/s: {min(plain) / min(ours):.2f}")


if __name__ == "__main__":
    main()
