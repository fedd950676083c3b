"""Phase 1: URL lists -> `images/NNNNN.parquet` shards in which every input row is present.

    plan_download(cfg)         -> [DownloadPart]   new/changed/unfinished source files
    plan_chunks(cfg)           -> [DownloadChunk]  those cut into tasks of download.shards_per_task shards
    plan_run(cfg)              -> DownloadPlan     the chunks, and how many source files are unchanged
                                                   (the pure steps: sources.plan_sources, todo_chunks)
    download_chunk(cfg, chunk) -> [shard stats]    img2dataset in a subprocess, our writer as it goes
    finalize_download(cfg)     -> summary          images/_config.yaml + a table on stderr
    summarize_run(cfg, stats)  -> summary          the same counts over the shards one run wrote
    run_download(cfg)          -> summary          plan, every chunk in turn, the retry pass when
                                                   download.retry_replaced (retry.py), finalize

img2dataset writes one chunk to a local work dir (`storage.work_dir`, default a temp dir),
keyed by root + source + fingerprint + first shard, so local disk is bounded by the chunk and
a killed run re-uses what it fetched. Each shard img2dataset finishes is uploaded through
`Storage` (atomic) at once: parquet first, then `_stats.json`, the done marker; then its
local parquet is deleted. A killed task loses at most the shards in flight.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from muse.download.intact import whole_image_shards
from muse.download.retry import format_retry, gained_line, run_retry
from muse.download.runner import DownloadError, run_img2dataset, verify_shard, work_base
from muse.download.sources import (REGISTRY, DownloadChunk, DownloadPart, SourceError,
                                   live_shards, load_registry, plan_parts, read_source, register_sources)
from muse.download.writer import build_shard, fetch_list
from muse.layout import IMAGES, done_among, done_generations, done_marker, shard_name
from muse.storage import Storage

__all__ = ["REGISTRY", "run_download", "plan_download", "plan_chunks", "plan_run", "download_part", "download_chunk",
           "finalize_download", "summarize_run", "summary_rows", "run_rows", "todo_chunks", "DownloadPlan",
           "DownloadPart", "DownloadChunk", "DownloadError", "SourceError"]


def plan_download(cfg) -> list[DownloadPart]:
    """Register source files, retire changed ones; the parts that still need work."""
    return plan_parts(Storage.from_config(cfg), cfg)


@dataclass
class DownloadPlan:
    """A download run's work: its chunks, and what it found among the source files."""
    chunks: list[DownloadChunk]
    files: int      # source files planned
    unchanged: int  # of those, registered before as they are now

    def note(self) -> str:
        """One line for the run's log and artifacts: what this run has to do."""
        files = f"{self.files} source file{'s' * (self.files != 1)}"
        if not self.chunks:
            return f"nothing new: {files} unchanged"
        changed = self.files - self.unchanged
        return (f"{changed} of {files} new or changed, {len(self.chunks)} download task(s)" if changed else
                f"{files} unchanged, {len(self.chunks)} download task(s) to finish unfinished shards")


def plan_run(cfg) -> DownloadPlan:
    """The download tasks: chunks of `download.shards_per_task` shards with unfinished shards."""
    storage = Storage.from_config(cfg)
    # one listing of images/ for the whole plan: the ids retired by plan_parts are in no part
    done = set(whole_image_shards(storage))
    plan = register_sources(storage, cfg, done)
    return DownloadPlan(todo_chunks(plan.parts, cfg.download.shards_per_task, done), len(plan.current),
                        plan.unchanged)


def todo_chunks(parts: list[DownloadPart], shards_per_task: int, done: set[int]) -> list[DownloadChunk]:
    """The parts cut into download tasks, those with every shard done left out (also `muse plan`)."""
    return [c for p in parts for c in p.chunks(shards_per_task) if not done.issuperset(c.shard_ids())]


def plan_chunks(cfg) -> list[DownloadChunk]:
    """`plan_run`'s chunks."""
    return plan_run(cfg).chunks


