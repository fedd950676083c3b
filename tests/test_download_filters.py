"""source.filters / min_aspect / max_aspect / dedup_urls: rows chosen by their metadata before any fetch.

LAION-like lists (Parquet, CSV, JSONL) with nulls, NaN, a duplicate URL and rows failing
several rules; end to end through `muse download` and the Prefect flow against the image
server on 127.0.0.1, whose request log shows which rows were fetched.
"""

import asyncio
import io
import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import yaml

from muse.cli import main
from muse.config import ConfigError, load_config
from muse.download import REGISTRY, SourceError, plan_download, run_download, summary_rows
from muse.download.sources import read_source, select
from muse.layout import IMAGES, done_shards
from muse.storage import Storage
from muse.testing.imageserver import ImageServer

NAN, SIZE = float("nan"), 32
FILTERS = [{"column": "pwatermark", "max": 0.8}, {"column": "punsafe", "max": 0.1},
           {"column": "AESTHETIC_SCORE", "min": 5.0}, {"column": "WIDTH", "min": 256},
           {"column": "HEIGHT", "min": 256}]
SELECTION = {"filters": FILTERS, "max_aspect": 2.0, "dedup_urls": True}
# (path, pwatermark, punsafe, AESTHETIC_SCORE, WIDTH, HEIGHT, expected: None = kept, else the reason)
ROWS = [
    ("/img/0.jpg", 0.1, 0.01, 6.0, 512, 512, None),
    ("/img/1.jpg", 0.9, 0.01, 6.0, 512, 512, "pwatermark > 0.8"),
    ("/img/2.jpg", None, 0.01, 6.0, 512, 512, "pwatermark is null"),
    ("/img/3.jpg", 0.95, 0.5, 6.0, 512, 512, "pwatermark > 0.8"),  # fails two: counted under the first
    ("/img/4.jpg", 0.1, 0.01, 4.0, 512, 512, "AESTHETIC_SCORE < 5"),
    ("/img/5.jpg", 0.1, 0.01, 6.0, 100, 512, "WIDTH < 256"),
    ("/img/6.jpg", 0.1, 0.01, 6.0, 1024, 300, "WIDTH/HEIGHT > 2"),
    ("/img/0.jpg", 0.1, 0.01, 6.0, 512, 512, "duplicate url"),
    ("/img/8.jpg", 0.2, 0.05, 5.0, 256, 256, None),  # bounds are inclusive
    ("/img/9.jpg", 0.1, 0.01, NAN, 512, 512, "AESTHETIC_SCORE is null"),
    ("/404", 0.1, 0.01, 7.0, 512, 300, None),  # kept, fetched, replaced (http_404)
    ("/img/11.jpg", 0.0, 0.0, 9.0, 600, 400, None),
]
KEPT = [i for i, r in enumerate(ROWS) if r[-1] is None]


def expected_filtered(upto: int = len(ROWS)) -> dict:
    out: dict = {}
    for r in ROWS[:upto]:
        if r[-1]:
            out[r[-1]] = out.get(r[-1], 0) + 1
    return out


def laion_table(base: str = "http://127.0.0.1:9") -> pa.Table:
    cols = ["pwatermark", "punsafe", "AESTHETIC_SCORE", "WIDTH", "HEIGHT"]
    data = {"URL": [base + r[0] for r in ROWS], "TEXT": [f"caption {i}" for i in range(len(ROWS))],
            "SAMPLE_ID": list(range(len(ROWS)))}
    for j, c in enumerate(cols):
        data[c] = pa.array([r[1 + j] for r in ROWS], pa.int64() if c in ("WIDTH", "HEIGHT") else pa.float64())
    return pa.table(data)


def write_list(path: Path, table: pa.Table) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pcsv.write_csv(table, path)
    else:  # JSONL; json writes NaN as NaN, which json.loads reads back
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    return path


