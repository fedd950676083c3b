"""Reader and source registry: URL-list files -> tables, and which shard ids each file owns.

`images/_SOURCES.json` maps every source file (its URI as listed in `source.paths`, globs
expanded) to a fingerprint (size + md5/etag/mtime), the rows taken from it, and a
contiguous range of global shard ids. A new file gets the next free ids; a changed file's
old shards are retired, every generation (markers deleted first, so the shard reads as incomplete at once) and
it gets fresh ids; an unchanged file whose shards are all present is skipped. Files
removed from `source.paths` keep their shards. The registry records `schema_version`
(`layout.IMAGES_VERSION`, the version of everything under images/); another one is refused.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from muse.download.filters import FilterError, Selection, select_rows, selection_spec
from muse.download.intact import whole_image_shards
from muse.layout import IMAGE_COLUMNS, IMAGES, IMAGES_VERSION, REGISTRY, check_version, parse_shard_name, prefix_listing
from muse.storage import Storage, source_fs

ROW = "__muse_row"  # our row index, passed through img2dataset's save_additional_columns


# What a new user needs when the URL list is missing (docs/download.md has the steps).
WHERE_LISTS = ("URL lists are Parquet/CSV/JSONL files with a URL and a caption column (source.url_column, "
               "source.caption_column; URL and TEXT in LAION's metadata), such as the LAION / re-LAION "
               "metadata Parquet parts on the Hugging Face hub: fetch one part, point source.paths at it "
               "and try a slice with --set source.max_samples=1000 (see docs/download.md)")


class SourceError(ValueError):
    """A source file that cannot be used: names the file and what to do."""


@dataclass
class DownloadPart:
    """One source file's share of the work: rows [0, rows) -> shards first_shard.. ."""

    source: str
    fingerprint: str
    first_shard: int
    num_shards: int
    rows: int
    shard_size: int

    def shard_ids(self) -> list[int]:
        return list(range(self.first_shard, self.first_shard + self.num_shards))

    def row_range(self, shard_id: int) -> tuple[int, int]:
        start = (shard_id - self.first_shard) * self.shard_size
        return start, min(start + self.shard_size, self.rows)

    def chunks(self, shards_per_task: int) -> list["DownloadChunk"]:
        """The part cut into download tasks of `shards_per_task` shards (the last may be short)."""
        return [DownloadChunk(self, first, min(shards_per_task, self.first_shard + self.num_shards - first))
                for first in range(self.first_shard, self.first_shard + self.num_shards, shards_per_task)]


@dataclass
class DownloadChunk:
    """One download task: shards first_shard.. of a part, rows row_range() of its file's selection."""

    part: DownloadPart
    first_shard: int
    num_shards: int

    def shard_ids(self) -> list[int]:
        return list(range(self.first_shard, self.first_shard + self.num_shards))

    def row_range(self) -> tuple[int, int]:
        return self.part.row_range(self.first_shard)[0], self.part.row_range(self.shard_ids()[-1])[1]

    @property
    def label(self) -> str:
        return f"{self.part.source} (shards {self.first_shard}..{self.first_shard + self.num_shards - 1})"


# ----------------------------------------------------------------------------- files

def expand_sources(paths: list[str], gcs_project: str | None = None) -> list[str]:
    """`source.paths` with globs expanded, as URIs, in listed order (globs sorted)."""
    out: list[str] = []
    for uri in paths:
        fs, path = source_fs(uri, gcs_project)
        prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
        if any(c in path for c in "*?["):
            matches = sorted(fs.glob(path))
            if not matches:
                raise SourceError(f"source.paths: no file matches {uri!r}: {WHERE_LISTS}")
            out += [prefix + m if prefix else m for m in matches]
        elif not fs.exists(path):
            where = f" ({path})" if path != uri else ""  # a relative path: where it was looked for
            raise SourceError(f"source.paths: file not found: {uri!r}{where}: {WHERE_LISTS}")
        else:
            out.append(uri)
    return out


def source_fingerprint(uri: str, gcs_project: str | None = None) -> str:
    """size + the best change marker the filesystem offers (md5/etag/generation/mtime)."""
    fs, path = source_fs(uri, gcs_project)
    info = fs.info(path)
    for k in ("md5Hash", "ETag", "etag", "generation", "mtime", "updated", "LastModified", "created"):
        if info.get(k) is not None:
            return f"{info.get('size')}:{k}={info[k]}"
    return f"{info.get('size')}"