def work_dir_for(cfg, storage: Storage, chunk: DownloadChunk) -> Path:
    tag = hashlib.sha256(f"{storage.uri}|{chunk.part.source}|{chunk.part.fingerprint}|{chunk.first_shard}"
                         .encode()).hexdigest()[:16]
    return work_base(cfg) / tag


def download_part(cfg, part: DownloadPart) -> list[dict]:
    """Fetch one source file's unfinished shards, chunk by chunk; returns their stats."""
    return [st for chunk in part.chunks(cfg.download.shards_per_task) for st in download_chunk(cfg, chunk)]


def download_chunk(cfg, chunk: DownloadChunk) -> list[dict]:
    """One img2dataset run over a chunk's unfinished shards; each shard is written to the
    storage root (and its local copy deleted) as soon as img2dataset finishes it."""
    storage = Storage.from_config(cfg)
    part, label = chunk.part, chunk.label
    done = set(done_among(storage, IMAGES, chunk.shard_ids()))  # fresh (a retry), and only this chunk's names
    todo = [s for s in chunk.shard_ids() if s not in done]
    if not todo:
        return []
    table = read_source(part.source, cfg.source, cfg.storage.gcs_project, limit=part.rows)
    if table.num_rows != part.rows:
        raise SourceError(f"{part.source}: has {table.num_rows} rows, registered {part.rows}; "
                          "it changed during the download: re-run")
    work = work_dir_for(cfg, storage, chunk)
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    first_row, end_row = chunk.row_range()
    pq.write_table(fetch_list(table.slice(first_row, end_row - first_row)), work / "input.parquet")
    for sid in set(chunk.shard_ids()) - set(todo):  # tell img2dataset to skip finished shards
        marker = out_dir / f"{sid - chunk.first_shard:05d}_stats.json"
        if not marker.exists():
            marker.write_text("{}")
    print(f"[download] {label}: fetching {len(todo)} shard(s), rows {first_row}..{end_row - 1} of the file",
          file=sys.stderr, flush=True)
    stats: dict[int, dict] = {}

    def write(k: int) -> None:  # img2dataset finished its shard k: upload it now, free the disk
        sid = chunk.first_shard + k
        if sid in todo and sid not in stats:
            stats[sid] = _write_shard(cfg, storage, part, sid, table, out_dir, label, k)
            (out_dir / f"{k:05d}.parquet").unlink(missing_ok=True)  # its _stats.json stays: tiny,
            # and img2dataset's incremental mode reads it as "done" if the chunk is re-run

    run_img2dataset(work / "input.parquet", out_dir, cfg.download, part.shard_size, label,
                    chunk.num_shards, on_shard=write)
    for sid in todo:  # raises DownloadError for a shard img2dataset did not finish
        write(sid - chunk.first_shard)
    # keep img2dataset.log (small, useful after the fact); drop the rest
    shutil.rmtree(out_dir, ignore_errors=True)
    (work / "input.parquet").unlink(missing_ok=True)
    return [stats[sid] for sid in todo]


def _write_shard(cfg, storage, part, sid, table, out_dir, label, k) -> dict:
    start, end = part.row_range(sid)
    fetched = pq.read_table(verify_shard(out_dir, k, end - start, label))
    data, stats = build_shard(table.slice(start, end - start), fetched, sid, part.shard_size,
                              cfg.download.image_size, cfg.download.encode_quality)
    stats.update(source=part.source, source_rows=[start, end], bytes=len(data))  # bytes: intact.py
    storage.write_bytes(shard_name(IMAGES, sid), data)
    storage.write_json(done_marker(IMAGES, sid), stats)  # the done marker, after the data
    print(f"[download] {shard_name(IMAGES, sid)}: {stats['succeeded']}/{stats['rows_in']} ok, "
          f"replaced {stats['replaced_by_reason']}", file=sys.stderr, flush=True)
    return stats


