"""gcsfs with muse's retry policy in its one request method (used by muse/storage.py only).

Every HTTP call gcsfs makes (reads, ranged reads, listings, uploads, deletes, compose) goes through
`GCSFileSystem._request`, which gcsfs wraps in its own retry loop (gcsfs/retry.py: 6 tries, waits
of 1-2, 2-3, 4-5, 8-9, 16-17 s, no `Retry-After`, no deadline, no read timeout, every method).
`RetryingGCSFileSystem._request` replaces that method, loop included, with one try per call of
`RetryPolicy.arun` (muse/storage.py), so the policy is the only retry around a request and gcsfs's
is never stacked under it. Kept close to gcsfs 2026.10's `_request` body; a try also:
- reads `Retry-After` from a 429/503 answer (gcsfs drops the headers of an error);
- times out after `timeout_s` without bytes (gcsfs waits up to aiohttp's 5 minutes);
- checks the body it got: a ranged read must have as many bytes as its `Content-Range` says, a
  whole-object read the crc32c of its `X-Goog-Hash`; otherwise a `transient.TransferError`;
- treats a 404 answer to a retried DELETE as done (the first try deleted it, its answer was lost).

Requests retried are the idempotent ones: what a second copy cannot change. That is every GET and
HEAD, a DELETE (see above), a whole-object upload or compose that overwrites (same bytes, same
name: same object), but not a request with a generation precondition (a retry of a create that
landed would fail with 412) nor one chunk of a resumable upload (its retry must first ask the
session what arrived). muse's own writes are whole-object uploads (`Storage` passes a chunk size
above the object's size): a retry sends the object again.

gcsfs keeps retrying in two places that do not use `_request`: `_get_file_request` (downloads to a
local file: muse never calls it) and the per-item retry of a batched delete on real GCS (rm of many
objects in one batch request; the batch request itself is under the policy).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
import gcsfs
from gcsfs.retry import validate_response

from muse.storage import RetryPolicy, crc32c, retry_after_s
from muse.transient import TransferError


def _upload_name(body) -> str:
    """The object name in a multipart upload's metadata part (gcsfs puts it first), or ""."""
    head = bytes(body[:4096]) if isinstance(body, (bytes, bytearray, memoryview)) else b""
    start, end = head.find(b"{"), head.find(b"}\n")
    try:
        return json.loads(head[start:end + 1]).get("name", "") if 0 <= start < end else ""
    except ValueError:
        return ""


def describe(method: str, url: str, params: dict, body=None) -> str:
    """`GET gs://bucket/object` (or the listed prefix) for a request, as errors name it."""
    parts = urlsplit(url)
    rest = parts.path.partition("/b/")[2]
    bucket, _, obj = rest.partition("/o")
    obj = unquote(obj.lstrip("/"))
    if not obj:
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        obj = str(params.get("prefix") or params.get("name") or query.get("name") or _upload_name(body))
    return f"{method} gs://{bucket}/{obj}" if bucket else f"{method} {url}"


def idempotent(method: str, url: str, params: dict) -> bool:
    """Whether a second copy of this request cannot change what the first did (module docstring)."""
    if any(k.startswith(("ifGeneration", "ifMetageneration")) for k in params) or "ifGenerationMatch" in url:
        return False
    if "upload_id=" in url:  # one chunk of a resumable upload
        return False
    return method in ("GET", "HEAD", "DELETE", "POST", "PUT")


def check_body(method: str, req_headers: dict, status: int, headers, contents: bytes) -> None:
    """Raise `TransferError` for a body other than the one the answer announces (the retry
    policy's message names the request)."""
    if method != "GET" or status not in (200, 206):
        return
    if status == 206:
        span = (headers.get("Content-Range") or "").removeprefix("bytes ").split("/")[0]
        if "-" in span:
            first, last = (int(x) for x in span.split("-"))
            if len(contents) != last - first + 1:
                raise TransferError(f"short read: {len(contents)} bytes of {last - first + 1} "
                                    f"(bytes {first}-{last})")
        return
    if "Range" in (req_headers or {}):
        return
    if (headers.get("X-Goog-Stored-Content-Encoding") or "identity") != "identity":
        return  # the hash is of the stored (compressed) bytes, not of those served
    for part in (headers.get("X-Goog-Hash") or "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "crc32c" and value != crc32c(contents):
            size = headers.get("X-Goog-Stored-Content-Length")
            raise TransferError(f"read {len(contents)} bytes"
                                + (f" of {size}" if size else "")
                                + f" with crc32c {crc32c(contents)}, GCS says the object's is {value}")


class RetryingGCSFileSystem(gcsfs.GCSFileSystem):
    """gcsfs whose every request runs under `retry` (a `RetryPolicy`) instead of gcsfs's loop."""

    def __init__(self, *args, retry: RetryPolicy | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry = retry or RetryPolicy()

    async def _request(self, method, path, *args, headers=None, json=None, data=None,
                       cache_type=None, cache_source=None, **kwargs):
        url = self._format_path(path, args)
        body = data.getvalue() if hasattr(data, "getvalue") else data  # resent as is on a retry
        what = describe(method, url, kwargs, body)

        async def attempt(n: int):
            return await self._try(n, method, url, path, args, headers, json, body, cache_type,
                                   cache_source, kwargs)

        policy = self.retry
        if not idempotent(method, url, kwargs):
            return await policy.arun(attempt, what, retry_if=lambda exc: False)
        return await policy.arun(attempt, what)

    async def _try(self, n, method, url, path, args, headers, json_body, data, cache_type, cache_source,
                   params):
        await self._set_session()
        timeout = aiohttp.ClientTimeout(total=self.retry.deadline_s, sock_connect=self.retry.timeout_s,
                                        sock_read=self.retry.timeout_s)
        async with self.session.request(
            method=method, url=url, params=self._get_params(params), json=json_body,
            headers=self._get_headers(headers, cache_type=cache_type, cache_source=cache_source),
            data=data, timeout=timeout,
        ) as r:
            status, rheaders, info = r.status, r.headers, r.request_info
            contents = await r.read()
        if method == "DELETE" and status == 404 and n > 0:
            return 204, rheaders, info, b""  # deleted by the try whose answer was lost
        try:
            validate_response(status, contents, path, args)
        except Exception as exc:
            exc.retry_after = retry_after_s(rheaders)
            raise
        check_body(method, headers, status, rheaders, contents)
        return status, rheaders, info, contents

