"""Run img2dataset's CLI in a subprocess, under a deadline, and check what it produced.

img2dataset cannot run off the main thread (Prefect tasks run in threads) and reports
neither failed shards nor a non-zero exit, so we run its CLI in its own process group
(so a deadline can kill it and its workers), log to a file, hand each shard to the caller
as soon as its stats file appears (so it is uploaded while the run goes on), and require
`<k>_stats.json` plus a readable `<k>.parquet` with the right row count for every shard.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from muse.config import ray_address
from muse.download.sources import ROW

PROGRESS_EVERY_S = 10.0


class DownloadError(RuntimeError):
    """img2dataset did not finish a shard (names it) or ran past the deadline."""


class DownloadDeadlineError(DownloadError):
    """img2dataset ran past download.deadline_s (a slow network): worth a retry."""


def work_base(cfg) -> Path:
    """The local folder under which img2dataset's work dirs go: storage.work_dir, else a temp dir."""
    return Path(cfg.storage.work_dir or Path(tempfile.gettempdir()) / "muse-download").expanduser()


def img2dataset_args(input_path: Path, out_dir: Path, dl, shard_size: int) -> list[str]:
    distributor = {"spark": "pyspark"}.get(dl.distributor, dl.distributor)  # ours -> img2dataset's name
    args = {
        "url_list": str(input_path), "input_format": "parquet", "url_col": "url",
        "output_folder": str(out_dir), "output_format": "parquet",
        "image_size": dl.image_size, "resize_mode": dl.resize_mode,
        "processes_count": dl.processes, "thread_count": dl.threads,
        "number_sample_per_shard": shard_size, "retries": dl.retries,
        "timeout": dl.timeout_s, "encode_quality": dl.encode_quality,
        "distributor": distributor, "incremental_mode": "incremental",
        "save_additional_columns": f"['{ROW}']", "enable_wandb": False,
        "compute_hash": None, "extract_exif": False,
    }
    if dl.min_image_size:  # measured on the downloaded pixels; source.filters act before
        args["min_image_size"] = dl.min_image_size
    if dl.max_aspect_ratio is not None:
        args["max_aspect_ratio"] = dl.max_aspect_ratio
    if dl.user_agent_token:
        args["user_agent_token"] = dl.user_agent_token
    return [f"--{k}={v}" for k, v in args.items()]


def _launcher(dl) -> str:
    """Python code that starts img2dataset's CLI.

    For spark we create the session first with `getOrCreate()`, which honours the usual
    Spark settings (PYSPARK_SUBMIT_ARGS="--master spark://host:7077 pyspark-shell",
    $SPARK_CONF_DIR/spark-defaults.conf); img2dataset then uses that active session
    instead of building its own `local[processes]` one.
    For ray we join the cluster first (download.ray_address, else $RAY_ADDRESS): img2dataset's
    ray distributor calls `.remote()` without `ray.init`, which would start a private local
    Ray instead.
    """
    run = "from img2dataset.main import main; main()"
    if dl.distributor == "spark":
        return "from pyspark.sql import SparkSession; SparkSession.builder.appName('muse-download').getOrCreate(); " + run
    if dl.distributor == "ray":
        address = ray_address(dl.ray_address, "download.ray_address")
        return f"import ray; ray.init(address={address!r}, log_to_driver=True); " + run
    return run


def _tail(log: Path, n: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _kill_leftover(pgid_file: Path) -> None:
    """A crashed earlier run can leave img2dataset running in this work dir: stop it first."""
    try:
        pgid = int(pgid_file.read_text())
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"img2dataset" in cmdline:  # the pid was not reused by something else
        print(f"[download] stopping a leftover img2dataset (process group {pgid})", file=sys.stderr)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.5)


def finished_shards(out_dir: Path) -> set[int]:
    """img2dataset's shards with a `<k>_stats.json`: it writes that after closing `<k>.parquet`."""
    return {int(p.name.split("_")[0]) for p in out_dir.glob("*_stats.json")}


def run_img2dataset(input_path: Path, out_dir: Path, dl, shard_size: int, label: str,
                    expected: int, on_shard: Callable[[int], None] | None = None) -> None:
    """Run to completion or raise DownloadError; progress lines go to stderr.

    `on_shard(k)` is called (in this thread) for each shard k as img2dataset finishes it,
    while the run goes on: the caller uploads it and frees the local disk.
    """
    log = out_dir.parent / "img2dataset.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    pgid_file = out_dir.parent / "img2dataset.pgid"
    # the child records its own process group first thing: if we are killed (kill -9) between its
    # start and our write below, the next run in this work dir still finds and stops it (a leftover
    # img2dataset in the same out dir deletes the new run's _tmp files when it ends)
    record = f"import os; open({str(pgid_file)!r}, 'w').write(str(os.getpgid(0))); "
    cmd = [sys.executable, "-c", record + _launcher(dl), *img2dataset_args(input_path, out_dir, dl, shard_size)]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    env.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark workers need img2dataset too
    lock = open(out_dir.parent / ".lock", "w")  # noqa: SIM115 - held until we return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DownloadError(f"{label}: another download is using {out_dir.parent}") from None
    _kill_leftover(pgid_file)
    start = time.monotonic()
    with lock, open(log, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        pgid_file.write_text(str(proc.pid))
        try:
            last, seen = start, set()
            while proc.poll() is None:
                time.sleep(0.2)
                if on_shard is not None:
                    for k in sorted(finished_shards(out_dir) - seen):
                        on_shard(k)
                        seen.add(k)
                now = time.monotonic()
                if now - start > dl.deadline_s:
                    raise DownloadDeadlineError(f"{label}: img2dataset ran past download.deadline_s="
                                        f"{dl.deadline_s:g}s and was killed; re-run to fetch the "
                                        f"rest (finished shards are kept). Log: {log}")
                if now - last >= PROGRESS_EVERY_S:
                    done = len(finished_shards(out_dir))
                    print(f"[download] {label}: {done}/{expected} img2dataset shards done, "
                          f"{now - start:.0f}s", file=sys.stderr, flush=True)
                    last = now
        finally:
            if proc.poll() is None:  # deadline, Ctrl-C or an error here: kill the whole group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        raise DownloadError(f"{label}: img2dataset exited with {proc.returncode}. Log {log}:\n{_tail(log)}")


def verify_shard(out_dir: Path, k: int, expected_rows: int, label: str) -> Path:
    """The img2dataset shard `k` must have its stats file and all its rows."""
    parquet, stats = out_dir / f"{k:05d}.parquet", out_dir / f"{k:05d}_stats.json"
    if not stats.exists() or not parquet.exists():
        raise DownloadError(f"{label}: img2dataset shard {k} did not finish ({stats.name} missing); "
                            f"re-run to fetch it. Log: {out_dir.parent / 'img2dataset.log'}\n"
                            f"{_tail(out_dir.parent / 'img2dataset.log')}")
    try:
        rows = pq.ParquetFile(parquet).metadata.num_rows
    except Exception as e:  # noqa: BLE001
        raise DownloadError(f"{label}: img2dataset shard {k} is unreadable ({parquet}): {e}") from None
    if rows != expected_rows:
        raise DownloadError(f"{label}: img2dataset shard {k} has {rows} rows, expected {expected_rows}")
    return parquet
