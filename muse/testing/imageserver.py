"""A real HTTP server on 127.0.0.1 for the download tests, `bench/download.py` and the demo.

`ImageServer(folder)` serves the files of `folder` (the demo's pictures; anything else is a
404). `ImageServer()` serves generated images and failure routes instead:
    /img/<n>.jpg        a deterministic RGB JPEG (gradient + pattern seeded by n)
    /png/<n>.png        the same picture as PNG
    /gray/<n>.png       a grayscale PNG
    /png16/<n>.png      a 16-bit grayscale PNG (img2dataset decodes it pure white)
    /huge/<n>.jpg       a 3000x2000 JPEG
    /redirect/<n>.jpg   302 -> /img/<n>.jpg
    /404, /500          error statuses
    /status/<code>      that HTTP status (429, 503, 410, ...)
    /noai/<n>.jpg       /img/<n>.jpg with `X-Robots-Tag: noai` (img2dataset refuses it)
    /tiny/<n>.jpg       a 16x16 JPEG; /wide/<n>.jpg a 320x40 one (min size / aspect ratio)
    /short.jpg          a Content-Length longer than the body sent (a cut transfer)
    /hangup             the connection closed without a response
    /reset              the connection reset (RST) without a response
    /html               200 with an HTML body
    /truncated.jpg      the first half of a JPEG
    /slow               sleeps longer than any test timeout before answering
    /flaky/<n>.jpg      fails while the server's `flaky` switch is set (a status such as 503, or
                        "timeout": answers after SLOW_SECONDS), else /img/<n>.jpg: a transient
                        failure in one run that a later run recovers (the retry pass's tests)
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import mimetypes
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

SLOW_SECONDS = 10.0


@lru_cache(maxsize=256)
def source_image(n: int, w: int = 320, h: int = 240) -> Image.Image:
    """A deterministic, non-uniform RGB picture (so resizing is observable)."""
    # open grids in float32: the 3000x2000 picture is built in under 1 s, not ~2.5 s (full float64
    # grids), which is past the download tests' 2 s socket timeout on a busy machine
    yy, xx = (a.astype(np.float32) for a in np.ogrid[0:h, 0:w])
    # smooth ramps and a soft wave (hard edges would make JPEG error dominate the checks)
    r = xx * 180 / max(w - 1, 1) + (37 * n) % 60
    g = yy * 180 / max(h - 1, 1) + (91 * n) % 60
    b = 120 + 100 * np.sin(xx / w * 6.28 + n) * np.cos(yy / h * 3.14)
    r, g, b = np.broadcast_arrays(r, g, b)
    return Image.fromarray(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@lru_cache(maxsize=512)
def body_for(path: str) -> tuple[int, str, bytes, dict]:
    """(status, content type, body, extra headers) for a route."""
    name = path.rsplit("/", 1)[-1]
    num = int(name.split(".")[0]) if name.split(".")[0].isdigit() else 0
    if path.startswith("/img/"):
        return 200, "image/jpeg", encode(source_image(num), "JPEG", quality=95), {}
    if path.startswith("/png/"):
        return 200, "image/png", encode(source_image(num), "PNG"), {}
    if path.startswith("/gray/"):
        return 200, "image/png", encode(source_image(num).convert("L"), "PNG"), {}
    if path.startswith("/png16/"):
        arr = (np.asarray(source_image(num).convert("L"), dtype=np.uint16) * 257)
        return 200, "image/png", encode(Image.fromarray(arr.astype(np.uint16)), "PNG"), {}
    if path.startswith("/huge/"):
        return 200, "image/jpeg", encode(source_image(num, 3000, 2000), "JPEG", quality=90), {}
    if path.startswith("/redirect/"):
        return 302, "text/plain", b"", {"Location": f"/img/{name}"}
    if path.startswith("/noai/"):
        return 200, "image/jpeg", encode(source_image(num), "JPEG", quality=95), {"X-Robots-Tag": "noai"}
    if path.startswith("/tiny/"):
        return 200, "image/jpeg", encode(source_image(num, 16, 16), "JPEG", quality=95), {}
    if path.startswith("/wide/"):
        return 200, "image/jpeg", encode(source_image(num, 320, 40), "JPEG", quality=95), {}
    if path.startswith("/status/") and name.isdigit():
        return int(name), "text/plain", b"status on demand", {}
    if path == "/short.jpg":
        data = encode(source_image(8), "JPEG", quality=95)
        return 200, "image/jpeg", data[: len(data) // 2], {"Content-Length": str(len(data))}
    if path == "/404":
        return 404, "text/plain", b"not found", {}
    if path == "/500":
        return 500, "text/plain", b"boom", {}
    if path == "/html":
        return 200, "text/html", b"<html><body>not an image</body></html>", {}
    if path == "/truncated.jpg":
        data = encode(source_image(7), "JPEG", quality=95)
        return 200, "image/jpeg", data[: len(data) // 2], {}
    return 404, "text/plain", b"no such route", {}


def file_for(folder: Path, path: str) -> tuple[int, str, bytes, dict]:
    """(status, content type, body, extra headers) for a file directly inside `folder`."""
    name = path.lstrip("/")
    file = folder / name
    if not name or "/" in name or name.startswith(".") or not file.is_file():
        return 404, "text/plain", b"not found", {}
    return 200, mimetypes.guess_type(name)[0] or "application/octet-stream", file.read_bytes(), {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        self.server.requests.append(path)  # tests check what was (not) fetched
        folder = self.server.folder
        if folder is None and path == "/slow":
            time.sleep(SLOW_SECONDS)  # longer than the client's socket timeout
            path = "/img/1.jpg"
        if folder is None and path.startswith("/flaky/"):
            path = self._flaky(path)
        if folder is None and path in ("/hangup", "/reset"):
            if path == "/reset":  # linger 0 and a close now (before the server's FIN): an RST
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()  # its reference would keep the socket open past close()
                self.connection.close()
            self.close_connection = True
            return
        try:
            status, ctype, body, headers = body_for(path) if folder is None else file_for(folder, path)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if "Content-Length" not in headers:  # /short.jpg announces more than it sends
                self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)

    def _flaky(self, path: str) -> str:
        """The route a /flaky/ request is answered from, given the server's switch now."""
        mode = self.server.flaky
        if mode == "timeout":
            time.sleep(SLOW_SECONDS)  # the client gave up long before: its row is a timeout
        elif mode is not None:
            return f"/status/{int(mode)}"
        return "/img/" + path.rsplit("/", 1)[-1]

    def log_message(self, *args):  # keep test output quiet
        pass


