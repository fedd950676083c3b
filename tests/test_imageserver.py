"""The one image server of the tests, the benches and the demo: a folder's files, or generated routes."""

import urllib.error
import urllib.request

from muse.testing.imageserver import ImageServer


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_folder_mode_serves_only_the_folders_files(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "00001.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "secret.txt").write_text("outside the folder")
    with ImageServer(tmp_path / "pics") as srv:
        assert _get(srv.url("/00001.png")) == (200, b"\x89PNG fake")
        assert _get(srv.url("/missing.jpg"))[0] == 404           # the demo's failing row
        assert _get(srv.url("/../secret.txt"))[0] == 404
        assert _get(srv.url("/img/1.jpg"))[0] == 404              # no generated routes in folder mode
        assert srv.requests[0] == "/00001.png"


def test_generated_routes_and_a_busy_port_falls_back(tmp_path):
    with ImageServer() as first:
        status, body = _get(first.url("/img/3.jpg"))
        assert status == 200 and body[:2] == b"\xff\xd8"          # a JPEG
        assert _get(first.url("/404"))[0] == 404
        with ImageServer(tmp_path, port=first.port) as second:    # the demo's fixed port, taken
            assert second.port != first.port
            assert second.url() == f"http://127.0.0.1:{second.port}"
