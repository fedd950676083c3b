"""download.distributor=spark in Spark local mode (needs pyspark + Java 17)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse.config import load_config
from muse.download import run_download
from muse.testing.imageserver import ImageServer

pytestmark = pytest.mark.slow  # starts a JVM and Spark in local mode


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
