"""Download tasks of `download.shards_per_task` shards that write each shard as it finishes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muse.config import load_config
from muse.download import DownloadPart, plan_chunks, run_download
from muse.layout import IMAGES, done_marker, done_shards, shard_name
from muse.storage import Storage
from muse.testing.imageserver import ImageServer
from tests.test_download import SIZE, read_all, write_source


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        yield srv


def chunk_cfg(root, src, work, shards_per_task) -> dict:
    # one process: img2dataset does the shards in order; one thread: the /slow rows take
    # timeout_s each, in turn, so the run is busy for a while after the first shards are done
    return {"storage": {"root": str(root), "work_dir": str(work)}, "source": {"paths": [str(src)]},
            "download": {"image_size": SIZE, "processes": 1, "threads": 1, "shard_size": 2,
                         "timeout_s": 4, "retries": 0, "shards_per_task": shards_per_task}}


def test_parts_are_cut_into_chunks_on_shard_boundaries():
    part = DownloadPart("s.parquet", "fp", first_shard=7, num_shards=5, rows=45, shard_size=10)
    chunks = part.chunks(2)
    assert [c.shard_ids() for c in chunks] == [[7, 8], [9, 10], [11]]
    assert [c.row_range() for c in chunks] == [(0, 20), (20, 40), (40, 45)]
    assert [c.shard_ids() for c in part.chunks(16)] == [part.shard_ids()]


def test_plan_chunks_leaves_out_finished_chunks(server, tmp_path):
    src = write_source(tmp_path / "s.parquet", [(server.url("/404"), f"c{i}", None, 0) for i in range(7)])
    cfg = load_config(None, data=chunk_cfg(tmp_path / "root", src, tmp_path / "work", 2))
    assert [c.shard_ids() for c in plan_chunks(cfg)] == [[0, 1], [2, 3]]
    st = Storage(str(tmp_path / "root"))
    for sid in (0, 1, 2):  # pretend these are done: only chunk [2, 3] has work left
        st.write_bytes(shard_name(IMAGES, sid), b"")
        st.write_json(done_marker(IMAGES, sid), {"rows_in": 2, "bytes": 0})  # intact.py: size matches
    assert [c.shard_ids() for c in plan_chunks(cfg)] == [[2, 3]]


def test_a_plan_lists_images_once_whatever_the_number_of_chunks(tmp_path, monkeypatch):
    """plan_chunks reads the listing of images/ once (sizes, the done rule and the chunk filter
    share it), for 3 chunks as for 12; every chunk with an unfinished shard is planned."""
    from fsspec.implementations.local import LocalFileSystem

    ls, listed = LocalFileSystem.ls, {}
    for chunks in (3, 12):
        root = tmp_path / f"root{chunks}"
        src = write_source(tmp_path / f"s{chunks}.parquet",
                           [(f"http://127.0.0.1:9/{i}.jpg", f"c{i}", None, 0) for i in range(2 * chunks)])
        cfg = load_config(None, data=chunk_cfg(root, src, tmp_path / "work", 1))  # 1 shard of 2 rows per chunk
        plan_chunks(cfg)  # registers the file
        st = Storage(str(root))
        for sid in range(0, chunks, 3):  # every third shard done (its size matches its stats)
            st.write_bytes(shard_name(IMAGES, sid), b"")
            st.write_json(done_marker(IMAGES, sid), {"rows_in": 2, "bytes": 0})
        calls = []
        monkeypatch.setattr(LocalFileSystem, "ls", lambda fs, path, *a, _calls=calls, **k:
                            _calls.append(path) or ls(fs, path, *a, **k))
        planned = [c.shard_ids() for c in plan_chunks(cfg)]
        monkeypatch.undo()
        assert planned == [[s] for s in range(chunks) if s % 3], planned
        listed[chunks] = sum(p.rstrip("/").endswith("/images") for p in calls)
    assert listed[3] == listed[12] == 1, listed


def _img2dataset_alive(work: Path) -> bool:
    for f in work.glob("*/img2dataset.pgid"):
        try:
            if b"img2dataset" in Path(f"/proc/{int(f.read_text())}/cmdline").read_bytes():
                return True
        except (OSError, ValueError):
            pass
    return False


@pytest.mark.slow
def test_shards_land_as_they_finish_and_a_killed_chunk_loses_only_unfinished_ones(server, tmp_path):
    # shards of 2 rows: 0 and 1 are quick, 2 waits on /slow (timeout_s each, in turn), 3 is quick
    paths = ["/img/10.jpg", "/img/11.jpg", "/img/12.jpg", "/img/13.jpg",
             "/img/14.jpg", "/slow", "/img/16.jpg", "/img/17.jpg"]
    src = write_source(tmp_path / "s.parquet", [(server.url(p), f"c{i}", None, 0) for i, p in enumerate(paths)])
    run_download(load_config(None, data=chunk_cfg(tmp_path / "ref", src, tmp_path / "w0", 16)))
    ref = read_all(tmp_path / "ref")

    # chunks [0, 1, 2] and [3]; killed while img2dataset is still on shard 2
    root, work = tmp_path / "root", tmp_path / "work"
    code = ("import json; from muse.config import load_config; from muse.download import run_download; "
            f"run_download(load_config(None, data=json.loads({json.dumps(chunk_cfg(root, src, work, 3))!r})))")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(done_shards(Storage(str(root)), IMAGES)) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "the download ended before shards 0 and 1 reached the root"
            time.sleep(0.05)
        # shards 0 and 1 are in the storage root while their chunk's img2dataset run goes on
        assert done_shards(Storage(str(root)), IMAGES) == [0, 1]
        assert _img2dataset_alive(work), "img2dataset finished before the first shards were written"
        assert not list(work.glob("*/out/*.parquet")) or \
            {p.name for p in work.glob("*/out/*.parquet")} <= {"00002.parquet"}  # local copies deleted
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # our process and img2dataset's
        proc.wait()
    assert done_shards(Storage(str(root)), IMAGES) == [0, 1]

    server.requests.clear()
    run_download(load_config(None, data=chunk_cfg(root, src, work, 3)))
    assert sorted(server.requests) == sorted(paths[4:])  # only shards 2 and 3 were fetched again
    assert read_all(root).equals(ref)  # same bytes as one uninterrupted single-chunk run
