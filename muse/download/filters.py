"""Row selection on a URL list's metadata, before img2dataset sees a row (`source.filters`).

    selection_spec(src_cfg)              -> dict | None   what the registry records (None: no selection)
    select_rows(uri, src_cfg, gp, limit) -> Selection     kept row indices + filtered counts per reason

Only the columns the selection needs are read (Parquet: column projection; CSV/JSONL:
streamed in batches with the other columns skipped), and every condition is a vectorised
pyarrow compare. Every row is accounted for: a row is kept, or counted under the FIRST rule
it fails, in this order: `source.filters` as listed, then `min_aspect`/`max_aspect`, then
`dedup_urls` (a repeat of a URL already kept in the same file). The null rule: a row whose
value in a filtered column is null or NaN is dropped, counted as "<column> is null".

We read the filter columns whole rather than pushing the predicate into the Parquet scan
(row-group skipping): the per-reason counts need every row's value, and these few numeric
columns are a small fraction of a LAION part (the URL and caption strings are the bulk).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from muse.storage import source_fs

BATCH_ROWS = 1 << 16


class FilterError(ValueError):
    """A selection the file cannot serve; sources.py re-raises it as SourceError (which lives
    there, and sources.py imports this module)."""


@dataclass
class Selection:
    """`indices`: kept rows of the file (ascending, int64); `rows_in`: rows considered
    (all of them, or the prefix that holds the first `limit` kept rows); `filtered`: {reason: n}."""

    indices: np.ndarray
    rows_in: int
    filtered: dict[str, int] = field(default_factory=dict)


def _num(x: float) -> str:
    return f"{x:g}"


def _aspect_on(src_cfg) -> bool:
    return src_cfg.min_aspect is not None or src_cfg.max_aspect is not None


def rules(src_cfg) -> list[tuple[str | None, float | None, float | None, str]]:
    """(column, min, max, label) per rule; the aspect rule (width / height) has column None."""
    out = [(f.column, f.min, f.max, f.column) for f in src_cfg.filters]
    if _aspect_on(src_cfg):
        w, h = src_cfg.aspect_columns
        out.append((None, src_cfg.min_aspect, src_cfg.max_aspect, f"{w}/{h}"))
    return out


def selection_spec(src_cfg) -> dict | None:
    """The selection as the registry records it: a changed one re-selects (new shard ids)."""
    spec = {"filters": [[c, lo, hi] for c, lo, hi, _ in rules(src_cfg)],
            "aspect_columns": list(src_cfg.aspect_columns) if _aspect_on(src_cfg) else None,
            "dedup_urls": src_cfg.dedup_urls}
    if not spec["filters"] and not spec["dedup_urls"]:
        return None  # no selection: registries written before filters existed stay valid
    return spec


def numeric_columns(src_cfg) -> list[str]:
    cols = [f.column for f in src_cfg.filters] + (list(src_cfg.aspect_columns) if _aspect_on(src_cfg) else [])
    return list(dict.fromkeys(cols))


def needed_columns(src_cfg) -> list[str]:
    return list(dict.fromkeys(numeric_columns(src_cfg) + ([src_cfg.url_column] if src_cfg.dedup_urls else [])))


# ----------------------------------------------------------------------------- reading

def _missing(uri: str, names: list[str], wanted: list[str]) -> None:
    gone = [c for c in wanted if c not in names]
    if gone:
        raise FilterError(f"{uri}: source.filters / source.aspect_columns name column(s) {gone} that the "
                          f"file lacks; its columns are {names}. Fix the column names (they are case-sensitive) "
                          "or remove the filter")


def iter_columns(uri: str, fmt: str, gcs_project: str | None, cols: list[str],
                 numeric: list[str]) -> Iterator[pa.Table]:
    """Batches of just `cols` from the file (errors name the file and the column); `numeric`:
    those compared as numbers."""
    fs, path = source_fs(uri, gcs_project)
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as f:
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            _missing(uri, pf.schema_arrow.names, cols)
            # one read of just these columns (arrow decodes them in parallel); the download
            # reads the whole file into memory anyway, so streaming Parquet would save nothing
            yield pf.read(columns=cols)
        elif fmt == "csv":
            yield from _iter_csv(uri, f, cols, numeric)
        else:
            yield from _iter_jsonl(uri, f, cols)


def _iter_csv(uri, f, cols, numeric):
    # Streaming infers types from the first block only: a column of integers that turns
    # fractional later would fail, so the compared columns are read as float64 throughout.
    convert = pcsv.ConvertOptions(include_columns=cols, column_types={c: pa.float64() for c in numeric})
    try:
        reader = pcsv.open_csv(f, parse_options=pcsv.ParseOptions(newlines_in_values=True),
                               convert_options=convert, read_options=pcsv.ReadOptions(block_size=1 << 22))
        for batch in reader:
            yield pa.Table.from_batches([batch])
    except KeyError as e:  # pyarrow: "Column 'X' in include_columns does not exist in CSV file"
        raise FilterError(f"{uri}: source.filters / source.aspect_columns: {e.args[0]}; fix the column "
                          "name (case-sensitive) or remove the filter") from None
    except pa.ArrowInvalid as e:
        raise FilterError(f"{uri}: column(s) {', '.join(map(repr, numeric))} hold a value that is not a number ({e}): "
                          "source.filters and source.aspect_columns compare numbers") from None


def _iter_jsonl(uri, f, cols):
    lines, seen = [], set()
    for raw in io.TextIOWrapper(f, encoding="utf-8"):
        if raw.strip():
            row = json.loads(raw)
            seen.update(row)
            lines.append({c: row.get(c) for c in cols})
        if len(lines) == BATCH_ROWS:
            yield _jsonl_batch(uri, lines, cols)
            lines = []
    _missing(uri, sorted(seen), cols)
    if lines:
        yield _jsonl_batch(uri, lines, cols)


def _jsonl_batch(uri, rows, cols) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows, schema=None).select(cols)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise FilterError(f"{uri}: cannot read the filtered columns {cols}: {e}") from None


# ----------------------------------------------------------------------------- selecting

def _numeric(uri: str, name: str, col: pa.ChunkedArray) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_null(t):  # every value null (JSONL/CSV inference): all dropped by the null rule
        return pc.cast(col, pa.float64())
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
        raise FilterError(f"{uri}: column {name!r} is {t}, not a number: source.filters and "
                          "source.aspect_columns compare numbers; fix the column or remove the filter")
    return pc.cast(col, pa.float64())


def _rule_masks(uri: str, batch: pa.Table, src_cfg):
    """(label of the failure, fail mask) per rule and per failure kind, in counting order."""
    for column, lo, hi, label in rules(src_cfg):
        if column is None:
            w, h = src_cfg.aspect_columns
            values = pc.divide(_numeric(uri, w, batch[w]), _numeric(uri, h, batch[h]))
        else:
            values = _numeric(uri, column, batch[column])
        yield f"{label} is null", pc.is_null(values, nan_is_null=True)
        if lo is not None:
            yield f"{label} < {_num(lo)}", pc.less(values, lo)
        if hi is not None:
            yield f"{label} > {_num(hi)}", pc.greater(values, hi)


def _select_batch(uri: str, batch: pa.Table, src_cfg, labels: list[str]) -> np.ndarray:
    """Per row: -1 if kept, else the index in `labels` of the first rule it fails."""
    why = np.full(batch.num_rows, -1, dtype=np.int16)
    for label, fail in _rule_masks(uri, batch, src_cfg):
        if label not in labels:
            labels.append(label)
        # a null value makes `fail` null: the "is null" mask before it has counted that row
        hit = (why < 0) & pc.fill_null(fail, False).to_numpy(zero_copy_only=False)
        why[hit] = labels.index(label)
    return why


def _first_of_each_url(urls: pa.ChunkedArray, candidates: np.ndarray) -> np.ndarray:
    """Of the candidate rows, those that are the first with their URL (null and blank URLs
    all kept: they become bad_url rows, which say more than a dedup count)."""
    urls = urls.take(pa.array(candidates))
    blank = pc.equal(pc.utf8_trim_whitespace(urls), "")  # CSV reads an empty field as ""
    codes = pc.dictionary_encode(pc.if_else(blank, None, urls)).combine_chunks().indices
    codes = pc.fill_null(codes, -1).to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)  # first position of each distinct URL
    keep = np.zeros(len(candidates), dtype=bool)
    keep[first] = True
    keep[codes < 0] = True
    return candidates[keep]


def select_rows(uri: str, src_cfg, fmt: str, gcs_project: str | None = None, limit: int | None = None,
                num_rows: int | None = None, table: pa.Table | None = None) -> Selection:
    """Which rows of the file to download. Without a selection nothing is read (`num_rows` given);
    `table`: the file already in memory (the download reads it whole), so it is not read again."""
    if selection_spec(src_cfg) is None:
        n = num_rows if limit is None else min(num_rows, limit)
        return Selection(np.arange(n, dtype=np.int64), n)
    cols = needed_columns(src_cfg)
    if table is not None:
        _missing(uri, table.column_names, cols)
    batches = ([table.select(cols)] if table is not None
               else iter_columns(uri, fmt, gcs_project, cols, numeric_columns(src_cfg)))
    labels: list[str] = []
    why, urls = [], []
    for batch in batches:
        why.append(_select_batch(uri, batch, src_cfg, labels))
        if src_cfg.dedup_urls:
            urls += pc.cast(batch[src_cfg.url_column], pa.string()).chunks
    why = np.concatenate(why) if why else np.zeros(0, np.int16)
    indices = np.flatnonzero(why < 0)
    if src_cfg.dedup_urls and len(indices):
        firsts = _first_of_each_url(pa.chunked_array(urls, pa.string()), indices)
        labels.append("duplicate url")
        why[np.setdiff1d(indices, firsts, assume_unique=True)] = len(labels) - 1
        indices = firsts
    rows_in = len(why)
    if limit is not None and len(indices) > limit:  # the prefix of the file that yields `limit` rows
        rows_in = int(indices[limit - 1]) + 1
        indices = indices[:limit]
    codes = np.bincount(why[:rows_in][why[:rows_in] >= 0], minlength=len(labels))
    filtered = {labels[i]: int(n) for i, n in enumerate(codes) if n}
    return Selection(indices.astype(np.int64), rows_in, dict(sorted(filtered.items())))