def detect_format(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = uri.lower().removesuffix(".gz")
    for ext, f in ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return f
    raise SourceError(f"{uri}: cannot tell the format from the extension; set source.format")


def _read_raw(uri: str, fmt: str, gcs_project: str | None, text_cols: list[str]) -> pa.Table:
    fs, path = source_fs(uri, gcs_project)
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as f:
        if fmt == "parquet":
            return pq.read_table(f)
        data = f.read()
    if fmt == "csv":
        # URL and caption stay strings ("123" is a caption, not a number).
        convert = pcsv.ConvertOptions(column_types={c: pa.string() for c in text_cols})
        parse = pcsv.ParseOptions(newlines_in_values=True)  # captions may span lines
        return pcsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=convert)
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return pa.Table.from_pylist(rows)


def read_source(uri: str, src_cfg, gcs_project: str | None = None, limit: int | None = None) -> pa.Table:
    """The selected rows (source.filters etc., then the first `limit`): url, caption (strings,
    may be null), carried columns, ROW (the row's index in the file)."""
    fmt = detect_format(uri, src_cfg.format)
    url_col, cap_col = src_cfg.url_column, src_cfg.caption_column
    try:
        table = _read_raw(uri, fmt, gcs_project, [url_col, cap_col])
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser error: say which file
        raise SourceError(f"{uri}: cannot read as {fmt}: {type(e).__name__}: {e}") from None
    for col, key in ((url_col, "source.url_column"), (cap_col, "source.caption_column")):
        if col not in table.column_names:
            raise SourceError(f"{uri}: no column {col!r} ({key}); columns are {table.column_names}")
    rows = select(uri, src_cfg, gcs_project, limit, num_rows=table.num_rows, table=table).indices
    table = table.slice(0, len(rows)) if selection_spec(src_cfg) is None else table.take(pa.array(rows))
    carry = src_cfg.carry_columns
    if carry is None:
        carry = [c for c in table.column_names if c not in (url_col, cap_col)]
    missing = [c for c in carry if c not in table.column_names]
    if missing:
        raise SourceError(f"{uri}: source.carry_columns {missing} not in {table.column_names}")
    cols = {"url": pc.cast(table[url_col], pa.string()), "caption": pc.cast(table[cap_col], pa.string())}
    for c in carry:
        # A carried column may not shadow an output column: LAION has none, others might.
        cols[f"source_{c}" if c in IMAGE_COLUMNS else c] = table[c]
    cols[ROW] = pa.array(rows, pa.int64())
    return pa.table(cols)


def count_rows(uri: str, src_cfg, gcs_project: str | None = None) -> int:
    if detect_format(uri, src_cfg.format) == "parquet":
        fs, path = source_fs(uri, gcs_project)
        try:
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{uri}: cannot read as parquet: {type(e).__name__}: {e}") from None
    return read_source(uri, src_cfg, gcs_project).num_rows


