"""download.distributor=spark in Spark local mode and on a standalone cluster on 127.0.0.1
(needs pyspark + Java 17)."""

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse.config import load_config
from muse.download import run_download
from muse.layout import IMAGES, done_shards
from muse.storage import Storage
from muse.testing.imageserver import ImageServer, refused_url
from muse.testing.spark import SparkStandalone

pytestmark = pytest.mark.slow  # starts JVMs: Spark in local mode, a standalone master + worker


def test_spark_distributor_local_mode(tmp_path):
    with ImageServer() as srv:
        urls = [srv.url("/img/1.jpg"), srv.url("/img/2.jpg"), srv.url("/404"), "file:///etc/hostname"]
        pq.write_table(pa.table({"URL": urls, "TEXT": ["a", "b", "c", "d"]}), tmp_path / "s.parquet")
        cfg = load_config(None, data={
            "storage": {"root": str(tmp_path / "root"), "work_dir": str(tmp_path / "work")},
            "source": {"paths": [str(tmp_path / "s.parquet")]},
            "download": {"image_size": 32, "processes": 1, "threads": 2, "shard_size": 2,
                         "timeout_s": 5, "retries": 0, "distributor": "spark"}})
        summary = run_download(cfg)
    assert summary["rows_in"] == 4 and summary["succeeded"] == 2
    assert summary["replaced_by_reason"] == {"http_404": 1, "bad_url": 1}
    log = next((tmp_path / "work").glob("*/img2dataset.log")).read_text()
    assert "Stage 0" in log  # the work went through Spark, not the process pool


def _rows(srv) -> list[tuple]:
    """(url, caption): successes spread over two shards, and one row per kind of replacement."""
    rows = [(srv.url(f"/img/{n}.jpg"), f"picture {n}") for n in range(1, 6)]
    rows += [(srv.url("/404"), "missing"), (srv.url("/500"), "boom"),
             (refused_url(), "refused"), (srv.url("/html"), "html"), ("file:///etc/hostname", "file url")]
    srv.render(u for u, _ in rows)
    return rows


def _download(tmp: Path, src: Path, distributor: str) -> tuple[dict, pa.Table]:
    cfg = load_config(None, data={
        "storage": {"root": str(tmp / "root"), "work_dir": str(tmp / "work")},
        "source": {"paths": [str(src)]},
        "download": {"image_size": 32, "processes": 1, "threads": 2, "shard_size": 5, "timeout_s": 5,
                     "retries": 0, "distributor": distributor, "deadline_s": 420}})
    summary = run_download(cfg)
    st = Storage(str(tmp / "root"))
    return summary, pa.concat_tables([pq.read_table(io.BytesIO(st.read_bytes(f"images/{sid:05d}.parquet")))
                                      for sid in done_shards(st, IMAGES)])


@pytest.mark.timeout(600)  # hang guard (it took 323-378 s at load 13-22 on 2 cores); the download has deadline_s
def test_spark_standalone_cluster_matches_multiprocessing(tmp_path, monkeypatch):
    with ImageServer() as srv, SparkStandalone(tmp_path / "spark", wait=False) as cluster:
        rows = _rows(srv)
        src = tmp_path / "s.parquet"
        pq.write_table(pa.table({"URL": [u for u, _ in rows], "TEXT": [c for _, c in rows]}), src)
        ref_summary, ref = _download(tmp_path / "mp", src, "multiprocessing")  # while the JVMs start
        cluster.wait_ready()
        for k, v in cluster.env().items():  # the driver binds to 127.0.0.1 and reads no user conf
            if k.startswith(("SPARK_", "PYSPARK_")):
                monkeypatch.setenv(k, v)
        # "--master spark://127.0.0.1:PORT ... pyspark-shell", as a user points it at a cluster
        monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", cluster.submit_args())
        summary, out = _download(tmp_path / "sp", src, "spark")
        assert len(cluster.alive()) == 2  # master and worker were up all along
    assert cluster.alive() == [], "the master or worker left a process behind"
    assert ref_summary["replaced_by_reason"] == {"bad_url": 1, "connection_refused": 1, "decode_error": 1,
                                                 "http_404": 1, "http_5xx": 1}
    assert {k: summary[k] for k in ("rows_in", "succeeded", "replaced_by_reason")} == \
        {k: ref_summary[k] for k in ("rows_in", "succeeded", "replaced_by_reason")}
    assert out.equals(ref)  # same keys, captions, reasons, placeholder colours, image bytes
    # the job ran on the cluster: the master registered our app and the worker launched its executor
    assert "Registering app muse-download" in (tmp_path / "spark" / "master.log").read_text()
    assert "Asked to launch executor" in (tmp_path / "spark" / "worker.log").read_text()
