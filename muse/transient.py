"""Which errors are worth retrying: an allow-list of transient failures, by type.

A retry helps only when the same call can succeed a moment later: a dropped connection, a
timeout, GCS saying 429 (slow down) or 5xx, an img2dataset run killed by its deadline.
Everything else (bad data, a bug, a missing file, no permission, CUDA out of memory) fails
at once, so a bad shard shows its error in seconds instead of after minutes of back-off.
The orchestrator (flows/common.py) asks `is_transient` to retry a task; inside the library only
muse/storage.py retries, one HTTP request at a time (its `RetryPolicy`), and asks the same question.
"""

from __future__ import annotations

# HTTP statuses a server uses for "try again": request timeout, too many requests, 5xx.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class TransferError(ConnectionError):
    """An answer whose bytes are not what the server said it sent: fewer bytes than its
    `Content-Range` (a short read) or a body whose crc32c differs from its `X-Goog-Hash`. The
    transfer broke on the way, so the same request may well succeed: transient by its type."""


def _network_types() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the stdlib and of the HTTP stacks under gcsfs / the hub."""
    # imported here: muse.download imports muse.storage, which imports this module
    from muse.download.runner import DownloadDeadlineError

    types: list[type[BaseException]] = [ConnectionError, TimeoutError, DownloadDeadlineError]
    try:  # requests (huggingface_hub, google-auth): its ConnectionError is not the builtin one
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                  requests.exceptions.ChunkedEncodingError]  # a body cut mid-way
    except ImportError:
        pass
    try:  # aiohttp (gcsfs)
        import aiohttp

        # ClientPayloadError: the connection closed before the body's Content-Length arrived
        types += [aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    try:  # httpx (newer huggingface_hub)
        import httpx

        types += [httpx.TransportError]
    except ImportError:
        pass
    try:  # google-auth refreshing a token over the network
        import google.auth.exceptions

        types += [google.auth.exceptions.TransportError]
    except ImportError:
        pass
    return tuple(types)


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a GCS / HTTP error, None for other errors."""
    try:
        from gcsfs.retry import HttpError
    except ImportError:  # pragma: no cover - gcsfs is a dependency
        HttpError = ()
    if HttpError and isinstance(exc, HttpError):
        return exc.code
    response = getattr(exc, "response", None)  # requests.HTTPError / httpx.HTTPStatusError
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def is_transient(exc: BaseException) -> bool:
    """True for a network failure, GCS 429/5xx or the download deadline (or one of those as the
    explicit `raise ... from` cause); False for anything else."""
    network = _network_types()
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, network) or _status(exc) in RETRY_STATUS:
            return True
        exc, seen = exc.__cause__, seen + 1
    return False
