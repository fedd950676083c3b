"""The retry pass (issue 28): real img2dataset against the image server on 127.0.0.1, whose /flaky/
routes answer 503 in the first download and the picture in the retry.

One download with the failures, and one clean download of the same pictures, serve the module:
each test retries its own copy of the first.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse.config import load_config
from muse.download import run_download
from muse.download.retry import run_retry
from muse.layout import IMAGES, done_generations, done_marker, shard_name
from muse.storage import Storage
from muse.testing.imageserver import ImageServer

REPO = Path(__file__).resolve().parents[1]
SHARD = 8
# (route, fails in the first run, retryable): shards 0 and 1 have rows to retry, shard 2 none
ROUTES = ["/img/1.jpg", "/flaky/10.jpg", "/flaky/11.jpg", "/404", "/img/2.jpg", "/flaky/12.jpg", "/status/503",
          "/img/3.jpg",
          "/flaky/13.jpg", "/img/4.jpg", "/404", "/flaky/14.jpg", "/img/5.jpg", "/flaky/15.jpg", "/img/6.jpg",
          "/status/429",
          "/img/7.jpg", "/img/8.jpg", "/404", "/img/9.jpg"]
FLAKY = [i for i, r in enumerate(ROUTES) if r.startswith("/flaky/")]
ALWAYS = [i for i, r in enumerate(ROUTES) if r.startswith("/status/")]   # retryable, fail every time
FINAL = [i for i, r in enumerate(ROUTES) if r == "/404"]


def _cfg(root: Path, src: Path, work: Path, **download):
    dl = {"image_size": 32, "processes": 1, "threads": 4, "shard_size": SHARD, "timeout_s": 4, "retries": 0,
          "retry_after_s": 0, **download}
    return load_config(None, data={"storage": {"root": str(root), "work_dir": str(work)},
                                   "source": {"paths": [str(src)]}, "download": dl})


def _overrides(cfg) -> list[str]:
    return [f"storage.root={cfg.storage.root}", f"storage.work_dir={cfg.storage.work_dir}",
            f"source.paths=['{cfg.source.paths[0]}']"] + [
        f"download.{k}={v}" for k, v in cfg.download.model_dump().items()
        if k in ("image_size", "processes", "threads", "shard_size", "timeout_s", "retries", "retry_after_s",
                 "shards_per_task")]


def _rows(root: Path, sid: int, gen: int) -> pa.Table:
    return pq.read_table(io.BytesIO(Storage(str(root)).read_bytes(shard_name(IMAGES, sid, generation=gen))))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(server, source file, root after a download with /flaky/ failing, the clean download's rows)."""
    tmp = tmp_path_factory.mktemp("retry")
    with ImageServer() as srv:
        urls = [srv.url(r) for r in ROUTES]
        srv.render(urls)
        src = tmp / "part-0.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))],
                                 "SAMPLE_ID": pa.array(range(len(urls)), pa.int64())}), src)
        clean = _cfg(tmp / "clean", src, tmp / "work")
        run_download(clean)
        srv.flaky = 503
        run_download(_cfg(tmp / "failed", src, tmp / "work"))
        clean_rows = pa.concat_tables([_rows(tmp / "clean", sid, 0) for sid in range(3)])
        yield srv, src, tmp / "failed", clean_rows


def _copy(world, tmp_path) -> Path:
    root = tmp_path / "root"
    shutil.copytree(world[2], root)
    return root


def test_the_first_download_replaced_the_flaky_rows_as_transient(world):
    rows = pa.concat_tables([_rows(world[2], sid, 0) for sid in range(3)])
    reasons = rows["reason"].to_pylist()
    assert [reasons[i] for i in FLAKY] == ["http_5xx"] * len(FLAKY)
    assert [reasons[i] for i in FINAL] == ["http_404"] * len(FINAL)
    assert not any(world[3]["replaced"].to_pylist()[i] for i in FLAKY)   # the clean run got them


@pytest.fixture(scope="module")
def retried(world, tmp_path_factory):
    """(root, what `run_download` returned, the paths the server was asked for) of one uninterrupted
    retry pass over a copy of the failed download, the /flaky/ routes answering again."""
    srv, src, _, _ = world
    tmp = tmp_path_factory.mktemp("retried")
    root = _copy(world, tmp)
    srv.flaky = None
    before = len(srv.requests)
    out = run_download(_cfg(root, src, tmp / "work", retry_replaced=True))
    return root, out, srv.requests[before:]


