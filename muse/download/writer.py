"""Build a final image shard: exactly one row per input row, failures replaced.

Input: our slice of the source table and img2dataset's per-shard parquet (it lists every
row it was given, failures included, with `status` and `error_message`). Output: the
columns of `muse.layout.IMAGE_SCHEMA` + the carried source columns. A success
is kept as RGB JPEG (grayscale converted); a perfectly uniform decode (16-bit PNGs come out
pure white) is treated as failed `blank_image`. Every failed row gets
`placeholders.solid_color(key)`.
"""

from __future__ import annotations

import io
import re
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from muse.download.sources import ROW
from muse.layout import IMAGE_COLUMNS, IMAGE_SCHEMA, PAGE_CHECKSUMS, make_key
from muse.placeholders import solid_color

BAD_URL_MESSAGE = "not an http(s) URL: not fetched"


def is_http(url) -> bool:
    return isinstance(url, str) and url.strip().lower().startswith(("http://", "https://"))


def fetch_list(rows: pa.Table) -> pa.Table:
    """What img2dataset gets: http(s) URLs (non-ASCII percent-encoded) or "" (fails at once)."""
    urls = [quote(u.strip(), safe=":/?#[]@!$&'()*+,;=%~") if is_http(u) else ""
            for u in rows.column("url").to_pylist()]
    return pa.table({"url": pa.array(urls, pa.string()), ROW: rows.column(ROW)})


def reason_of(status: str | None, message: str | None) -> str:
    """Normalise img2dataset's status + error message into a short reason."""
    m = (message or "").lower()
    # urllib refusing the URL's syntax (a bad port, a broken IPv6 host; spaces never get there:
    # the reader percent-encodes them): first, as such a message may quote the URL
    if any(n in m for n in ("nonnumeric port", "invalid ipv6 url")):
        return "bad_url"
    code = re.search(r"http error (\d{3})", m)
    if code:
        return "http_5xx" if code.group(1).startswith("5") else f"http_{code.group(1)}"
    # muse/download/reasons.py says which of these a retry can fix (tests/test_download_reasons.py
    # produces each message with real img2dataset); the first needle found wins
    for needle, reason in (("image too small", "too_small"), ("aspect ratio too large", "aspect_ratio"),
                           ("refused", "connection_refused"), ("timed out", "timeout"),
                           ("timeout", "timeout"), ("image decoding error", "decode_error"),
                           ("unknown url type", "bad_url"), ("temporary failure in name resolution", "dns_temporary"),
                           ("name or service", "dns"), ("getaddrinfo", "dns"), ("ssl", "ssl"),
                           ("certificate", "ssl"), ("redirect", "redirect"), ("remote end closed", "connection_closed"),
                           ("reset by peer", "connection_reset"), ("incompleteread", "incomplete_read"),
                           ("network is unreachable", "unreachable"), ("no route to host", "unreachable"),
                           ("x-robots-tag", "disallowed")):
        if needle in m:
            return reason
    return "resize_error" if status == "failed_to_resize" else "download_error"


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def check_image(data: bytes, quality: int) -> tuple[bytes | None, int, int, str | None]:
    """(RGB JPEG bytes, w, h, None) or (None, 0, 0, reason) for a downloaded image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:  # noqa: BLE001 - img2dataset wrote something PIL cannot read
        return None, 0, 0, "decode_error"
    arr = np.asarray(img)
    if arr.size and arr.min() == arr.max():
        return None, 0, 0, "blank_image"
    if img.mode != "RGB":  # grayscale (1 channel) -> 3 channels, same pixels
        data = _jpeg(img.convert("RGB"), quality)
    return data, img.size[0], img.size[1], None


def row_result(url, status: str | None, error: str | None, jpg, key: str, image_size: int,
               quality: int) -> dict:
    """One row's image columns from img2dataset's answer for it (`jpg`: the bytes on success):
    the checked picture, or a placeholder with its reason (also the retry pass's rows)."""
    image, w, h, reason = None, 0, 0, None
    if not is_http(url):
        status, error, reason = "not_fetched", BAD_URL_MESSAGE, "bad_url"
    elif status == "success":
        image, w, h, reason = check_image(jpg, quality)
        if reason:
            status, error = "failed_to_resize", f"{reason}: decoded image is {reason}"
    else:
        reason = reason_of(status, error)
    replaced = image is None
    if replaced:
        image = _jpeg(solid_color(key, image_size), quality)
        w = h = image_size
    return {"image": image, "width": w, "height": h, "replaced": replaced, "status": status,
            "error_message": error or "", "reason": reason or ""}


def build_shard(rows: pa.Table, fetched: pa.Table, shard_id: int, shard_size: int,
                image_size: int, quality: int) -> tuple[bytes, dict]:
    """(parquet bytes, stats) for one shard; `rows` is our slice, `fetched` img2dataset's."""
    by_row = {r: i for i, r in enumerate(fetched.column(ROW).to_pylist())}
    f_status = fetched.column("status").to_pylist()
    f_error = fetched.column("error_message").to_pylist()
    f_jpg = fetched.column("jpg")
    out = {c: [] for c in IMAGE_COLUMNS}
    counts: dict[str, int] = {}
    urls, captions = rows.column("url").to_pylist(), rows.column("caption").to_pylist()
    for i, row in enumerate(rows.column(ROW).to_pylist()):
        key = make_key(shard_id, i, shard_size)
        j = by_row.get(row)
        if j is None:
            raise ValueError(f"shard {shard_id}: row {row} missing from img2dataset's output")
        jpg = f_jpg[j].as_py() if f_status[j] == "success" else None
        res = row_result(urls[i], f_status[j], f_error[j], jpg, key, image_size, quality)
        if res["replaced"]:
            counts[res["reason"]] = counts.get(res["reason"], 0) + 1
        out["key"].append(key)
        out["caption"].append(captions[i] if captions[i] is not None else "")
        out["caption_was_null"].append(captions[i] is None)
        out["url"].append(urls[i] if urls[i] is not None else "")
        for c, v in res.items():
            out[c].append(v)
    table = _to_table(out, rows)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", **PAGE_CHECKSUMS)
    stats = {"shard": shard_id, "rows_in": rows.num_rows, "succeeded": rows.num_rows - sum(counts.values()),
             "replaced": sum(counts.values()), "replaced_by_reason": dict(sorted(counts.items()))}
    return buf.getvalue(), stats


def _to_table(out: dict, rows: pa.Table) -> pa.Table:
    cols = {f.name: pa.array(out[f.name], f.type) for f in IMAGE_SCHEMA}
    for c in rows.column_names:
        if c not in ("url", "caption", ROW):
            cols[c] = rows.column(c)
    return pa.table(cols)
