"""The retry pass (issue 28) beside a plain download of the same rows, in one run.

A local image server on 127.0.0.1 serves N URLs, of which 20% are /flaky/ routes. Three runs:
  1. a plain download of the N rows, every route answering (the reference rate);
  2. a download of the same rows while /flaky/ answers 503 (20% replaced, `http_5xx`);
  3. `muse download --retry-replaced`'s pass over run 2's root with /flaky/ answering again:
     it re-fetches only the 20% and writes a new generation of every shard.
Prints rows/s of each, img2dataset's share of the time, and rows recovered; the retry pass's
rate counts the rows it fetched again, and its time includes reading every shard and writing
its new generation.

    python bench/retry.py                # 10,000 rows, 64px, 1 process x 16 threads
    python bench/retry.py --rows 400     # seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from muse.config import load_config  # noqa: E402
import muse.download  # noqa: E402
import muse.download.retry  # noqa: E402
from muse.download import run_download  # noqa: E402
from muse.download.retry import run_retry  # noqa: E402
from muse.testing.imageserver import ImageServer  # noqa: E402

# bench/download.py's timer of img2dataset's part (it patches muse.download on import), also
# over the retry pass: what muse adds is the rest (reading, rewriting shards)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from download import I2D_SECONDS, timed_img2dataset  # noqa: E402

muse.download.retry.run_img2dataset = timed_img2dataset


def _cfg(root: Path, src: Path, work: Path, args) -> object:
    dl = {"image_size": args.size, "processes": 1, "threads": args.threads, "shard_size": args.shard_size,
          "timeout_s": 10, "retries": 0, "retry_after_s": 0}
    return load_config(None, data={"storage": {"root": str(root), "work_dir": str(work)},
                                   "source": {"paths": [str(src)]}, "download": dl})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--failing", type=float, default=0.2, help="share of rows that fail in the first download")
    ap.add_argument("--size", type=int, default=64, help="download.image_size")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=1000)
    args = ap.parse_args()
    every = round(1 / args.failing)
    with tempfile.TemporaryDirectory() as tmp, ImageServer() as srv:
        tmp = Path(tmp)
        urls = [srv.url(f"/flaky/{i % 64}.jpg" if i % every == every - 1 else f"/img/{i % 64}.jpg")
                for i in range(args.rows)]
        srv.render(urls)
        src = tmp / "part-0.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": [f"row {i}" for i in range(args.rows)]}), src)
        results = []
        for name, flaky in (("plain download (every route answers)", None),
                            ("download, /flaky/ answering 503", 503)):
            srv.flaky = flaky
            I2D_SECONDS.clear()
            t0 = time.perf_counter()
            summary = run_download(_cfg(tmp / name[:5], src, tmp / "work", args))
            dt = time.perf_counter() - t0
            results.append((name, args.rows, dt, sum(I2D_SECONDS), summary["succeeded"]))
        srv.flaky = None
        I2D_SECONDS.clear()
        t0 = time.perf_counter()
        report = run_retry(_cfg(tmp / "downl", src, tmp / "work", args))
        dt = time.perf_counter() - t0
        results.append(("retry pass (re-fetches the failed rows)", report["retried"], dt, sum(I2D_SECONDS),
                        report["recovered"]))
    print(f"{args.rows} rows, {args.failing:.0%} failing in the first download, {args.size}px, "
          f"1 process x {args.threads} threads, shard_size {args.shard_size}", file=sys.stderr)
    print("| run | rows fetched | seconds | of which img2dataset | rows/s | images (succeeded / recovered) |")
    print("|---|---|---|---|---|---|")
    for name, n, dt, i2d, ok in results:
        print(f"| {name} | {n} | {dt:.2f} | {i2d:.2f} | {n / dt:.1f} | {ok} |")


if __name__ == "__main__":
    main()
