"""A fault-injecting HTTP proxy in front of fake-gcs-server: what real GCS does under load.

fake-gcs-server never fails; real GCS answers 429 and 503 (sometimes with `Retry-After`), resets
connections, stalls reads and, behind a broken middlebox, delivers fewer bytes than it promised.
`GCSFaultProxy` sits on 127.0.0.1 between gcsfs and the emulator and, by a seeded schedule,
injects those faults into a fraction (`rate`) of the requests of each kind:

    with GCSFaultProxy(gcs_emulator.url, rate=0.05, seed=1) as proxy:   # sets STORAGE_EMULATOR_HOST
        ...                                                            # pipeline code on gs://
        proxy.counts()   # {"read": 120, "list": 14, ...}: requests per kind, faulted ones included

Faults (`FAULTS`): "429", "503", "429-retry-after", "503-retry-after" (answered by the proxy, the
request never reaches the emulator), "reset" (the emulator's answer starts, then the connection is
cut mid-body; an upload or a delete has then happened although the client saw an error), "stall"
(the answer's body waits `stall_s`, longer than the client's read timeout, then the connection is
cut), "truncate" (a consistent but short answer: `Content-Length` says fewer bytes than
`Content-Range` asked for; only a client that counts the bytes notices) and "flip" (one byte of the
answer's body changed, same length: only a checksum notices; on an upload, the middle byte of what
the emulator receives and stores, a data byte when the data outweighs the upload's metadata part). Which faults a kind may get is `menu`;
`always` adds permanent faults for objects whose name contains a string.

The schedule is a pure function of (seed, kind, n-th request of that kind), so a rerun with the
same seed faults the same requests of each kind. Threaded, stdlib only; bodies are streamed in
64 KiB pieces both ways, so a shard of hundreds of MB never sits in the proxy's memory.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import struct
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

FAULTS = ("429", "503", "429-retry-after", "503-retry-after", "reset", "stall", "truncate", "flip")
KINDS = ("list", "read", "info", "upload", "compose", "delete", "other")
# What each kind of request can meet. "truncate" and "flip" only on object reads: a listing or an
# upload answer cut short with a consistent Content-Length is a JSON error, not something GCS does
# (its broken answers are cut connections, which "reset" covers).
MENU = {
    "read": FAULTS,
    "list": ("429", "503", "429-retry-after", "503-retry-after", "reset", "stall"),
    "info": ("429", "503", "503-retry-after", "reset", "stall"),
    "upload": ("429", "503", "503-retry-after", "reset", "stall"),
    "compose": ("429", "503", "reset"),
    "delete": ("429", "503", "reset"),
    "other": (),
}
CHUNK = 64 * 1024


def request_kind(method: str, url: str) -> str:
    """The kind of a GCS JSON API request, from its method and URL."""
    parts = urlsplit(url)
    path, query = parts.path, parse_qs(parts.query)
    if method == "POST" and path.startswith("/upload/"):
        return "upload"
    if method == "POST" and path.endswith("/compose"):
        return "compose"
    if method == "DELETE" and "/o/" in path:
        return "delete"
    if method in ("GET", "HEAD"):
        if path.startswith("/download/") or query.get("alt") == ["media"]:
            return "read"
        if path.rstrip("/").endswith("/o"):
            return "list"
        if "/o/" in path:
            return "info"
    return "other"


def object_name(url: str, body: bytes | None = None) -> str:
    """`bucket/object` (or `bucket/prefix` of a listing) a request is about, for `always` rules;
    a multipart upload names its object in the body's metadata part."""
    parts = urlsplit(url)
    bucket, _, obj = parts.path.partition("/b/")[2].partition("/o")
    obj = unquote(obj.lstrip("/").removesuffix("/compose"))
    query = parse_qs(parts.query)
    if not obj:
        obj = query.get("prefix", [""])[0] or query.get("name", [""])[0]
    if not obj and body:
        found = re.search(rb'"name": *"([^"]*)"', body[:4096])
        obj = found.group(1).decode() if found else ""
    return f"{bucket}/{obj}"


