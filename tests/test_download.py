"""Phase 1 end to end against a real HTTP server on 127.0.0.1 and the GCS emulator."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from muse.config import load_config
from muse.download import (REGISTRY, DownloadError, SourceError, download_part, plan_download, plan_run, run_download,
                           run_rows, summarize_run)
from muse.download.runner import verify_shard
from muse.download.sources import read_source
from muse.layout import IMAGES, done_shards
from muse.placeholders import color_of, solid_color
from muse.storage import Storage
from muse.testing.imageserver import ImageServer, refused_url, source_image

SIZE = 32
TIMEOUT_S = 4  # the socket timeout; /slow answers after SLOW_SECONDS, well past it
LONG_CAPTION = "a very long caption " * 500


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        yield srv


def cases(srv) -> list[tuple]:
    """(url, caption, expected reason or None for success, source image index)."""
    rows = [
        (srv.url("/img/1.jpg"), "a red fox", None, 1),
        (srv.url("/png/2.png"), "ünïcödé 字幕 🦊", None, 2),
        (srv.url("/gray/3.png"), "", None, 3),
        (srv.url("/redirect/4.jpg"), None, None, 4),
        (srv.url("/huge/5.jpg"), LONG_CAPTION, None, 5),
        (srv.url("/img/6.jpg?q=fuchs-ü"), "non-ascii url", None, 6),
        (srv.url("/404"), "missing", "http_404", None),
        (srv.url("/500"), "server error", "http_5xx", None),
        (refused_url(), "refused", "connection_refused", None),
        (srv.url("/slow"), "slow", "timeout", None),
        (srv.url("/html"), "html", "decode_error", None),
        (srv.url("/truncated.jpg"), "truncated", "decode_error", None),
        (srv.url("/png16/7.png"), "sixteen bit", "blank_image", None),
        ("", "empty url", "bad_url", None),
        (None, "null url", "bad_url", None),
        ("file:///etc/hostname", "file url", "bad_url", None),
        ("data:image/png;base64,AAAA", "data url", "bad_url", None),
    ]
    srv.render(r[0] for r in rows)
    return rows


def write_source(path: Path, rows: list[tuple], start_id: int = 0) -> Path:
    table = pa.table({"URL": pa.array([r[0] for r in rows], pa.string()),
                      "TEXT": pa.array([r[1] for r in rows], pa.string()),
                      "SAMPLE_ID": pa.array(range(start_id, start_id + len(rows)), pa.int64()),
                      "similarity": pa.array([0.5] * len(rows), pa.float32())})
    pq.write_table(table, path)
    return path


def make_cfg(root, paths, tmp_path, **download):
    dl = {"image_size": SIZE, "processes": 1, "threads": 4, "shard_size": 8, "timeout_s": TIMEOUT_S,
          "retries": 0, **download}
    return load_config(None, data={"storage": {"root": str(root), "work_dir": str(tmp_path / "work")},
                                   "source": {"paths": [str(p) for p in paths]}, "download": dl})


def read_all(root) -> pa.Table:
    st = Storage(str(root))
    return pa.concat_tables([pq.read_table(io.BytesIO(st.read_bytes(f"images/{sid:05d}.parquet")))
                             for sid in done_shards(st, IMAGES)])


def decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


def plain_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """What a user would do with PIL: shorter side to `size`, then centre crop."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BOX)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """One uninterrupted local download of every case: the output other runs must match."""
    tmp = tmp_path_factory.mktemp("ref")
    rows = cases(server)
    src = write_source(tmp / "part-0.parquet", rows)
    summary = run_download(make_cfg(tmp / "root", [src], tmp))
    return rows, src, summary, read_all(tmp / "root")


def test_every_row_present_and_replaced_correctly(reference):
    rows, _, summary, out = reference
    assert out.num_rows == len(rows) == summary["rows_in"]
    assert len(set(out["key"].to_pylist())) == len(rows)
    assert out["SAMPLE_ID"].to_pylist() == list(range(len(rows)))  # order + carried column
    assert out["similarity"].type == pa.float32()
    for (url, caption, reason, n), rec in zip(rows, out.to_pylist()):
        img = decode(rec["image"])
        assert img.shape == (SIZE, SIZE, 3), (url, img.shape)
        assert (rec["width"], rec["height"]) == (SIZE, SIZE)
        assert rec["caption"] == (caption if caption is not None else "")
        assert rec["caption_was_null"] == (caption is None)
        assert rec["url"] == (url or "")
        if reason is None:
            assert not rec["replaced"] and rec["status"] == "success", rec["error_message"]
            continue
        assert rec["replaced"] and rec["reason"] == reason, (url, rec["reason"], rec["error_message"])
        assert rec["status"] != "success" and rec["error_message"]
        # a single colour, the one seeded by the key (JPEG of a flat image is exact +-1)
        assert np.abs(img.astype(int) - np.array(color_of(rec["key"]))).max() <= 2
    expected = {}
    for r in rows:
        if r[2]:
            expected[r[2]] = expected.get(r[2], 0) + 1
    assert summary["replaced_by_reason"] == expected
    assert summary["succeeded"] == sum(r[2] is None for r in rows)


def test_successes_match_a_plain_resize(reference):
    rows, _, _, out = reference
    for (url, _, reason, n), rec in zip(rows, out.to_pylist()):
        if reason is not None:
            continue
        src = source_image(n, 3000, 2000) if "/huge/" in url else source_image(n)
        if "/gray/" in url:
            src = src.convert("L").convert("RGB")
        got = decode(rec["image"]).astype(np.float32)
        diff = np.abs(got - plain_center_crop(src, SIZE)).mean()
        assert diff < 8, (url, diff)
        if "/gray/" in url:  # kept, and converted to 3 equal channels
            assert np.abs(got[..., 0] - got[..., 1]).max() <= 2


def test_stats_registry_and_config_written(reference, tmp_path):
    rows, src, summary, _ = reference
    root = Path(src).parent / "root"
    st = Storage(str(root))
    stats = [st.read_json(f"images/{s:05d}_stats.json") for s in summary["shards"]]
    assert sum(s["rows_in"] for s in stats) == len(rows)
    reg = st.read_json(REGISTRY)
    entry = reg["sources"][str(src)]
    assert (entry["first_shard"], entry["num_shards"], entry["rows"]) == (0, 3, len(rows))
    assert "image_size: 32" in st.read_bytes("images/_config.yaml").decode()
    assert plan_download(make_cfg(root, [src], tmp_path)) == []  # complete: nothing to do
    plan = plan_run(make_cfg(root, [src], tmp_path))    # what a refresh says then (issue 30, item 5)
    assert (plan.chunks, plan.files, plan.unchanged) == ([], 1, 1)
    assert plan.note() == "nothing new: 1 source file unchanged"
    cfg = make_cfg(root, [src], tmp_path)
    run = summarize_run(cfg, stats[1:])  # a run that wrote the last two shards, beside the totals
    assert run["shards"] == [1, 2] and run["rows_in"] == sum(s["rows_in"] for s in stats[1:])
    table = {r["what"]: r for r in run_rows(run, summary)}
    assert (table["shards"]["this run"], table["shards"]["dataset"]) == (2, 3)
    assert (table["rows in"]["this run"], table["rows in"]["dataset"]) == (run["rows_in"], len(rows))
    nothing = {r["what"]: r for r in run_rows(summarize_run(cfg, []), summary)}
    assert {r["this run"] for r in nothing.values()} == {0} and nothing["rows in"]["dataset"] == len(rows)


@pytest.mark.slow
def test_same_download_to_gcs_is_identical(reference, gcs_root, tmp_path):
    rows, src, _, ref = reference
    st = Storage(gcs_root)
    st.upload_file(src, "sources/part-0.parquet")  # the URL list is remote too
    remote_src = st.url("sources/part-0.parquet")
    summary = run_download(make_cfg(gcs_root, [remote_src], tmp_path))
    assert summary["rows_in"] == len(rows)
    assert remote_src in st.read_json(REGISTRY)["sources"]
    out = read_all(gcs_root)
    assert out.equals(ref)  # same keys, captions, placeholder colours, image bytes
    assert plan_download(make_cfg(gcs_root, [remote_src], tmp_path)) == []  # stable fingerprint


@pytest.mark.slow
def test_killed_download_reruns_to_the_same_output(reference, tmp_path):
    rows, src, _, ref = reference
    root = tmp_path / "root"
    cfg_args = json.dumps({"storage": {"root": str(root), "work_dir": str(tmp_path / "work")},
                           "source": {"paths": [str(src)]},
                           "download": {"image_size": SIZE, "processes": 1, "threads": 4,
                                        "shard_size": 8, "timeout_s": TIMEOUT_S, "retries": 0}})
    code = ("import json,sys; from muse.config import load_config; from muse.download import run_download;"
            f"run_download(load_config(None, data=json.loads({cfg_args!r})))")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "work").glob("*/img2dataset.log")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # img2dataset is running (the /slow row keeps it busy for seconds)
    assert proc.poll() is None, "download finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: our process and img2dataset's
    proc.wait()
    assert len(done_shards(Storage(str(root)), IMAGES)) < 3
    run_download(make_cfg(root, [src], tmp_path))
    assert read_all(root).equals(ref)


@pytest.mark.slow
def test_adding_a_source_fetches_only_its_rows(server, tmp_path):
    first = write_source(tmp_path / "a.parquet", [(server.url(f"/img/{i}.jpg"), f"a{i}", None, i)
                                                  for i in range(10, 19)])
    run_download(make_cfg(tmp_path / "root", [first], tmp_path))
    before = {p.name: p.read_bytes() for p in (tmp_path / "root/images").glob("0*")}
    second = write_source(tmp_path / "b.parquet", [(server.url(f"/img/{i}.jpg"), f"b{i}", None, i)
                                                   for i in range(20, 24)], start_id=100)
    server.requests.clear()
    summary = run_download(make_cfg(tmp_path / "root", [first, second], tmp_path))
    assert sorted(server.requests) == [f"/img/{i}.jpg" for i in range(20, 24)]
    assert summary["rows_in"] == 13 and summary["shards"] == [0, 1, 2]
    assert {p.name: p.read_bytes() for p in (tmp_path / "root/images").glob("0000[01]*")} == before
    # a changed file: its old shards are retired and it gets fresh ids
    write_source(second, [(server.url(f"/img/{i}.jpg"), f"c{i}", None, i) for i in range(30, 32)])
    os.utime(second, (time.time() + 5, time.time() + 5))
    summary = run_download(make_cfg(tmp_path / "root", [first, second], tmp_path))
    assert summary["shards"] == [0, 1, 3] and summary["rows_in"] == 11
    assert not (tmp_path / "root/images/00002.parquet").exists()
    assert read_all(tmp_path / "root")["caption"].to_pylist()[-2:] == ["c30", "c31"]


def test_max_samples_spans_files(server, tmp_path):
    a = write_source(tmp_path / "a.parquet", [(server.url("/404"), "a", None, 0)] * 5)
    b = write_source(tmp_path / "b.parquet", [(server.url("/404"), "b", None, 0)] * 5)
    cfg = make_cfg(tmp_path / "root", [a, b], tmp_path)
    cfg.source.max_samples = 7
    parts = plan_download(cfg)
    assert [(p.source, p.rows, p.first_shard, p.num_shards) for p in parts] == \
        [(str(a), 5, 0, 1), (str(b), 2, 1, 1)]


def test_deadline_kills_img2dataset_and_names_the_limit(server, tmp_path):
    src = write_source(tmp_path / "s.parquet", [(server.url("/slow"), "slow", None, 0)])
    cfg = make_cfg(tmp_path / "root", [src], tmp_path, deadline_s=0.5, timeout_s=30)
    with pytest.raises(DownloadError, match="deadline_s"):
        run_download(cfg)
    assert done_shards(Storage(str(tmp_path / "root")), IMAGES) == []


def test_missing_img2dataset_shard_is_named(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(DownloadError, match="shard 3 did not finish"):
        verify_shard(tmp_path / "out", 3, 10, "x.parquet")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_reader_csv_and_jsonl_keep_text_exact(tmp_path, fmt):
    rows = [{"url": "http://x/1", "caption": "007", "id": 1},
            {"url": "http://x/2", "caption": "ünï, \"quoted\"", "id": 2}]
    path = tmp_path / f"s.{fmt}"
    if fmt == "csv":
        pa.csv.write_csv(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = load_config(None, data={"source": {"paths": [str(path)], "url_column": "url",
                                             "caption_column": "caption"}})
    t = read_source(str(path), cfg.source)
    assert t["caption"].to_pylist() == ["007", "ünï, \"quoted\""]
    assert t["id"].to_pylist() == [1, 2]


def test_reader_errors_name_the_file(tmp_path):
    good = write_source(tmp_path / "s.parquet", [("http://x/1", "c", None, 0)])
    cfg = load_config(None, data={"source": {"paths": [str(good)], "url_column": "link"}})
    with pytest.raises(SourceError, match=r"s\.parquet: no column 'link' \(source.url_column\)"):
        read_source(str(good), cfg.source)
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="broken.parquet: cannot read as parquet"):
        read_source(str(bad), cfg.source)
    cfg = load_config(None, data={"source": {"paths": [str(tmp_path / "nope.csv")]}})
    with pytest.raises(SourceError, match="nope.csv"):
        plan_download(cfg)


def test_placeholders_are_deterministic_across_processes():
    img = solid_color("0004200017", 16)
    assert img.mode == "RGB" and img.size == (16, 16)
    assert len({tuple(p) for p in np.asarray(img).reshape(-1, 3)}) == 1
    code = "from muse.placeholders import color_of; print(color_of('0004200017'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(color_of("0004200017"))
    assert color_of("0004200017") != color_of("0004200018")


def test_download_part_skips_finished_work(reference, tmp_path):
    _, src, _, _ = reference
    cfg = make_cfg(Path(src).parent / "root", [src], tmp_path)
    from muse.download.sources import plan_parts  # the part, even though it is complete
    st = Storage(cfg.storage.root)
    reg = st.read_json(REGISTRY)
    e = reg["sources"][str(src)]
    from muse.download import DownloadPart
    part = DownloadPart(str(src), e["fingerprint"], e["first_shard"], e["num_shards"], e["rows"], 8)
    assert download_part(cfg, part) == []
    assert plan_parts(st, cfg) == []


@pytest.mark.slow
def test_a_truncated_shard_with_its_stats_is_fetched_again(reference, tmp_path, capfd):
    """The encode error's advice ("re-run muse download to rebuild it") must do what it says."""
    import shutil

    _, src, _, ref = reference
    root = tmp_path / "root"
    shutil.copytree(Path(src).parent / "root", root)
    for sid in (0, 1):  # cut short, stats kept
        shard = root / "images" / f"0000{sid}.parquet"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    run_download(make_cfg(root, [src], tmp_path))
    err = capfd.readouterr().err
    assert "00000.parquet: " in err and "00001.parquet: " in err  # both by the listing's size
    assert err.count("bytes, its stats say") == 2
    assert read_all(root).equals(ref)
