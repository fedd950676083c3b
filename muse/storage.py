"""The storage root: the only module that talks to fsspec.

A root is a local folder (default) or `gs://bucket/prefix` (gcsfs). Everything the
pipeline writes goes through `Storage`, with paths relative to the root:

    images/00042.parquet            phase 1 shards (+ images/00042_stats.json; names: muse/layout.py)
    encoded/<version>/00042.parquet phase 2 shards (+ encoded/<version>/_MANIFEST.json)
    checkpoints/<run>/step-00000100/  training checkpoints (every name under the root: muse/layout.py)

Writes are atomic: bytes are built in memory and land with one `pipe_file` (GCS objects
appear only when the upload completes) or a temp file + `os.replace` locally. We never
use `with fs.open(p, "wb")`, which finalises a truncated object when the body raises.

Retries on GCS: every HTTP request gcsfs makes for us (reads, ranged reads, listings, uploads,
deletes) goes through one `RetryPolicy`: bounded exponential backoff with full jitter, at least
the server's `Retry-After`, a total deadline, and only for idempotent requests and the errors
muse/transient.py calls transient. It lives in the gcsfs request method itself
(muse/storage_gcs.py), which replaces gcsfs's own retry loop: the two are never stacked.

Transfers on GCS are checked: a whole-object download against the crc32c GCS answers in its
`X-Goog-Hash` header, a ranged read (`open`: Parquet row groups) against the byte count of its
`Content-Range`; a short or changed body is a `transient.TransferError`, retried by the policy and
never decoded. Uploads compare the crc32c GCS stored with the bytes sent (`write_bytes`,
`write_many`); a mismatch is uploaded again under the same policy, and after the last try the
object is deleted and an `IntegrityError` names it. Ranged reads cannot be checked against a hash
(the header is the whole object's): the shards carry Parquet page checksums instead
(muse/layout.py `PAGE_CHECKSUMS`).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import quote

# gcsfs 2026.x probes hierarchical-namespace support on every bucket operation, which
# takes 40-80 s against an emulator; it must be switched off before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402

import yaml  # noqa: E402

from muse.transient import TransferError, is_transient  # noqa: E402

log = logging.getLogger("muse.storage")

# Full jitter (Google's GCS retry guidance; "Exponential Backoff And Jitter", AWS 2015): the wait
# before retry n is uniform in [0, min(CAP, BASE * 2**n)], so clients that failed together do not
# come back together. Its own generator: library code never touches the global RNG.
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
_JITTER = random.Random()


class StorageError(OSError):
    """A storage request that still failed when the retry policy gave up; the message names the
    object, the attempts and the last error (also its `__cause__`)."""


class IntegrityError(StorageError):
    """Bytes that differ from what GCS says the object holds, on every try; the message names it."""


def retry_after_s(headers) -> float | None:
    """Seconds a `Retry-After` header asks for (a number or an HTTP date), None when absent."""
    value = (headers or {}).get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(when.timestamp() - time.time(), 0.0) if when else None


def _reason(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    text = f"HTTP {code}" if isinstance(code, int) else type(exc).__name__
    detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{text}: {detail}" if detail and detail != text else text


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry one storage request (module docstring; `storage.*` in the config).

    `retries` tries after the first; `timeout_s` is how long one try may wait to connect or for its
    next bytes (a stalled read fails then, and is retried); `deadline_s` bounds the request with all
    its tries and waits. The wait before try n+1 is full jitter over `base_s * 2**n` (at most
    `cap_s`), and never shorter than the server's `Retry-After`."""
    retries: int = 6
    timeout_s: float = 60.0
    deadline_s: float = 300.0
    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S

    @classmethod
    def from_config(cls, s) -> "RetryPolicy":
        """From a StorageConfig."""
        return cls(retries=s.retries, timeout_s=s.timeout_s, deadline_s=s.deadline_s)

    def delay(self, attempt: int, exc: BaseException, started: float, what: str) -> float:
        """Seconds to wait after failed try `attempt` (0-based) before the next, or raise a
        `StorageError` (an `IntegrityError` for bytes that kept arriving wrong) from `exc`."""
        remaining = self.deadline_s - (time.monotonic() - started)
        wait = _JITTER.uniform(0, min(self.cap_s, self.base_s * 2 ** attempt))
        asked = getattr(exc, "retry_after", None)
        wait = max(wait, asked) if asked is not None else wait
        tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
        if attempt >= self.retries or wait >= remaining:
            why = "no retries left" if attempt >= self.retries else (
                f"the server asks for {asked:g} s more" if asked is not None and asked >= remaining
                else f"the {self.deadline_s:g} s deadline is reached")
            error = IntegrityError if isinstance(exc, TransferError) else StorageError
            raise error(f"{what}: failed after {tries} in {time.monotonic() - started:.1f} s ({why}); "
                        f"last error: {_reason(exc)}") from exc
        log.warning("%s: %s (try %d of %d); retrying in %.1f s", what, _reason(exc), attempt + 1,
                    self.retries + 1, wait)
        return wait

    def run(self, attempt: Callable[[int], Any], what: str,
            retry_if: Callable[[BaseException], bool] = is_transient) -> Any:
        """`attempt(n)` for n = 0, 1, ... until it returns, or until an error is not `retry_if`
        (raised as is) or the policy gives up (`delay`)."""
        started, n = time.monotonic(), 0
        while True:
            try:
                return attempt(n)
            except Exception as exc:
                if not retry_if(exc):
                    raise
                time.sleep(self.delay(n, exc, started, what))
            n += 1

    async def arun(self, attempt, what: str, retry_if: Callable[[BaseException], bool] = is_transient) -> Any:
        """`run` for a coroutine function `attempt(n)` (gcsfs's event loop: waits do not block it)."""
        started, n = time.monotonic(), 0
        while True:
            try:
                return await attempt(n)
            except Exception as exc:
                if not retry_if(exc):
                    raise
                await asyncio.sleep(self.delay(n, exc, started, what))
            n += 1


