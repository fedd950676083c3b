"""The retry pass: rows replaced for a transient reason are fetched again into a new shard generation.

    run_retry(cfg)         -> report   every finished image shard's newest generation K: its rows
                                       with `replaced`, a retryable `reason` (reasons.py) and
                                       `retries < download.max_retries_per_row`, fetched again
                                       with img2dataset; each such shard gets generation K+1
    retry_rows(report)     -> rows     per reason: retried, recovered, still failed (the CLI's
                                       table and the flow's download-stats artifact)

Generation K+1 (`muse/layout.py`, "Generations") is generation K with only the re-fetched rows
changed: a recovered row gets its real picture, replaced=false, reason ""; a row that fails
again gets its placeholder (the same colour: it is keyed) and its new reason. Every row counts
its re-fetches in `retries` (int32; absent in generation 0, where it is 0). The Parquet file goes
up first, then its marker (the done marker: it records `written`, the time), so a killed pass
leaves generation K in force; the Parquet holds no time, so a re-run writes the same bytes when
the servers answer the same. A generation younger than `download.retry_after_s` is skipped (its
marker's `written`; generation 0 markers hold no time, so the marker file's modification time
stands in): a row is fetched at most once per interval. Shards with nothing to retry get no new
generation. img2dataset runs once per `download.shards_per_task` such shards, in a local work
dir keyed by the root and the (shard, generation) pairs, like `work_dir_for`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import shutil
import sys
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from muse.download.reasons import is_retryable
from muse.download.runner import run_img2dataset, verify_shard, work_base
from muse.download.sources import ROW, live_shards, load_registry
from muse.download.writer import fetch_list, row_result
from muse.layout import IMAGES, PAGE_CHECKSUMS, done_generations, done_marker, open_shard, shard_name
from muse.storage import Storage

RETRIES = "retries"  # the column: times a row was fetched again (layout.py's docstring)
CHANGED = ["image", "width", "height", "replaced", "status", "error_message", "reason"]


@dataclass
class Candidate:
    """One shard's rows to fetch again: its newest generation, that marker, and row indices."""
    sid: int
    gen: int
    marker: dict
    rows: list[int]
    urls: list[str]
    keys: list[str]


def _age_s(storage: Storage, sid: int, gen: int, marker: dict, now: float) -> float:
    """Seconds since this generation was written: its marker's `written`, else (generation 0)
    the marker file's modification time in the storage listing."""
    if "written" in marker:
        return now - marker["written"]
    info = storage.fs.info(storage.path(done_marker(IMAGES, sid, gen)))
    stamp = info.get("mtime") or info.get("updated") or info.get("LastModified")
    if isinstance(stamp, str):
        stamp = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    elif isinstance(stamp, dt.datetime):
        stamp = stamp.timestamp()
    return now - float(stamp) if stamp is not None else float("inf")


def find_candidates(cfg, storage: Storage, now: float) -> list[Candidate]:
    """The shards (newest generation, of a registered source file) with rows worth fetching again."""
    dl, out = cfg.download, []
    reg = load_registry(storage)
    live = live_shards(reg)
    gens = {sid: gen for sid, gen in done_generations(storage, IMAGES).items() if not live or sid in live}
    markers = storage.read_many([done_marker(IMAGES, sid, gen) for sid, gen in gens.items()])  # one batch
    for sid, gen in gens.items():
        marker = json.loads(markers[done_marker(IMAGES, sid, gen)])
        if not any(is_retryable(r) for r in marker.get("replaced_by_reason", {})):
            continue  # the marker says so: no read of the shard
        if _age_s(storage, sid, gen, marker, now) < dl.retry_after_s:
            continue
        with storage.open(shard_name(IMAGES, sid, generation=gen)) as f:
            t = open_shard(f).read(columns=["key", "url", "replaced", "reason"] + ([RETRIES] if gen else []))
        tries = t[RETRIES].to_pylist() if RETRIES in t.column_names else [0] * t.num_rows
        rows = [i for i, (rep, why, n) in enumerate(zip(t["replaced"].to_pylist(), t["reason"].to_pylist(), tries))
                if rep and is_retryable(why) and n < dl.max_retries_per_row]
        if rows:
            urls, keys = t["url"].to_pylist(), t["key"].to_pylist()
            out.append(Candidate(sid, gen, marker, rows, [urls[i] for i in rows], [keys[i] for i in rows]))
    return out


