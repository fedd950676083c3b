"""Retryable or final: every replacement reason, produced by real img2dataset where it can be.

One download (img2dataset, multiprocessing) of the image server's failure routes writes the
reasons as they end up in our shards; each is then classified by muse.download.reasons.
"""

import io
import re
import socket
import urllib.error
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse.config import load_config
from muse.download import run_download
from muse.download.reasons import REASONS, is_retryable
from muse.download.writer import reason_of
from muse.layout import IMAGES, done_shards
from muse.storage import Storage
from muse.testing.imageserver import ImageServer, refused_url

DOCS = Path(__file__).resolve().parents[1] / "docs" / "download.md"

# written independently of the module's table, so flipping an entry there fails here
RETRYABLE = {"timeout", "http_429", "http_408", "http_5xx", "connection_refused", "connection_reset",
             "connection_closed", "incomplete_read", "unreachable", "dns_temporary", "deadline"}
FINAL = {"http_404", "http_410", "http_403", "dns", "ssl", "redirect", "disallowed", "bad_url", "too_small",
         "aspect_ratio", "decode_error", "blank_image", "resize_error", "download_error", "filtered"}

# route on the image server (or a whole URL) -> the reason our shard must record
ROUTES = {
    "/slow": "timeout", "/status/429": "http_429", "/status/408": "http_408", "/500": "http_5xx",
    "/status/503": "http_5xx", "refused": "connection_refused", "/reset": "connection_reset",
    "/hangup": "connection_closed", "/short.jpg": "incomplete_read", "/404": "http_404",
    "/status/410": "http_410", "/status/403": "http_403", "/status/401": "http_401", "https": "ssl",
    "/noai/1.jpg": "disallowed", "file:///etc/hostname": "bad_url", "/tiny/1.jpg": "too_small",
    "/wide/2.jpg": "aspect_ratio", "/html": "decode_error", "/truncated.jpg": "decode_error",
    "/png16/3.png": "blank_image", "nonnumeric port": "bad_url", "http://[::1/img/1.jpg": "bad_url",
}


def _url(srv, route: str) -> str:
    if route == "refused":
        return refused_url()
    if route == "https":  # TLS to a plain-HTTP port: the handshake fails
        return f"https://127.0.0.1:{srv.port}/img/1.jpg"
    if route == "nonnumeric port":
        return "http://127.0.0.1:port/img/1.jpg"
    return route if "://" in route else srv.url(route)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, str]:
    """{route: the reason column of its row} after one real download of every route."""
    tmp = tmp_path_factory.mktemp("reasons")
    with ImageServer() as srv:
        urls = [_url(srv, r) for r in ROUTES]
        srv.render(urls)
        pq.write_table(pa.table({"URL": urls, "TEXT": list(ROUTES)}), tmp / "s.parquet")
        cfg = load_config(None, data={
            "storage": {"root": str(tmp / "root"), "work_dir": str(tmp / "work")},
            "source": {"paths": [str(tmp / "s.parquet")]},
            "download": {"image_size": 32, "processes": 1, "threads": 8, "shard_size": 32, "timeout_s": 2,
                         "retries": 0, "min_image_size": 32, "max_aspect_ratio": 3}})
        run_download(cfg)
    st = Storage(str(tmp / "root"))
    out = pa.concat_tables([pq.read_table(io.BytesIO(st.read_bytes(f"images/{sid:05d}.parquet")))
                            for sid in done_shards(st, IMAGES)])
    assert out.column("replaced").to_pylist() == [True] * len(ROUTES)
    return dict(zip(out.column("caption").to_pylist(), out.column("reason").to_pylist()))


@pytest.mark.parametrize("route", list(ROUTES))
def test_img2dataset_failure_gets_its_reason(written, route):
    reason = written[route]
    assert reason == ROUTES[route]
    assert is_retryable(reason) == (reason in RETRYABLE)


@pytest.mark.parametrize("reason", sorted(RETRYABLE | FINAL))
def test_each_reason_is_classified(reason):
    assert reason in REASONS
    assert is_retryable(reason) == (reason in RETRYABLE)


def test_the_table_holds_nothing_else():
    assert set(REASONS) == RETRYABLE | FINAL


@pytest.mark.parametrize("reason", ["http_401", "http_451", "http_301", "something_new", "", None])
def test_other_http_codes_and_unknown_reasons_are_final(reason):
    assert not is_retryable(reason)


# resolver answers that cannot be produced on demand on every machine: urllib's message for
# glibc's EAI_AGAIN / EAI_NONAME and for ENETUNREACH, built the way urllib builds it
@pytest.mark.parametrize("err, reason", [
    (socket.gaierror(-3, "Temporary failure in name resolution"), "dns_temporary"),
    (socket.gaierror(-2, "Name or service not known"), "dns"),
    (OSError(101, "Network is unreachable"), "unreachable"),
    (OSError(113, "No route to host"), "unreachable"),
])
def test_resolver_and_route_messages(err, reason):
    assert reason_of("failed_to_download", str(urllib.error.URLError(err))) == reason


def test_docs_table_matches_the_code():
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| (retryable|final) \|", DOCS.read_text(), re.M)
    assert {r: c == "retryable" for r, c in rows} == {r: v[0] for r, v in REASONS.items()}