def summarize(storage: Storage, only: set[int] | None = None) -> dict:
    """Totals over the current shards (or those of them in `only`); rows_in counts every input
    row, filtered ones included: a file's filtered rows count once all its shards are in (and,
    with `only`, one of them is among `only`)."""
    reg = load_registry(storage)
    gens = done_generations(storage, IMAGES)  # each shard's newest finished generation is in force
    done = set(gens)
    live = live_shards(reg)
    summary = {"rows_in": 0, "succeeded": 0, "replaced_by_reason": {}, "filtered_by_reason": {},
               "shards": []}
    for sid in sorted(done):
        if (live and sid not in live) or (only is not None and sid not in only):
            continue
        st = storage.read_json(done_marker(IMAGES, sid, gens[sid]))
        summary["shards"].append(sid)
        summary["rows_in"] += st["rows_in"]
        summary["succeeded"] += st["succeeded"]
        _add(summary["replaced_by_reason"], st["replaced_by_reason"])
    for e in reg["sources"].values():
        ids = range(e["first_shard"], e["first_shard"] + e["num_shards"])
        if done.issuperset(ids) and (only is None or not only.isdisjoint(ids)):
            _add(summary["filtered_by_reason"], e.get("filtered", {}))
    summary["rows_in"] += sum(summary["filtered_by_reason"].values())
    return summary


def _add(total: dict, counts: dict) -> None:
    for r, n in counts.items():
        total[r] = total.get(r, 0) + n


def summary_rows(summary: dict) -> list[dict]:
    """The summary as table rows {what, count, share}: printed on stderr, a Prefect artifact in flows."""
    n = max(summary["rows_in"], 1)
    rows = [{"what": "shards", "count": len(summary["shards"]), "share": ""},
            {"what": "rows in", "count": summary["rows_in"], "share": "100%"}]
    share = lambda c: f"{100 * c / n:.1f}%"  # noqa: E731
    for reason, c in sorted(summary.get("filtered_by_reason", {}).items(), key=lambda x: -x[1]):
        rows.append({"what": f"filtered: {reason}", "count": c, "share": share(c)})
    rows.append({"what": "succeeded", "count": summary["succeeded"], "share": share(summary["succeeded"])})
    for reason, c in sorted(summary["replaced_by_reason"].items(), key=lambda x: -x[1]):
        rows.append({"what": f"replaced: {reason}", "count": c, "share": share(c)})
    return rows


def run_rows(run: dict, total: dict) -> list[dict]:
    """The `download-stats` table: this run's counts beside the dataset's totals (a refresh that
    fetched nothing shows 0 beside them), share of the dataset's rows in."""
    mine = {r["what"]: r["count"] for r in summary_rows(run)}
    rows = [{"what": r["what"], "this run": mine.pop(r["what"], 0), "dataset": r["count"], "share": r["share"]}
            for r in summary_rows(total)]
    return rows + [{"what": what, "this run": c, "dataset": 0, "share": ""} for what, c in mine.items()]


def format_summary(summary: dict) -> str:
    return "\n".join(f"{r['what']:<32}{r['count']:>10}  {r['share']:>6}".rstrip() for r in summary_rows(summary))


def finalize_download(cfg) -> dict:
    """Write images/_config.yaml and print the summary across all current shards."""
    storage = Storage.from_config(cfg)
    storage.write_config(IMAGES, cfg)
    summary = summarize(storage)
    print(f"[download] summary for {storage.url(IMAGES)}\n{format_summary(summary)}",
          file=sys.stderr, flush=True)
    return summary


def summarize_run(cfg, shard_stats: list[dict]) -> dict:
    """`summarize` over the shards one run wrote (`download_chunk`'s stats): that run's counts."""
    return summarize(Storage.from_config(cfg), only={st["shard"] for st in shard_stats})


def run_download(cfg) -> dict:
    """Plan, fetch every unfinished chunk in turn, then (`download.retry_replaced`) the retry pass
    (muse/download/retry.py, its table on stderr), finalize. Returns the summary, with the retry
    pass's report under "retry" when it ran."""
    for chunk in plan_chunks(cfg):
        download_chunk(cfg, chunk)
    report = None
    if cfg.download.retry_replaced:
        report = run_retry(cfg)
        print(f"[download] {gained_line(report)}\n{format_retry(report)}", file=sys.stderr, flush=True)
    summary = finalize_download(cfg)
    return summary if report is None else {**summary, "retry": report}