def test_retry_recovers_exactly_the_transient_rows_as_a_new_generation(world, retried):
    clean = world[3]
    root, out, fetched = retried
    assert sorted(fetched) == sorted(ROUTES[i] for i in FLAKY + ALWAYS)   # no 404, no good row again
    st = Storage(str(root))
    assert done_generations(st, IMAGES) == {0: 1, 1: 1, 2: 0}            # shard 2: nothing to retry
    assert not st.exists(shard_name(IMAGES, 2, generation=1))
    old = pa.concat_tables([_rows(root, sid, 0) for sid in range(3)])
    new = pa.concat_tables([_rows(root, 0, 1), _rows(root, 1, 1), _rows(root, 2, 0).append_column(
        "retries", pa.array([0] * 4, pa.int32()))])
    assert new.num_rows == old.num_rows and new["key"] == old["key"] and new["SAMPLE_ID"] == old["SAMPLE_ID"]
    for i, (o, n, c) in enumerate(zip(old.to_pylist(), new.to_pylist(), clean.to_pylist())):
        if i in FLAKY:   # recovered: the picture a clean download gets, byte for byte
            assert (n["image"], n["replaced"], n["reason"], n["status"]) == (c["image"], False, "", "success")
            assert n["retries"] == 1
        elif i in ALWAYS:  # fetched again, failed again: its placeholder and reason, one retry counted
            assert (n["image"], n["replaced"], n["reason"], n["retries"]) == (o["image"], True, o["reason"], 1)
        else:            # the 404s and the good rows: untouched
            assert {**n, "retries": None} == {**o, "retries": None} and n["retries"] == 0
    report = out["retry"]
    assert report["by_reason"] == {"http_429": {"retried": 1, "recovered": 0, "failed": 1},
                                   "http_5xx": {"retried": 7, "recovered": 6, "failed": 1}}
    assert (report["retried"], report["recovered"], report["shards"]) == (8, 6, [0, 1])
    assert out["succeeded"] == sum(not r for r in clean["replaced"].to_pylist())   # as a clean download
    marker = st.read_json(done_marker(IMAGES, 0, 1))
    assert marker["bytes"] == st.size(shard_name(IMAGES, 0, generation=1)) and marker["generation"] == 1
    assert (marker["retried"], marker["recovered"]) == (4, 3) and marker["replaced_by_reason"] == {
        "http_404": 1, "http_5xx": 1}


@pytest.mark.slow
def test_interval_and_max_retries_per_row(world, tmp_path):
    """A generation younger than retry_after_s is left alone; a row is fetched again at most
    max_retries_per_row times."""
    srv, src, _, _ = world
    root = _copy(world, tmp_path)
    srv.flaky = 503     # every retry fails again
    cfg = _cfg(root, src, tmp_path / "work", retry_after_s=3600, max_retries_per_row=1)
    st = Storage(str(root))
    now = time.time()
    for sid in range(3):   # the download was half an hour ago: not yet due
        os.utime(st.path(done_marker(IMAGES, sid)), (now - 1800, now - 1800))
    assert run_retry(cfg)["retried"] == 0 and done_generations(st, IMAGES) == {0: 0, 1: 0, 2: 0}
    report = run_retry(cfg, now=now + 1800)   # an hour after it: due
    assert (report["retried"], report["recovered"]) == (8, 0)
    assert done_generations(st, IMAGES) == {0: 1, 1: 1, 2: 0}
    assert _rows(root, 0, 1)["retries"].to_pylist() == [0, 1, 1, 0, 0, 1, 1, 0]
    assert run_retry(cfg, now=now + 3 * 3600)["retried"] == 0   # due again, but each row had its one retry
    srv.flaky = None
    assert run_retry(cfg.model_copy(update={"download": cfg.download.model_copy(
        update={"max_retries_per_row": 2})}), now=now + 3 * 3600)["recovered"] == 6
    assert done_generations(st, IMAGES) == {0: 2, 1: 2, 2: 0}
    assert _rows(root, 1, 2)["retries"].to_pylist() == [2, 0, 0, 2, 0, 2, 0, 2]


def _muse_download(cfg, env) -> subprocess.Popen:
    args = [a for o in _overrides(cfg) for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "muse.cli", "download", "--retry-replaced", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _generations(root: Path) -> dict[str, bytes]:
    """The shard files of images/, markers without the time they were written."""
    out = {}
    for p in sorted((root / IMAGES).iterdir()):
        if p.name.endswith(".parquet"):
            out[p.name] = p.read_bytes()
        elif p.name.endswith("_stats.json"):
            out[p.name] = json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "written"})
    return out


