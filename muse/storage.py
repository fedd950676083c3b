"""The storage root: the only module that talks to fsspec.

A root is a local folder (default) or `gs://bucket/prefix` (gcsfs). Everything the
pipeline writes goes through `Storage`, with paths relative to the root:

    images/00042.parquet            phase 1 shards (+ images/00042_stats.json; names: muse/layout.py)
    encoded/<version>/00042.parquet phase 2 shards (+ encoded/<version>/_MANIFEST.json)
    checkpoints/<run>/step-00000100/  training checkpoints (every name under the root: muse/layout.py)

Writes are atomic: bytes are built in memory and land with one `pipe_file` (GCS objects
appear only when the upload completes) or a temp file + `os.replace` locally. We never
use `with fs.open(p, "wb")`, which finalises a truncated object when the body raises.

Transfers of whole objects on GCS are checked with crc32c (what GCS itself computes and answers
with each upload and in every download's `X-Goog-Hash` header): `write_bytes`/`write_many`
compare the crc32c GCS stored with the bytes sent, `read_bytes` the bytes received with the
header; a mismatch is tried once more, then an `IntegrityError` naming the object. Ranged reads
(`open`: Parquet row groups) cannot be checked that way (the header is the whole object's): the
shards carry Parquet page checksums instead (muse/layout.py `PAGE_CHECKSUMS`).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

# gcsfs 2026.x probes hierarchical-namespace support on every bucket operation, which
# takes 40-80 s against an emulator; it must be switched off before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402

import yaml  # noqa: E402


class IntegrityError(OSError):
    """Bytes that differ from the object's crc32c on GCS, twice in a row; the message names it."""


def crc32c(data: bytes) -> str:
    """GCS's spelling of a CRC32C: base64 of its 4 big-endian bytes."""
    import google_crc32c

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def _goog_crc32c(headers) -> str | None:
    """The object's crc32c from a download's `X-Goog-Hash: crc32c=...,md5=...` (None if absent, or
    if the object is stored gzip-encoded: the hash is then of the stored bytes, not those served)."""
    if (headers.get("X-Goog-Stored-Content-Encoding") or "identity") != "identity":
        return None
    for part in (headers.get("X-Goog-Hash") or "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "crc32c":
            return value
    return None


def _make_fs(protocol: str, gcs_project: str | None):
    if protocol in ("gs", "gcs"):
        kwargs: dict[str, Any] = {}
        if gcs_project:
            kwargs["project"] = gcs_project
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:  # fake-gcs-server in tests and the demo: no credentials
            kwargs.setdefault("project", "test")
            kwargs["token"] = "anon"
            kwargs["endpoint_url"] = emulator if "://" in emulator else f"http://{emulator}"
        return fsspec.filesystem("gs", **kwargs)
    return fsspec.filesystem(protocol or "file")


def source_fs(uri: str, gcs_project: str | None = None):
    """(filesystem, path) for an arbitrary input URI (source URL lists outside the root)."""
    protocol, path = fsspec.core.split_protocol(uri)
    if not protocol or protocol in ("file", "local"):
        return _make_fs("file", None), str(Path(path).expanduser().resolve())
    return _make_fs(protocol, gcs_project), path


class Storage:
    """A storage root with atomic writes. Create one per process (gcsfs is not fork-safe)."""

    def __init__(self, root: str, gcs_project: str | None = None):
        self.uri = root.rstrip("/") or root
        self.gcs_project = gcs_project
        protocol, path = fsspec.core.split_protocol(self.uri)
        self.protocol = protocol or "file"
        self.is_local = self.protocol in ("file", "local")
        if self.is_local:
            path = str(Path(path).expanduser().resolve())
        self.root = path.rstrip("/")
        self.fs = _make_fs(self.protocol, gcs_project)

    @classmethod
    def from_config(cls, cfg) -> "Storage":
        """From a PipelineConfig (or its StorageConfig)."""
        s = getattr(cfg, "storage", cfg)
        return cls(s.root, s.gcs_project)

    def __getstate__(self):  # rebuild the filesystem in the receiving process
        return {"uri": self.uri, "gcs_project": self.gcs_project}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["gcs_project"])

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
        if self.is_local:
            return self.fs.cat_file(self.path(rel))
        for _ in range(2):  # crc32c checked (see the module docstring); once more on a mismatch
            headers, data = self.fs.call("GET", self.fs.url(self.path(rel)))
            stored = _goog_crc32c(headers)
            if stored is None or stored == crc32c(data):
                return data
        raise IntegrityError(f"{self.url(rel)}: read {len(data)} bytes twice with crc32c {crc32c(data)}, "
                             f"GCS says the object's is {stored}: the transfer corrupts data; check the network")

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
        """Upload to GCS, then compare the crc32c GCS stored (in each upload's answer; an object
        resource, or for a multi-chunk upload its URL: then asked for) with the bytes sent; a
        mismatch is uploaded once more (the object is whole either way, only its bytes differ), and
        after a second one deleted."""
        for _ in range(2):
            answers = ([self.fs.pipe_file(*next(iter(files.items())))] if len(files) == 1
                       else self.fs.pipe(files, batch_size=batch_size))  # answers in the order of `files`
            bad = {}
            for (p, data), out in zip(files.items(), answers):
                if not isinstance(out, dict):  # a multi-chunk upload: ask (past any cached listing)
                    self.fs.invalidate_cache(p)
                    out = self.fs.info(p)
                stored = out.get("crc32c")
                if stored is not None and stored != crc32c(data):
                    bad[p] = data
            if not bad:
                return
            files = bad
        self.fs.rm(list(bad))  # wrong bytes under a final name would be trusted; none is safer
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise IntegrityError(f"{self.fs.unstrip_protocol(next(iter(bad)))}{more}: stored twice with a crc32c other "
                             "than the bytes sent, so deleted: the transfer corrupts data; check the network")

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