def crc32c(data: bytes) -> str:
    """GCS's spelling of a CRC32C: base64 of its 4 big-endian bytes."""
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def _make_fs(protocol: str, gcs_project: str | None, retry: RetryPolicy | None = None):
    if protocol in ("gs", "gcs"):
        from muse.storage_gcs import RetryingGCSFileSystem  # gcsfs costs ~1 s to import: only for gs://

        kwargs: dict[str, Any] = {"retry": retry or RetryPolicy()}
        if gcs_project:
            kwargs["project"] = gcs_project
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:  # fake-gcs-server in tests and the demo: no credentials
            kwargs.setdefault("project", "test")
            kwargs["token"] = "anon"
            kwargs["endpoint_url"] = emulator if "://" in emulator else f"http://{emulator}"
        return RetryingGCSFileSystem(**kwargs)
    return fsspec.filesystem(protocol or "file")


def source_fs(uri: str, gcs_project: str | None = None):
    """(filesystem, path) for an arbitrary input URI (source URL lists outside the root)."""
    protocol, path = fsspec.core.split_protocol(uri)
    if not protocol or protocol in ("file", "local"):
        return _make_fs("file", None), str(Path(path).expanduser().resolve())
    return _make_fs(protocol, gcs_project), path


class Storage:
    """A storage root with atomic writes. Create one per process (gcsfs is not fork-safe)."""

    def __init__(self, root: str, gcs_project: str | None = None, retry: RetryPolicy | None = None):
        self.uri = root.rstrip("/") or root
        self.gcs_project = gcs_project
        self.retry = retry or RetryPolicy()
        protocol, path = fsspec.core.split_protocol(self.uri)
        self.protocol = protocol or "file"
        self.is_local = self.protocol in ("file", "local")
        if self.is_local:
            path = str(Path(path).expanduser().resolve())
        self.root = path.rstrip("/")
        self.fs = _make_fs(self.protocol, gcs_project, self.retry)

    @classmethod
    def from_config(cls, cfg) -> "Storage":
        """From a PipelineConfig (or its StorageConfig): the root and the retry policy."""
        s = getattr(cfg, "storage", cfg)
        return cls(s.root, s.gcs_project, RetryPolicy.from_config(s))

    def __getstate__(self):  # rebuild the filesystem in the receiving process
        return {"uri": self.uri, "gcs_project": self.gcs_project, "retry": self.retry}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["gcs_project"], state.get("retry"))

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    # -- paths
    def path(self, rel: str) -> str:
        """Filesystem path (no protocol) of `rel`, for `self.fs` calls."""
        return f"{self.root}/{rel.lstrip('/')}" if rel else self.root

    def url(self, rel: str = "") -> str:
        """Full URI of `rel` (gs://bucket/prefix/rel or /abs/path/rel)."""
        p = self.path(rel)
        return p if self.is_local else f"{self.protocol}://{p}"

    def browser_url(self, rel: str) -> str | None:
        """An https URL a browser opens for `rel`, or None. gs:// roots: the Cloud console's
        authenticated download (https://storage.cloud.google.com/BUCKET/PATH), which opens for
        anyone signed in to Google with read access and never expires. Local roots: None, since a
        path is no URL for a browser elsewhere (the Prefect UI would resolve it against itself)."""
        if self.protocol not in ("gs", "gcs"):
            return None
        return "https://storage.cloud.google.com/" + quote(self.path(rel))

    def signed_url(self, rel: str, expires_s: int = 7 * 24 * 3600) -> str | None:
        """A V4 signed URL of `rel` that anyone can open for `expires_s` (at most 7 days), or None
        where the credentials cannot sign: only service-account keys can (user logins, the metadata
        server's tokens and the emulator's anonymous access cannot)."""
        if self.protocol not in ("gs", "gcs"):
            return None
        try:
            return self.fs.sign(self.path(rel), expiration=expires_s, version="v4")
        except (AttributeError, TypeError, ValueError, ImportError):  # no signing key: say None
            return None

    def relative(self, ref: str) -> str | None:
        """`ref` relative to the root: a relative path as is; a URI or absolute path under the root
        with the root stripped; None when it lies outside the root."""
        if "://" not in ref and not ref.startswith("/"):
            return ref
        root = self.url("")
        if ref.rstrip("/") == root:
            return ""
        return ref[len(root) + 1:] if ref.startswith(root + "/") else None

    # -- reads
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        """The whole object; on GCS checked against its crc32c (module docstring)."""
        if self.is_local:
            return self.fs.cat_file(self.path(rel))
        return self.fs.call("GET", self.fs.url(self.path(rel)))[1]

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_many(self, rels: list[str], batch_size: int = 256) -> dict[str, bytes]:
        """{rel: bytes} of many files in one call: gcsfs fetches them concurrently (`batch_size`
        requests in flight), where a loop of `read_bytes` would wait for each round trip in turn.
        A missing file raises FileNotFoundError."""
        if not rels:
            return {}
        paths = {self.fs._strip_protocol(self.path(r)): r for r in rels}  # the keys `cat` answers with
        kwargs = {} if self.is_local else {"batch_size": batch_size}
        got = self.fs.cat(list(paths), on_error="raise", **kwargs)
        return {paths[self.fs._strip_protocol(p)]: data for p, data in got.items()}

    def open(self, rel: str, mode: str = "rb"):
        if "w" in mode or "a" in mode:
            raise ValueError("use write_bytes/write_json: writes must be atomic")
        return self.fs.open(self.path(rel), mode)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def list(self, prefix: str, suffix: str = "", name_prefix: str = "") -> list[str]:
        """Sorted relative paths of files directly under `prefix` whose names start with
        `name_prefix` and end with `suffix`. On GCS the listing itself is narrowed to
        `name_prefix` (a few objects of a folder of thousands: one request, not one per page)."""
        self.invalidate()
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        narrow = {"prefix": name_prefix} if name_prefix and self.protocol in ("gs", "gcs") else {}
        try:
            found = self.fs.ls(base, detail=False, **narrow)
        except FileNotFoundError:  # gcsfs, when nothing matches the prefix
            return []
        out = []
        for p in found:
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(name_prefix) and name.endswith(suffix) and not name.startswith("."):
                out.append(f"{prefix.rstrip('/')}/{name}")
        return sorted(out)

    def sizes(self, prefix: str) -> dict[str, int]:
        """{relative path: bytes} of the files directly under `prefix`, from one listing."""
        return {rel: size for rel, (size, _) in self.stat(prefix).items()}

    def stat(self, prefix: str) -> dict[str, tuple[int, str | None]]:
        """{relative path: (bytes, crc32c)} of the files directly under `prefix`, from one listing;
        the crc32c is GCS's (free in its listing), None locally."""
        self.invalidate()
        base = self.path(prefix)
        if not self.fs.exists(base):
            return {}
        return {f"{prefix.rstrip('/')}/{e['name'].rstrip('/').rsplit('/', 1)[-1]}":
                (int(e.get("size") or 0), e.get("crc32c")) for e in self.fs.ls(base, detail=True)
                if e.get("type") == "file"}

    def invalidate(self) -> None:
        """Forget cached listings (another process may have written since)."""
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache()

    # -- writes (all atomic)
    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(target).name}.", suffix=f".{uuid.uuid4().hex[:6]}.tmp",
                                       dir=str(Path(target).parent))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            self._upload_checked({target: data})
        self.invalidate()

    def _upload_checked(self, files: dict[str, bytes], batch_size: int = 256) -> None:
        """Upload to GCS, then compare the crc32c GCS stored (in each upload's answer) with the
        bytes sent; the objects that differ are uploaded again under the retry policy (each is
        whole either way, only its bytes differ), and those still wrong at the end deleted."""
        pending = dict(files)

        def attempt(n: int) -> None:
            # chunksize above the largest object: one whole-object request each, which the policy
            # may retry (a chunk of a resumable upload may not be retried alone)
            chunk = max(map(len, pending.values())) + 1
            answers = ([self.fs.pipe_file(*next(iter(pending.items())), chunksize=chunk)] if len(pending) == 1
                       else self.fs.pipe(pending, batch_size=batch_size, chunksize=chunk))  # in order
            for (p, data), out in list(zip(pending.items(), answers)):
                if out.get("crc32c") in (None, crc32c(data)):
                    del pending[p]
            if pending:
                which = "" if len(files) == 1 else (
                    f"{self.fs.unstrip_protocol(next(iter(pending)))} (and {len(pending) - 1} more) ")
                raise TransferError(f"{which}stored with a crc32c other than the bytes sent")

        try:
            self.retry.run(attempt, f"upload of {len(files)} objects" if len(files) > 1
                           else f"POST {self.fs.unstrip_protocol(next(iter(files)))}",
                           retry_if=lambda exc: isinstance(exc, TransferError))
        except IntegrityError as exc:
            self.fs.rm(list(pending))  # wrong bytes under a final name would be trusted; none is safer
            raise IntegrityError(f"{exc}; deleted: the transfer corrupts data, check the network") from exc

    def write_many(self, files: dict[str, bytes], batch_size: int = 256) -> None:
        """Write many small files; on GCS in one concurrent batch (each object still appears whole)."""
        if self.is_local:
            for rel, data in files.items():
                self.write_bytes(rel, data)
            return
        self._upload_checked({self.path(rel): data for rel, data in files.items()}, batch_size)
        self.invalidate()

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_config(self, rel_dir: str, cfg) -> None:
        """The resolved config next to the outputs it produced: `<rel_dir>/_config.yaml`."""
        text = cfg.to_yaml() if hasattr(cfg, "to_yaml") else yaml.safe_dump(cfg, sort_keys=False)
        self.write_text(f"{rel_dir.rstrip('/')}/_config.yaml", text)

    def upload_file(self, local_path: str | Path, rel: str) -> None:
        """Copy a local file to `rel` atomically (read into memory: shards are bounded)."""
        self.write_bytes(rel, Path(local_path).read_bytes())

    def delete(self, rel: str, recursive: bool = False) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)
        self.invalidate()

    def delete_many(self, rels: Iterable[str]) -> None:
        for r in rels:
            self.delete(r)