@pytest.mark.slow
def test_kill_9_mid_pass_then_rerun_writes_the_bytes_of_an_uninterrupted_pass(world, retried, tmp_path):
    """`retried` is the uninterrupted pass (its bytes do not depend on how rows are batched)."""
    srv, src, _, _ = world
    srv.flaky = None
    env = dict(os.environ, PYTHONPATH=str(REPO))
    root = _copy(world, tmp_path)
    for p in (root / IMAGES).glob("*_stats.json"):   # downloaded two hours ago: due
        os.utime(p, (time.time() - 7200,) * 2)
    # one img2dataset run per shard, so the kill lands between the two shards' generations
    cfg = _cfg(root, src, tmp_path / "work", retry_after_s=3600, shards_per_task=1)
    proc = _muse_download(cfg, env)
    first = root / shard_name(IMAGES, 0, generation=1)
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    st = Storage(str(root))
    assert done_generations(st, IMAGES)[1] == 0   # killed mid-pass: shard 1's old generation in force
    rerun = _muse_download(cfg, env)
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out[-3000:]
    assert "retry pass: " in out and "reason                     retried  recovered  still failed" in out, out
    assert _generations(root) == _generations(retried[0])
    assert done_generations(st, IMAGES) == {0: 1, 1: 1, 2: 0}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _latest_download_stats() -> tuple[str, dict]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
                "download-stats"])), sort=ArtifactSort.CREATED_DESC, limit=1)

    art = asyncio.run(read())[0]
    return art.description, {r["what"]: r for r in json.loads(art.data)}


@pytest.mark.slow
def test_data_refresh_downloads_new_files_and_retries_in_one_run_then_waits_the_interval(
        world, harness, demo_subset, tmp_path):
    """On a real local Prefect server: run 1 downloads a.jsonl while /flaky/ fails (too young to
    retry); two hours later run 2 downloads the new b.jsonl and retries a's rows in the same run;
    run 3 at once retries nothing (the interval), though a row that always fails is still retryable."""
    from flows.pipeline import data_refresh_flow

    srv, _, _, _ = world
    _, config = demo_subset
    src = tmp_path / "src"
    src.mkdir()
    a = ["/img/1.jpg", "/flaky/10.jpg", "/404", "/flaky/11.jpg", "/status/503", "/img/2.jpg"]
    (src / "a.jsonl").write_text("".join(json.dumps({"url": srv.url(r), "caption": f"a {i}", "sample_id": i}) + "\n"
                                         for i, r in enumerate(a)))
    overrides = [f"storage.root={tmp_path / 'root'}", f"storage.work_dir={tmp_path / 'work'}",
                 f"source.paths=['{src}/*.jsonl']", "download.retry_replaced=true", "download.retry_after_s=3600"]
    st = Storage(str(tmp_path / "root"))
    srv.flaky = 503
    first = data_refresh_flow(str(config), overrides)
    assert first["this_run"]["shards"] == 1 and done_generations(st, IMAGES) == {0: 0}
    description, rows = _latest_download_stats()
    assert "retry pass: 0 real image(s) gained" in description and rows["retried: total"]["this run"] == 0

    srv.flaky = None
    os.utime(st.path(done_marker(IMAGES, 0)), (time.time() - 7200,) * 2)   # run 1 was two hours ago
    (src / "b.jsonl").write_text("".join(json.dumps({"url": srv.url(f"/img/{20 + i}.jpg"), "caption": f"b {i}",
                                                     "sample_id": 100 + i}) + "\n" for i in range(3)))
    second = data_refresh_flow(str(config), overrides)
    assert second["this_run"]["shards"] == 1 and done_generations(st, IMAGES) == {0: 1, 1: 0}
    description, rows = _latest_download_stats()
    assert "retry pass: 2 real image(s) gained" in description, description
    assert (rows["retried: http_5xx"]["this run"], rows["recovered: http_5xx"]["this run"],
            rows["still failed: http_5xx"]["this run"]) == (3, 2, 1)
    assert second["rows"] == 9 and rows["succeeded"]["dataset"] == 7   # 2 + 2 recovered + 3 new

    third = data_refresh_flow(str(config), overrides)
    assert third["note"].startswith("nothing new") and done_generations(st, IMAGES) == {0: 1, 1: 0}
    description, rows = _latest_download_stats()
    assert "retry pass: 0 real image(s) gained" in description and rows["retried: total"]["this run"] == 0