class ImageServer:
    """`with ImageServer() as srv: srv.url("/img/3.jpg")`; `srv.url()` is the base URL.

    `port` 0 takes a free port; another port is tried first and a free one taken if it is busy
    (the demo asks for a fixed one so its URL list, and so its download, stays the same)."""

    def __init__(self, folder: str | Path | None = None, port: int = 0):
        try:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        except OSError:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.requests = []
        self.httpd.folder = None if folder is None else Path(folder)
        self.httpd.flaky = None  # what /flaky/ answers: None serves the picture (see the module docstring)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def flaky(self) -> str | int | None:
        """/flaky/ routes fail with this status (503, 429, ...) or "timeout"; None: they succeed."""
        return self.httpd.flaky

    @flaky.setter
    def flaky(self, mode: str | int | None) -> None:
        self.httpd.flaky = mode

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def render(self, urls) -> None:
        """Build the bodies of these URLs now, so each request is answered at once: rendered on
        demand, the 3000x2000 JPEG took longer than the tests' socket timeout on a busy CI machine
        and the row came back `timeout` instead of `success`."""
        prefix = self.url()
        for url in urls:
            if self.httpd.folder is None and url and url.startswith(prefix):
                path = url[len(prefix):].split("?", 1)[0]
                body_for("/img/" + path.rsplit("/", 1)[-1] if path.startswith("/flaky/") else path)

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def refused_url() -> str:
    """A URL on a port nobody listens on (bound then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/img/1.jpg"