def select(uri: str, src_cfg, gcs_project: str | None = None, limit: int | None = None,
           num_rows: int | None = None, table: pa.Table | None = None) -> Selection:
    """The file's rows that pass `source.filters` (muse/download/filters.py), first `limit` of them."""
    fmt = detect_format(uri, src_cfg.format)
    if selection_spec(src_cfg) is None and num_rows is None:
        num_rows = count_rows(uri, src_cfg, gcs_project)
    try:
        return select_rows(uri, src_cfg, fmt, gcs_project, limit, num_rows, table)
    except FilterError as e:
        raise SourceError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any parser error: say which file
        raise SourceError(f"{uri}: cannot read as {fmt}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- registry

def load_registry(storage: Storage) -> dict:
    """images/_SOURCES.json (a new one when there is none); SourceError when of another version."""
    if storage.exists(REGISTRY):
        reg = storage.read_json(REGISTRY)
        check_version(reg.get("schema_version"), IMAGES_VERSION, storage.url(REGISTRY),
                      f"download into a new storage.root, or delete {storage.url(IMAGES)} and download again",
                      SourceError)
        return reg
    return {"schema_version": IMAGES_VERSION, "next_shard": 0, "sources": {}}


def live_shards(registry: dict) -> set[int]:
    """The shard ids of the registry's current source files."""
    return {s for e in registry["sources"].values()
            for s in range(e["first_shard"], e["first_shard"] + e["num_shards"])}


def retire(storage: Storage, entry: dict) -> None:
    """Delete a changed file's old shards, every generation of them (one listing of the names
    that start like its ids): markers first (so no generation reads as done any more), then the
    Parquet files."""
    ids = range(entry["first_shard"], entry["first_shard"] + entry["num_shards"])
    names = [p.rsplit("/", 1)[-1] for p in prefix_listing(storage, IMAGES, ids)]
    mine = [n for n in names if (parsed := parse_shard_name(n)) is not None and parsed[0] in ids]
    markers = [n for n in mine if n.endswith("_stats.json")]
    for name in markers + [n for n in mine if n not in markers]:
        storage.delete(f"{IMAGES}/{name}")


@dataclass
class SourcePlan:
    """What registering the source files would do, computed without writing anything:
    `parts` the unfinished ones, `current` every part of the listed files, `registry` the new
    `_SOURCES.json`, `retired` the old entries of changed files (their shards get deleted),
    `unchanged` how many of the listed files were registered before as they are now."""

    parts: list[DownloadPart]
    current: list[DownloadPart]
    registry: dict
    retired: list[dict]
    unchanged: int = 0


def shards_for(rows: int, shard_size: int) -> int:
    """Image shards a file's `rows` selected rows fill (the last one may be short)."""
    return math.ceil(rows / shard_size)


def plan_sources(storage: Storage, cfg, done: set[int], rows: int | None = None) -> SourcePlan:
    """Assign shard ids to new/changed files and say which shards would be retired: the pure
    step of `register_sources` (reads the registry and the source files, writes nothing; `muse plan`).
    `done`: the finished image shards. `rows`: plan a declared row count as one new file instead
    of reading `source.paths` (`muse plan --rows N`, when the URL lists are not at hand)."""
    reg = load_registry(storage)
    gp, src, size = cfg.storage.gcs_project, cfg.source, cfg.download.shard_size
    remaining = src.max_samples
    plan = SourcePlan([], [], reg, [])
    spec = selection_spec(src)
    uris = [f"<{rows} declared rows>"] if rows is not None else expand_sources(src.paths, gp)
    for uri in uris:
        if remaining == 0:
            break
        fp = "declared" if rows is not None else source_fingerprint(uri, gp)
        entry = reg["sources"].get(uri)
        # a changed selection (source.filters, ...) is a changed file: new shard ids, no mixing
        unchanged = entry is not None and entry["fingerprint"] == fp and entry["selection"] == spec
        if rows is not None:
            sel, n = None, rows if remaining is None else min(rows, remaining)
        elif unchanged and remaining is None and entry["max_samples"] is None:
            sel, n = None, entry["rows"]
        else:
            sel = select(uri, src, gp, remaining)
            n = len(sel.indices)
        if remaining is not None:
            remaining -= n
        if unchanged and entry["rows"] == n:
            plan.unchanged += 1
        else:
            if entry is not None:
                plan.retired.append(entry)
            entry = {"fingerprint": fp, "rows": n, "max_samples": src.max_samples,
                     "first_shard": reg["next_shard"], "num_shards": shards_for(n, size),
                     "shard_size": size, "selection": spec}
            reg["next_shard"] += entry["num_shards"]
            reg["sources"][uri] = entry
        if sel is not None:  # every input row accounted for: rows + sum(filtered) == rows_in
            entry.update(rows_in=sel.rows_in, filtered=sel.filtered)
        part = DownloadPart(uri, fp, entry["first_shard"], entry["num_shards"], entry["rows"],
                            entry["shard_size"])
        plan.current.append(part)
        if not done.issuperset(part.shard_ids()):
            plan.parts.append(part)
    return plan


def register_sources(storage: Storage, cfg, done: set[int]) -> SourcePlan:
    """`plan_sources`, then do it: retire the changed files' shards, write the registry."""
    plan = plan_sources(storage, cfg, done)
    for entry in plan.retired:
        retire(storage, entry)
    storage.write_json(REGISTRY, plan.registry)
    return plan


def plan_parts(storage: Storage, cfg, done: set[int] | None = None) -> list[DownloadPart]:
    """Assign shard ids to new/changed files, retire stale shards; return unfinished parts.
    `done`: the finished shards, when the caller has `whole_image_shards` already."""
    if done is None:
        done = set(whole_image_shards(storage))  # a truncated shard loses its marker: fetched again
    return register_sources(storage, cfg, done).parts
