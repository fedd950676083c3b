"""Which replaced rows are worth fetching again: every `reason` the download writes, classified.

A replaced row (solid-colour stand-in) carries a short `reason` (`muse.download.writer.reason_of`
normalises img2dataset's error message into it; the writer adds its own for what it checks).
A reason is *retryable* when the same URL can answer a later run: the host was slow, busy,
briefly unreachable, or our own run stopped first. It is *final* when asking again gives the
same answer: the link is gone, the URL is not one we fetch, the picture fails our checks.
Anything this table does not know (a reason written by a newer version, say) is final, so a
retry pass never hammers URLs for a failure nobody looked at.

docs/download.md shows this table; tests/test_download_reasons.py checks both against real
img2dataset runs on the local image server.
"""

from __future__ import annotations

# reason -> (retryable, what it means; in quotes: img2dataset's error message behind it)
REASONS: dict[str, tuple[bool, str]] = {
    "timeout": (True, "no answer within `download.timeout_s` (\"timed out\", \"The read operation timed out\")"),
    "http_429": (True, "too many requests (\"HTTP Error 429: Too Many Requests\")"),
    "http_408": (True, "the server's request timeout (\"HTTP Error 408: Request Timeout\")"),
    "http_5xx": (True, "any 5xx server error (\"HTTP Error 503: Service Unavailable\")"),
    "connection_refused": (True, "nothing listening (\"<urlopen error [Errno 111] Connection refused>\")"),
    "connection_reset": (True, "the connection was reset (\"[Errno 104] Connection reset by peer\")"),
    "connection_closed": (True, "closed before answering (\"Remote end closed connection without response\")"),
    "incomplete_read": (True, "the transfer was cut short (\"IncompleteRead(4140 bytes read, 4140 more expected)\")"),
    "unreachable": (True, "no route to the host (\"<urlopen error [Errno 101] Network is unreachable>\")"),
    "dns_temporary": (True, "the resolver did not answer (\"<urlopen error [Errno -3] Temporary failure "
                            "in name resolution>\")"),
    "deadline": (True, "our run stopped at `download.deadline_s` before the row was fetched (written by "
                       "no code yet: such a run writes no shard for the row; reserved for retries)"),
    "http_404": (False, "not found (\"HTTP Error 404: Not Found\")"),
    "http_410": (False, "gone for good (\"HTTP Error 410: Gone\")"),
    "http_403": (False, "forbidden (\"HTTP Error 403: Forbidden\"); any other 4xx/3xx `http_<code>` is final too"),
    "dns": (False, "no such host (\"<urlopen error [Errno -2] Name or service not known>\")"),
    "ssl": (False, "TLS failed, e.g. a bad certificate (\"<urlopen error [SSL: ...]>\")"),
    "redirect": (False, "a redirect urllib refuses to follow"),
    "disallowed": (False, "the host forbids AI use (\"Use of image disallowed by X-Robots-Tag directive\")"),
    "bad_url": (False, "not an http(s) URL (empty, null, file:, data:): never fetched; or one urllib refuses "
                       "(\"nonnumeric port: 'x'\", \"Invalid IPv6 URL\")"),
    "too_small": (False, "smaller than `download.min_image_size` (\"image too small\")"),
    "aspect_ratio": (False, "beyond `download.max_aspect_ratio` (\"aspect ratio too large\")"),
    "decode_error": (False, "not a picture PIL or OpenCV can decode (\"Image decoding error\"; HTML, truncated)"),
    "blank_image": (False, "decodes to a single colour (16-bit PNGs come out pure white)"),
    "resize_error": (False, "any other resizer failure (\"image area too large\", ...)"),
    "download_error": (False, "any other download failure (a message `reason_of` does not recognise)"),
    "filtered": (False, "dropped by `source.filters` before the download (such rows are in no shard)"),
}

def is_retryable(reason: str | None) -> bool:
    """True when a row replaced for `reason` may succeed if fetched again (see REASONS)."""
    # unknown reasons are final, and so is every http_<code> not in the table (reason_of writes
    # one for each status but 5xx: 401, 301, 451, ...; of 4xx only 408 and 429 say "try later")
    return REASONS.get(reason, (False, ""))[0]
