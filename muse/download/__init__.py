"""Phase 1: URL lists -> `images/NNNNN.parquet` shards in which every input row is present.

    plan_download(cfg)         -> [DownloadPart]  new/changed/unfinished source files
    download_part(cfg, part)   -> [shard stats]   img2dataset in a subprocess, then our writer
    finalize_download(cfg)     -> summary         images/_config.yaml + a table on stderr
    run_download(cfg)          -> summary         the three above in order

img2dataset writes to a local work dir (`storage.work_dir`, default a temp dir), keyed by
root + source + fingerprint, so a killed run re-uses what it fetched. Finished shards are
uploaded through `Storage` (atomic): parquet first, then `_stats.json`, the done marker.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from muse.download.runner import DownloadError, run_img2dataset, verify_shard
from muse.download.sources import (REGISTRY, ROW, DownloadPart, SourceError, load_registry,
                                   plan_parts, read_source)
from muse.download.writer import build_shard, is_http
from muse.layout import IMAGES, done_marker, done_shards, shard_name
from muse.storage import Storage

__all__ = ["REGISTRY", "run_download", "plan_download", "download_part", "finalize_download",
           "summary_rows", "DownloadPart", "DownloadError", "SourceError"]


def plan_download(cfg) -> list[DownloadPart]:
    """Register source files, retire changed ones; the parts that still need work."""
    return plan_parts(Storage.from_config(cfg), cfg)


def work_dir_for(cfg, storage: Storage, part: DownloadPart) -> Path:
    base = Path(cfg.storage.work_dir or Path(tempfile.gettempdir()) / "muse-download")
    tag = hashlib.sha256(f"{storage.uri}|{part.source}|{part.fingerprint}|{part.first_shard}"
                         .encode()).hexdigest()[:16]
    return base.expanduser() / tag


def _fetch_list(rows: pa.Table) -> pa.Table:
    """What img2dataset gets: http(s) URLs (non-ASCII percent-encoded) or "" (fails at once)."""
    urls = [quote(u.strip(), safe=":/?#[]@!$&'()*+,;=%~") if is_http(u) else ""
            for u in rows.column("url").to_pylist()]
    return pa.table({"url": pa.array(urls, pa.string()), ROW: rows.column(ROW)})


def download_part(cfg, part: DownloadPart) -> list[dict]:
    """Fetch one source file's unfinished shards and write them; returns their stats."""
    storage = Storage.from_config(cfg)
    done = set(done_shards(storage, IMAGES))
    todo = [s for s in part.shard_ids() if s not in done]
    label = f"{part.source} (shards {part.first_shard}..{part.first_shard + part.num_shards - 1})"
    if not todo:
        return []
    table = read_source(part.source, cfg.source, cfg.storage.gcs_project, limit=part.rows)
    if table.num_rows != part.rows:
        raise SourceError(f"{part.source}: has {table.num_rows} rows, registered {part.rows}; "
                          "it changed during the download: re-run")
    work = work_dir_for(cfg, storage, part)
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(_fetch_list(table), work / "input.parquet")
    for sid in set(part.shard_ids()) - set(todo):  # tell img2dataset to skip finished shards
        marker = out_dir / f"{sid - part.first_shard:05d}_stats.json"
        if not marker.exists():
            marker.write_text("{}")
    print(f"[download] {label}: fetching {len(todo)} shard(s), {part.rows} rows in the file",
          file=sys.stderr, flush=True)
    run_img2dataset(work / "input.parquet", out_dir, cfg.download, part.shard_size, label, part.num_shards)
    stats = [_write_shard(cfg, storage, part, sid, table, out_dir, label) for sid in todo]
    # keep img2dataset.log (small, useful after the fact); drop the bulky intermediate data
    shutil.rmtree(out_dir, ignore_errors=True)
    (work / "input.parquet").unlink(missing_ok=True)
    return stats


def _write_shard(cfg, storage, part, sid, table, out_dir, label) -> dict:
    start, end = part.row_range(sid)
    k = sid - part.first_shard
    fetched = pq.read_table(verify_shard(out_dir, k, end - start, label))
    data, stats = build_shard(table.slice(start, end - start), fetched, sid, part.shard_size,
                              cfg.download.image_size, cfg.download.encode_quality)
    stats.update(source=part.source, source_rows=[start, end])
    storage.write_bytes(shard_name(IMAGES, sid), data)
    storage.write_json(done_marker(IMAGES, sid), stats)  # the done marker, after the data
    print(f"[download] {shard_name(IMAGES, sid)}: {stats['succeeded']}/{stats['rows_in']} ok, "
          f"replaced {stats['replaced_by_reason']}", file=sys.stderr, flush=True)
    return stats


def summarize(storage: Storage) -> dict:
    """Totals over the current shards; rows_in counts every input row, filtered ones included."""
    reg = load_registry(storage)
    done = set(done_shards(storage, IMAGES))
    live = {s for e in reg["sources"].values()
            for s in range(e["first_shard"], e["first_shard"] + e["num_shards"])}
    summary = {"rows_in": 0, "succeeded": 0, "replaced_by_reason": {}, "filtered_by_reason": {},
               "shards": []}
    for sid in sorted(done):
        if live and sid not in live:
            continue
        st = storage.read_json(done_marker(IMAGES, sid))
        summary["shards"].append(sid)
        summary["rows_in"] += st["rows_in"]
        summary["succeeded"] += st["succeeded"]
        _add(summary["replaced_by_reason"], st["replaced_by_reason"])
    for e in reg["sources"].values():  # a file's filtered rows count once all its shards are in
        if done.issuperset(range(e["first_shard"], e["first_shard"] + e["num_shards"])):
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


def run_download(cfg) -> dict:
    """Plan, fetch every unfinished part in turn, finalize. Returns the summary."""
    for part in plan_download(cfg):
        download_part(cfg, part)
    return finalize_download(cfg)