def source_cfg(paths, **source):
    return load_config(None, data={"source": {"paths": [str(p) for p in paths], **source}}).source


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_selection_counts_every_row_once(tmp_path, ext):
    path = write_list(tmp_path / f"urls.{ext}", laion_table())
    sel = select(str(path), source_cfg([path], **SELECTION))
    assert sel.indices.tolist() == KEPT
    assert sel.filtered == expected_filtered()
    assert sel.rows_in == len(ROWS) == len(KEPT) + sum(sel.filtered.values())
    rows = read_source(str(path), source_cfg([path], **SELECTION))
    assert rows["SAMPLE_ID"].to_pylist() == KEPT and rows["__muse_row"].to_pylist() == KEPT
    # a limit takes the first N selected rows; only the prefix it came from is accounted for
    sel = select(str(path), source_cfg([path], **SELECTION), limit=2)
    assert sel.indices.tolist() == KEPT[:2] and sel.rows_in == KEPT[1] + 1
    assert sel.filtered == expected_filtered(KEPT[1] + 1)


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_missing_or_text_column_is_an_error_naming_column_and_file(tmp_path, ext):
    path = write_list(tmp_path / f"urls.{ext}", laion_table().drop(["punsafe"]))
    with pytest.raises(SourceError, match=rf"urls\.{ext}: .*'punsafe'"):
        select(str(path), source_cfg([path], **SELECTION))
    with pytest.raises(SourceError, match=rf"urls\.{ext}: column.*'TEXT'.* not a number"):
        select(str(path), source_cfg([path], filters=[{"column": "TEXT", "min": 1}]))
    with pytest.raises(SourceError, match=rf"urls\.{ext}: .*'W'"):
        select(str(path), source_cfg([path], min_aspect=0.5, aspect_columns=["W", "HEIGHT"]))