class GCSFaultProxy:
    """A threaded proxy on 127.0.0.1 in front of `upstream` (fake-gcs-server's URL) that faults
    `rate` of the requests of each kind, as the seeded schedule says (module docstring)."""

    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, menu: dict | None = None,
                 retry_after_s: float = 1.0, stall_s: float = 5.0, set_env: bool = True):
        self.upstream = urlsplit(upstream)
        self.rate, self.seed = rate, seed
        self.menu = dict(MENU if menu is None else menu)
        self.retry_after_s, self.stall_s = retry_after_s, stall_s
        self.always: list[list] = []  # [kind, substring of the object name, fault, times left or None]
        self._lock = threading.Lock()
        self._seen: Counter = Counter()   # requests per kind (the schedule's n)
        self._faults: Counter = Counter()  # (kind, fault) injected
        self._stop = threading.Event()
        self._set_env, self._old_env = set_env, None
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- the schedule
    def fail_always(self, name_contains: str, fault: str = "503", kind: str = "read",
                    times: int | None = None) -> None:
        """Every `kind` request about an object whose name contains `name_contains` gets `fault`
        (only the next `times` of them when given): a permanent fault, or a few in a row."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}: one of {FAULTS}")
        with self._lock:
            self.always.append([kind, name_contains, fault, times])

    def decide(self, kind: str, name: str) -> str | None:
        """The fault for the next request of `kind` about `name`, or None; counts the request."""
        with self._lock:
            n = self._seen[kind]
            self._seen[kind] += 1
            fault = None
            for rule in self.always:
                if rule[0] == kind and rule[1] in name and rule[3] != 0:
                    fault, rule[3] = rule[2], (None if rule[3] is None else rule[3] - 1)
                    break
            if fault is None:
                fault = self.planned(kind, n)
            if fault is not None:
                self._faults[(kind, fault)] += 1
            return fault

    def planned(self, kind: str, n: int, seed: int | None = None) -> str | None:
        """The schedule's fault for the `n`-th request of `kind` (0-based) under `seed` (default
        the proxy's), at the proxy's rate and menu, or None; counts nothing (a test picks with it
        a seed whose faults meet the requests a run makes)."""
        menu = self.menu.get(kind, ())
        if not menu or self.rate <= 0:
            return None
        seed = self.seed if seed is None else seed
        h = hashlib.blake2b(f"{seed}:{kind}:{n}".encode(), digest_size=16).digest()
        u, pick = struct.unpack("<QQ", h)
        return menu[pick % len(menu)] if u / 2**64 < self.rate else None

    def counts(self) -> dict[str, int]:
        """Requests seen per kind since the start (or `reset_counts`), faulted ones included."""
        with self._lock:
            return dict(self._seen)

    def faults(self) -> dict[tuple[str, str], int]:
        """Faults injected per (kind, fault)."""
        with self._lock:
            return dict(self._faults)

    def reset_counts(self) -> None:
        with self._lock:
            self._seen.clear()
            self._faults.clear()

    # -- lifecycle
    def start(self) -> "GCSFaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="gcs-fault-proxy", daemon=True)
        self._thread.start()
        if self._set_env:  # gcsfs instances made from now on go through the proxy
            self._old_env = os.environ.get("STORAGE_EMULATOR_HOST")
            os.environ["STORAGE_EMULATOR_HOST"] = self.url
        return self

    def stop(self) -> None:
        self._stop.set()  # ends stalls now, not after stall_s
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()
        if self._set_env:
            if self._old_env is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = self._old_env

    def __enter__(self) -> "GCSFaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away (a reset, a
            return                                          # closed file): no traceback on stderr
        super().handle_error(request, client_address)


def _handler(proxy: GCSFaultProxy):
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gcsfs (aiohttp) expects
    proxy: GCSFaultProxy

    def log_message(self, *args) -> None:  # quiet: tests read counts, not logs
        pass

    def do_GET(self):
        self._proxy()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _proxy(self) -> None:
        kind = request_kind(self.command, self.path)
        body = self._request_body()
        fault = self.proxy.decide(kind, object_name(self.path, body))
        if fault == "flip" and kind == "upload" and body:  # GCS stores what it received
            i = len(body) // 2
            body = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:]
            fault = None
        if fault in ("429", "503", "429-retry-after", "503-retry-after"):
            return self._refuse(int(fault[:3]), fault.endswith("retry-after"))
        up = self.proxy.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            self._answer(resp, fault)
        except (BrokenPipeError, ConnectionResetError):  # the client went away: nothing to answer
            self.close_connection = True
        finally:
            conn.close()

    def _request_body(self) -> bytes | None:
        """The request's body (uploads are bounded by the client's memory already)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                out += self.rfile.read(size) if size else b""
                self.rfile.readline()
                if not size:
                    return bytes(out)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _refuse(self, status: int, retry_after: bool) -> None:
        body = json.dumps({"error": {"code": status, "message": "injected by GCSFaultProxy"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after:
            self.send_header("Retry-After", f"{self.proxy.retry_after_s:g}")
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, resp: http.client.HTTPResponse, fault: str | None) -> None:
        """Stream the emulator's answer back, with `fault` (reset, stall, truncate, flip) applied."""
        length = resp.getheader("Content-Length")
        body = None if length is not None else resp.read()  # chunked answers (small JSON): whole
        length = int(length) if length is not None else len(body)
        if fault == "reset" and length < 2:  # no body to cut in: the answer never arrives at all
            return self._cut()
        send_length = max(length // 2, 0) if fault == "truncate" and length else length
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("content-length", "transfer-encoding", "connection", "date", "server"):
                continue
            if k.lower() == "location":
                v = v.replace(f"{self.proxy.upstream.scheme}://{self.proxy.upstream.netloc}", self.proxy.url)
            self.send_header(k, v)
        self.send_header("Content-Length", str(send_length))
        self.end_headers()
        if fault == "stall":  # longer than the client's read timeout, then gone
            self.proxy._stop.wait(self.proxy.stall_s)
            return self._cut()
        cut_at = length // 2 if fault == "reset" else None
        sent = 0
        while sent < send_length:
            piece = body[sent:sent + CHUNK] if body is not None else resp.read(min(CHUNK, length - sent))
            if not piece:
                break
            piece = piece[:send_length - sent]
            if fault == "flip" and sent <= send_length // 2 < sent + len(piece):
                i = send_length // 2 - sent
                piece = piece[:i] + bytes([piece[i] ^ 0x01]) + piece[i + 1:]
            if cut_at is not None and sent + len(piece) > cut_at:
                self.wfile.write(piece[:cut_at - sent])
                return self._cut()
            self.wfile.write(piece)
            sent += len(piece)

    def _cut(self) -> None:
        """Reset the connection (RST, not a clean FIN): what a dropped connection looks like."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