def _fetch(cfg, storage: Storage, batch: list[Candidate]) -> list[dict]:
    """img2dataset over the batch's rows (in shard, row order); each row's `row_result`."""
    dl = cfg.download
    pairs = ",".join(f"{c.sid}.{c.gen}" for c in batch)
    work = work_base(cfg) / ("retry-" + hashlib.sha256(f"{storage.uri}|{pairs}".encode()).hexdigest()[:16])
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    urls = [u for c in batch for u in c.urls]
    keys = [k for c in batch for k in c.keys]
    pq.write_table(fetch_list(pa.table({"url": pa.array(urls, pa.string()),
                                        ROW: pa.array(range(len(urls)), pa.int64())})), work / "input.parquet")
    label = f"retry of shards {batch[0].sid}..{batch[-1].sid} ({len(urls)} rows)"
    print(f"[download] {label}: fetching again", file=sys.stderr, flush=True)
    size = dl.shard_size
    n_out = -(-len(urls) // size)
    run_img2dataset(work / "input.parquet", out_dir, dl, size, label, n_out)
    fetched = pa.concat_tables([pq.read_table(verify_shard(out_dir, k, min(size, len(urls) - k * size), label))
                                for k in range(n_out)])
    by_row = {r: i for i, r in enumerate(fetched.column(ROW).to_pylist())}
    st, err, jpg = (fetched.column(c) for c in ("status", "error_message", "jpg"))
    results = []
    for r, (url, key) in enumerate(zip(urls, keys)):
        j = by_row[r]
        ok = st[j].as_py() == "success"
        results.append(row_result(url, st[j].as_py(), err[j].as_py(), jpg[j].as_py() if ok else None, key,
                                  dl.image_size, dl.encode_quality))
    shutil.rmtree(work, ignore_errors=True)
    return results


def _patched(table: pa.Table, rows: list[int], results: list[dict]) -> pa.Table:
    """`table` with `rows` replaced by `results` (CHANGED columns) and their `retries` + 1."""
    n = table.num_rows
    pick = list(range(n))
    for j, i in enumerate(rows):
        pick[i] = n + j  # row i comes from the appended new values
    pick = pa.array(pick, pa.int64())
    for c in CHANGED:
        old = table[c]
        new = pa.array([r[c] for r in results], old.type)
        table = table.set_column(table.schema.get_field_index(c), c,
                                 pa.chunked_array(old.chunks + [new], old.type).take(pick))
    tries = table[RETRIES].to_pylist() if RETRIES in table.column_names else [0] * n
    for i in rows:
        tries[i] += 1
    col = pa.array(tries, pa.int32())
    if RETRIES in table.column_names:
        return table.set_column(table.schema.get_field_index(RETRIES), RETRIES, col)
    return table.append_column(RETRIES, col)


def _counts(table: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rep, why in zip(table["replaced"].to_pylist(), table["reason"].to_pylist()):
        if rep:
            counts[why] = counts.get(why, 0) + 1
    return dict(sorted(counts.items()))


def write_generation(storage: Storage, c: Candidate, results: list[dict]) -> dict:
    """Generation c.gen + 1 of shard c.sid: the Parquet file, then its marker. Returns the marker."""
    with storage.open(shard_name(IMAGES, c.sid, generation=c.gen)) as f:
        table = open_shard(f).read()
    old_reasons = table["reason"].to_pylist()
    table = _patched(table, c.rows, results).combine_chunks()
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", **PAGE_CHECKSUMS)
    data, gen = buf.getvalue(), c.gen + 1
    by_reason: dict[str, dict[str, int]] = {}
    for i, res in zip(c.rows, results):
        tally = by_reason.setdefault(old_reasons[i], {"retried": 0, "recovered": 0, "failed": 0})
        tally["retried"] += 1
        tally["recovered" if not res["replaced"] else "failed"] += 1
    counts = _counts(table)
    stats = {"shard": c.sid, "generation": gen, "rows_in": table.num_rows,
             "succeeded": table.num_rows - sum(counts.values()), "replaced": sum(counts.values()),
             "replaced_by_reason": counts, "retried": len(c.rows),
             "recovered": sum(t["recovered"] for t in by_reason.values()),
             "retried_by_reason": dict(sorted(by_reason.items())),
             "source": c.marker.get("source"), "source_rows": c.marker.get("source_rows"),
             "bytes": len(data), "written": time.time()}
    storage.write_bytes(shard_name(IMAGES, c.sid, generation=gen), data)
    storage.write_json(done_marker(IMAGES, c.sid, gen), stats)  # the done marker, after the data
    print(f"[download] {shard_name(IMAGES, c.sid, generation=gen)}: {stats['recovered']}/{stats['retried']} "
          f"rows recovered, replaced {counts}", file=sys.stderr, flush=True)
    return stats


def run_retry(cfg, now: float | None = None) -> dict:
    """The retry pass over the storage root; the report (`merge_reports` of its shards' markers)."""
    storage = Storage.from_config(cfg)
    todo = find_candidates(cfg, storage, time.time() if now is None else now)
    per = cfg.download.shards_per_task
    written = []
    for b in range(0, len(todo), per):
        batch = todo[b:b + per]
        results = _fetch(cfg, storage, batch)
        at = 0
        for c in batch:
            written.append(write_generation(storage, c, results[at:at + len(c.rows)]))
            at += len(c.rows)
    return merge_reports(written)


def merge_reports(markers: list[dict]) -> dict:
    """{shards, retried, recovered, by_reason: {reason: {retried, recovered, failed}}} over the
    markers of the generations one pass wrote."""
    report = {"shards": [m["shard"] for m in markers], "retried": 0, "recovered": 0, "by_reason": {}}
    for m in markers:
        report["retried"] += m["retried"]
        report["recovered"] += m["recovered"]
        for why, t in m["retried_by_reason"].items():
            tally = report["by_reason"].setdefault(why, {"retried": 0, "recovered": 0, "failed": 0})
            for k in tally:
                tally[k] += t[k]
    report["by_reason"] = dict(sorted(report["by_reason"].items()))
    return report


def retry_rows(report: dict) -> list[dict]:
    """The report as table rows {reason, retried, recovered, still failed}, a total row last."""
    rows = [{"reason": why, "retried": t["retried"], "recovered": t["recovered"], "still failed": t["failed"]}
            for why, t in report["by_reason"].items()]
    return rows + [{"reason": "total", "retried": report["retried"], "recovered": report["recovered"],
                    "still failed": report["retried"] - report["recovered"]}]


def retry_stat_rows(report: dict) -> list[dict]:
    """The report as rows of the flow's `download-stats` table ({what, this run, dataset, share}):
    per reason, rows retried, recovered and still failed by this run's pass."""
    rows = []
    for r in retry_rows(report):
        for what in ("retried", "recovered", "still failed"):
            rows.append({"what": f"{what}: {r['reason']}", "this run": r[what], "dataset": "", "share": ""})
    return rows


def gained_line(report: dict) -> str:
    """One line: what the retry pass gained."""
    return (f"retry pass: {report['recovered']} real image(s) gained, {report['retried'] - report['recovered']} "
            f"of {report['retried']} row(s) fetched again still failed, {len(report['shards'])} shard(s) got a "
            "new generation")


def format_retry(report: dict) -> str:
    """`retry_rows` as the text `muse download --retry-replaced` prints."""
    lines = [f"{'reason':<24}{'retried':>10}{'recovered':>11}{'still failed':>14}"]
    lines += [f"{r['reason']:<24}{r['retried']:>10}{r['recovered']:>11}{r['still failed']:>14}"
              for r in retry_rows(report)]
    return "\n".join(lines)