def test_csv_column_that_turns_fractional_after_the_first_block(tmp_path):
    """Streamed CSV infers types from its first block; filtered columns are read as numbers throughout."""
    n = 300_000  # > one 4 MiB block
    lines = ["URL,TEXT,score"] + [f"http://x/{i},c,{i % 7}" for i in range(n)] + ["http://x/last,c,6.5"]
    path = tmp_path / "urls.csv"
    path.write_text("\n".join(lines) + "\n")
    sel = select(str(path), source_cfg([path], filters=[{"column": "score", "min": 6}]))
    assert len(sel.indices) == n // 7 + 1 and sel.indices[-1] == n
    assert sel.filtered == {"score < 6": n - n // 7}


def test_filter_config_is_checked_at_load():
    with pytest.raises(ConfigError, match=r"source\.filters\.0: filter on 'punsafe' needs min, max or both"):
        source_cfg(["x"], filters=[{"column": "punsafe"}])
    with pytest.raises(ConfigError, match=r"source\.filters\.0\.maxi: unknown key"):
        source_cfg(["x"], filters=[{"column": "punsafe", "maxi": 0.1}])
    with pytest.raises(ConfigError, match=r"min_aspect 3.0 > source.max_aspect 2.0"):
        source_cfg(["x"], min_aspect=3, max_aspect=2)


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        yield srv


def config_file(tmp_path, src, **source) -> Path:
    data = {"storage": {"root": str(tmp_path / "root"), "work_dir": str(tmp_path / "work")},
            "source": {"paths": [str(src)], **source},
            "download": {"image_size": SIZE, "processes": 1, "threads": 4, "shard_size": 8,
                         "timeout_s": 5, "retries": 0}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def read_images(root) -> pa.Table:
    st = Storage(str(root))
    return pa.concat_tables([pq.read_table(io.BytesIO(st.read_bytes(f"images/{s:05d}.parquet")))
                             for s in done_shards(st, IMAGES)])


def test_muse_download_fetches_only_selected_rows(server, tmp_path, capsys):
    src = write_list(tmp_path / "urls.parquet", laion_table(server.url("")))
    server.requests.clear()
    assert main(["download", "--config", str(config_file(tmp_path, src, **SELECTION))]) == 0
    assert sorted(server.requests) == sorted({ROWS[i][0] for i in KEPT})
    out = read_images(tmp_path / "root")
    assert out["SAMPLE_ID"].to_pylist() == KEPT
    assert out["reason"].to_pylist() == ["", "", "http_404", ""]
    err = capsys.readouterr().err
    assert "filtered: pwatermark > 0.8" in err and f"{100 * 2 / len(ROWS):.1f}%" in err
    st = Storage(str(tmp_path / "root"))
    entry = st.read_json(REGISTRY)["sources"][str(src)]
    assert (entry["rows"], entry["rows_in"], entry["filtered"]) == (len(KEPT), len(ROWS), expected_filtered())
    assert entry["selection"]["dedup_urls"] is True
    cfg = load_config(tmp_path / "pipeline.yaml")
    assert plan_download(cfg) == []  # unchanged file, unchanged selection: nothing to do

    # a changed selection is a new registry entry: old shards retired, the new rows fetched
    looser = [dict(f, max=0.95) if f["column"] == "pwatermark" else f for f in FILTERS]
    cfg = load_config(config_file(tmp_path, src, **dict(SELECTION, filters=looser)))
    server.requests.clear()
    summary = run_download(cfg)
    assert read_images(tmp_path / "root")["SAMPLE_ID"].to_pylist() == [0, 1, 8, 10, 11]
    assert "/img/1.jpg" in server.requests
    assert summary["shards"] == [1] and not st.exists("images/00000.parquet")
    assert summary["filtered_by_reason"]["punsafe > 0.1"] == 1  # row 3 now passes pwatermark
    assert summary["rows_in"] == len(ROWS)
    rows = {r["what"]: r for r in summary_rows(summary)}
    assert rows["filtered: punsafe > 0.1"]["share"] == f"{100 / len(ROWS):.1f}%"


def test_without_filters_the_registry_is_as_before(server, tmp_path):
    """No selection: no column is read for it."""
    src = write_list(tmp_path / "urls.parquet", laion_table(server.url("")).slice(0, 3))
    cfg = load_config(config_file(tmp_path, src))
    run_download(cfg)
    st = Storage(cfg.storage.root)
    reg = st.read_json(REGISTRY)
    assert reg["sources"][str(src)]["selection"] is None
    assert plan_download(cfg) == []


def test_img2dataset_size_check_replaces_small_images(server, tmp_path):
    """download.min_image_size is measured after download (the server's images are 320x240)."""
    src = write_list(tmp_path / "urls.parquet", laion_table(server.url("")).slice(0, 1))
    cfg = load_config(config_file(tmp_path, src), overrides=["download.min_image_size=300"])
    summary = run_download(cfg)
    assert summary["replaced_by_reason"] == {"too_small": 1}
    rec = read_images(tmp_path / "root").to_pylist()[0]
    assert rec["replaced"] and "too small" in rec["error_message"]


@pytest.mark.slow  # Prefect's test harness
def test_flow_artifact_lists_filtered_rows(server, tmp_path):
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.download import download_flow
    from flows.pipeline import row_counts

    src = write_list(tmp_path / "urls.jsonl", laion_table(server.url("")))
    config = config_file(tmp_path, src, **SELECTION)

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["download-stats"])))

    with prefect_test_harness(server_startup_timeout=120):
        summary = download_flow(str(config), [])
        data = asyncio.run(artifacts())[0].data
    assert summary["filtered_by_reason"] == expected_filtered()
    assert summary["rows_in"] == len(ROWS) and summary["succeeded"] == len(KEPT) - 1
    assert "filtered: pwatermark > 0.8" in data and f"{100 * 2 / len(ROWS):.1f}%" in data
    assert math.isclose(sum(summary["filtered_by_reason"].values()) + len(KEPT), summary["rows_in"])
    # what the pipeline and data-refresh flows report: selected rows, not the URL lists' length
    assert row_counts(summary) == {"rows_in": len(ROWS), "filtered": len(ROWS) - len(KEPT), "rows": len(KEPT)}


def test_muse_download_with_a_missing_column_exits_2_naming_it(tmp_path, capsys):
    src = write_list(tmp_path / "urls.csv", laion_table().drop(["AESTHETIC_SCORE"]))
    assert main(["download", "--config", str(config_file(tmp_path, src, **SELECTION))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("muse download: ") and "AESTHETIC_SCORE" in lines[0]
    assert "urls.csv" in lines[0]
    assert done_shards(Storage(str(tmp_path / "root")), IMAGES) == []


def test_dedup_keeps_the_first_of_each_url_and_never_merges_blank_ones(tmp_path):
    urls = ["http://a", "", None, "http://a", " ", "http://b", "", None, "http://b"]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": ["c"] * len(urls)}), path)
    sel = select(str(path), source_cfg([path], dedup_urls=True))
    assert sel.indices.tolist() == [0, 1, 2, 4, 5, 6, 7]  # blank/null URLs become bad_url rows instead
    assert sel.filtered == {"duplicate url": 2}