def test_size_check_and_retiring_act_on_every_generation(tmp_path, capsys):
    """intact.py checks the newest generation against its own marker (a cut one loses its marker:
    the generation before is in force again); a changed source file's shards go with every generation."""
    from muse.download.intact import check_image_shards, whole_image_shards
    from muse.download.sources import retire

    st = Storage(str(tmp_path))
    for sid, gen in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)):
        data = f"shard {sid} generation {gen}".encode()
        st.write_bytes(shard_name(IMAGES, sid, generation=gen), data)
        st.write_json(done_marker(IMAGES, sid, gen), {"bytes": len(data) + ((sid, gen) == (0, 2))})  # 00000.g2: cut
    assert check_image_shards(st) == ([1, 2], {0: "20 bytes, its stats say 21"})
    assert whole_image_shards(st) == [0, 1, 2] and done_generations(st, IMAGES) == {0: 1, 1: 1, 2: 0}
    assert "00000.g2.parquet: 20 bytes, its stats say 21: the generation before it is in force" in capsys.readouterr().err
    retire(st, {"first_shard": 0, "num_shards": 2})
    assert sorted(p.rsplit("/", 1)[-1] for p in st.list(IMAGES)) == ["00002.parquet", "00002_stats.json"]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_generation_0_marker_is_as_old_as_its_file(where, tmp_path, request):
    """Generation 0 markers hold no time: the storage's modification time stands in, on a local
    root and on gs:// (the GCS emulator's `updated`)."""
    from muse.download.retry import _age_s

    st = Storage(str(tmp_path) if where == "local" else request.getfixturevalue("gcs_root"))
    st.write_json(done_marker(IMAGES, 3), {"rows_in": 1})
    age = _age_s(st, 3, 0, {"rows_in": 1}, time.time())
    assert 0 <= age < 60, age
    assert _age_s(st, 3, 1, {"written": time.time() - 100}, time.time()) == pytest.approx(100, abs=1)


@pytest.mark.slow
def test_encode_after_the_retry_pass_rewrites_only_the_retried_shards(world, tmp_path):
    """The whole refresh on real files: download (with /flaky/ failing) -> encode -> retry pass ->
    encode. Only the shards the pass rewrote get a new encoded generation (the other shard's files
    keep their bytes and mtimes), the manifest names them, and each recovered row now holds the
    tokens that a clean download's picture of it encodes to."""
    from muse.encode import run_encode
    from muse.encode.shards import Encoders
    from muse.layout import dataset_dir, read_manifest
    from muse.testing.tiny import build_tiny_encoders, tiny_encode_overrides

    srv, src, failed, _ = world
    sets = tiny_encode_overrides(build_tiny_encoders(tmp_path / "enc")) + ["encode.row_group_size=4"]
    roots = {name: tmp_path / name for name in ("refresh", "clean")}
    shutil.copytree(failed, roots["refresh"])
    shutil.copytree(failed.parent / "clean", roots["clean"])
    cfgs = {name: load_config(None, sets, data={"storage": {"root": str(r), "work_dir": str(tmp_path / "work")},
                                                "source": {"paths": [str(src)]},
                                                "download": _cfg(r, src, tmp_path).download.model_dump()})
            for name, r in roots.items()}
    Encoders._cache.clear()
    for cfg in cfgs.values():
        run_encode(cfg)
    ds_dir = roots["refresh"] / dataset_dir(cfgs["refresh"])
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ds_dir.iterdir()}
    was, srv.flaky = srv.flaky, None
    try:
        run_download(cfgs["refresh"].model_copy(update={"download": cfgs["refresh"].download.model_copy(
            update={"retry_replaced": True})}))
    finally:
        srv.flaky = was
    run_encode(cfgs["refresh"])
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in ds_dir.iterdir()}
    assert sorted(set(after) - set(before)) == ["00000.g1.json", "00000.g1.parquet", "00001.g1.json",
                                                "00001.g1.parquet"]
    for name in ("00002.parquet", "00002.json", "00000.parquet", "00001.parquet"):  # nothing rewritten
        assert after[name] == before[name], name

    def encoded(name: str) -> dict:
        st = Storage(str(roots[name]))
        manifest = read_manifest(st, dataset_dir(cfgs[name]))
        rows = {}
        for rec in manifest["shards"]:
            t = pq.read_table(io.BytesIO(st.read_bytes(f"{dataset_dir(cfgs[name])}/{rec['path']}")))
            rows.update({r["key"]: (r["replaced"], r["vq16"]) for r in t.select(["key", "replaced", "vq16"]).to_pylist()})
        return manifest, rows

    manifest, refreshed = encoded("refresh")
    _, clean = encoded("clean")
    assert {s["id"]: s["generation"] for s in manifest["shards"]} == {0: 1, 1: 1, 2: 0} and not manifest["pending"]
    keys = sorted(refreshed)
    assert keys == sorted(clean) and len(keys) == len(ROUTES)
    for i in FLAKY:
        assert refreshed[keys[i]] == clean[keys[i]] and refreshed[keys[i]][0] is False
    for i in FINAL + ALWAYS:
        assert refreshed[keys[i]][0] is True
