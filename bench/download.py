"""Phase 1 benchmark: muse's download vs plain img2dataset on the same URL list.

Both fetch the same URLs from a local server on 127.0.0.1 (~10% failing: 404, 500 and a
refused port) with the same processes / threads / image size, and both run img2dataset's
CLI in a subprocess. The reference stops at img2dataset's own shards; ours adds the
reading, replacements, RGB checks, shard writing and accounting. The last line is the
ratio of images/s (goal >= 0.9).

    python bench/download.py            # 400 URLs, 256px, 1 process x 16 threads
    python bench/download.py --tiny     # seconds: for the test that the table prints
    python bench/download.py --gpu      # "real" size: 4000 URLs, all cores (CPU-bound either way)
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
from muse.download import run_download  # noqa: E402
from muse.download.runner import run_img2dataset  # noqa: E402
from muse.download.sources import ROW  # noqa: E402
from muse.testing.imageserver import ImageServer, body_for, refused_url  # noqa: E402


I2D_SECONDS: list[float] = []


def timed_img2dataset(*args, **kwargs):
    """Time the img2dataset part of our download, to show what muse itself adds (bench/retry.py
    times its retry pass with this too)."""
    t0 = time.perf_counter()
    run_img2dataset(*args, **kwargs)
    I2D_SECONDS.append(time.perf_counter() - t0)


muse.download.run_img2dataset = timed_img2dataset


def url_list(srv: ImageServer, n: int) -> list[str]:
    bad = [srv.url("/404"), srv.url("/500"), refused_url()]
    return [bad[i % 3] if i % 10 == 9 else srv.url(f"/img/{i % 64}.jpg") for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="real size (the download is CPU-bound)")
    ap.add_argument("--rows", type=int, help="number of URLs (overrides the mode's default)")
    ap.add_argument("--rounds", type=int, default=3, help="A-B-B-A rounds; the best run of each side counts")
    args = ap.parse_args()
    n, size, procs, threads, shard = 400, 256, 1, 16, 100
    if args.tiny:
        n, size, procs, threads, shard = 20, 32, 1, 4, 10
    elif args.gpu:
        n, size, procs, threads, shard = 4000, 256, os.cpu_count() or 4, 32, 1000
    n = args.rows or n
    with ImageServer() as srv, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        urls = url_list(srv, n)
        pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(n)]}), tmp / "src.parquet")
        cfg = load_config(None, data={
            "storage": {"root": str(tmp / "root"), "work_dir": str(tmp / "work")},
            "source": {"paths": [str(tmp / "src.parquet")]},
            "download": {"image_size": size, "processes": procs, "threads": threads,
                         "shard_size": shard, "timeout_s": 5, "retries": 0}})
        # warm the server's cache so neither side pays for generating images
        for i in range(64):
            body_for(f"/img/{i}.jpg")
        pq.write_table(pa.table({"url": urls, ROW: list(range(n))}), tmp / "plain.parquet")
        plain, ours, inner = [], [], []
        # A-B-B-A rounds, best of each: on 2 shared cores single runs vary by +-20%.
        order = ["plain", "muse"] if args.tiny else ["plain", "muse", "muse", "plain"] * args.rounds
        for i, which in enumerate(order):
            t0 = time.perf_counter()
            if which == "plain":
                run_img2dataset(tmp / "plain.parquet", tmp / f"plain{i}" / "out", cfg.download, shard,
                                "plain", -(-n // shard))
                plain.append(time.perf_counter() - t0)
            else:
                cfg.storage.root = str(tmp / f"root{i}")
                summary = run_download(cfg)
                ours.append(time.perf_counter() - t0)
                inner.append(I2D_SECONDS.pop())
        print(f"# every run (s): img2dataset {[round(x, 2) for x in plain]}, muse {[round(x, 2) for x in ours]}",
              file=sys.stderr)
        t_plain, t_muse = min(plain), min(ours)
        t_inner = inner[ours.index(t_muse)]
    assert summary["rows_in"] == n
    print(f"\n{'method':<34}{'rows':>7}{'seconds':>10}{'images/s':>10}")
    print(f"{'img2dataset CLI (reference)':<34}{n:>7}{t_plain:>10.2f}{n / t_plain:>10.1f}")
    print(f"{'muse download (+ replacements)':<34}{n:>7}{t_muse:>10.2f}{n / t_muse:>10.1f}")
    print(f"{'  of which img2dataset':<34}{n:>7}{t_inner:>10.2f}")
    print(f"{'  of which muse (read/write/replace)':<34}{n:>7}{t_muse - t_inner:>10.2f}")
    print(f"{'succeeded / replaced':<34}{summary['succeeded']:>7}{n - summary['succeeded']:>10}")
    print(f"ratio muse/img2dataset images/s: {t_plain / t_muse:.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
