"""Bounded fan-out and one run per storage root, in real flows under Prefect's test harness.

The library calls under the tasks are replaced by recorders (start/end times, a short sleep):
what is under test is how many of the real Prefect tasks run at once, not the encoding.
"""

import threading
import time
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow  # a Prefect test server (~10-20 s to start)


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"storage: {{root: {tmp_path / 'root'}, work_dir: {tmp_path / 'work'}}}\n"
                    "source: {paths: [urls.jsonl]}\nencode: {device: cpu}\n")
    return str(path)


# what download_flow and encode_flow return, as far as the flows above them read it (one
# stand-in plays both phases)
PHASE_RESULT = {"rows_in": 0, "rows": 0, "version": "v", "note": "nothing new: 1 source file unchanged",
                "this_run": {"rows_in": 0, "succeeded": 0, "shards": 0}}


class Recorder:
    """Stands in for a library call or a flow: records (start, end) and sleeps a little; with
    `return_state=True` its result comes in a Completed state, as a flow's does."""

    def __init__(self, result, sleep_s=0.3):
        self.result, self.sleep_s, self.spans, self.lock = result, sleep_s, [], threading.Lock()

    def __call__(self, *args, **kwargs):
        start = time.monotonic()
        time.sleep(self.sleep_s)
        with self.lock:
            self.spans.append((start, time.monotonic()))
        out = self.result(*args) if callable(self.result) else self.result
        if kwargs.get("return_state"):
            from prefect.states import Completed

            return Completed(data=out)
        return out

    def most_at_once(self) -> int:
        events = sorted([(s, 1) for s, _ in self.spans] + [(e, -1) for _, e in self.spans])
        now = peak = 0
        for _, step in events:  # an end sorts before a start at the same instant
            now += step
            peak = max(peak, now)
        return peak


def test_25_encode_shards_with_a_limit_of_2_never_run_more_than_2_at_once(harness, config, monkeypatch):
    import flows.encode as enc

    shard = Recorder(lambda cfg, sid: {"rows": 1, "bytes": 1, "replaced": 0})
    monkeypatch.setattr(enc, "encode_shard", shard)
    monkeypatch.setattr(enc, "plan_encode", lambda cfg: list(range(25)))
    monkeypatch.setattr(enc, "finalize_manifest", lambda cfg: {"version": "v", "rows": 25, "replaced": 0,
                                                                "pending": [], "shards": list(range(25))})
    out = enc.encode_flow(config, ["encode.max_parallel_shards=2", "encode.shards_per_task=1"])
    assert out["rows"] == 25 and len(shard.spans) == 25
    assert shard.most_at_once() == 2


def test_download_tasks_respect_max_parallel_tasks(harness, config, monkeypatch):
    import flows.download as dl
    from muse.download import DownloadPlan

    part = Recorder([])
    monkeypatch.setattr(dl, "download_chunk", part)
    monkeypatch.setattr(dl, "plan_run", lambda cfg: DownloadPlan([SimpleNamespace(label=f"s{i}.jsonl") for i in range(6)],
                                                                  6, 0))
    monkeypatch.setattr(dl, "finalize_download", lambda cfg: {})
    monkeypatch.setattr(dl, "summarize_run", lambda cfg, stats: {"rows_in": 0, "succeeded": 0, "shards": []})
    monkeypatch.setattr(dl, "run_rows", lambda run, summary: [{"rows": 0}])
    dl.download_flow(config, ["download.max_parallel_tasks=3"])
    assert len(part.spans) == 6 and part.most_at_once() == 3


def test_two_data_refresh_runs_on_one_root_never_overlap(harness, config, monkeypatch):
    """A scheduled and a manual data-refresh at once: the second waits for the root."""
    import flows.pipeline as pl

    phase = Recorder(PHASE_RESULT, sleep_s=1.0)
    monkeypatch.setattr(pl, "download_flow", phase)
    monkeypatch.setattr(pl, "encode_flow", phase)
    errors = []

    def refresh():
        try:
            pl.data_refresh_flow(config, [])
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=refresh) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(phase.spans) == 4
    assert phase.most_at_once() == 1


def test_torchrun_output_reaches_the_run_log_and_a_failure_ends_with_its_last_lines(harness, config):
    """No encoded data: the rank's own message must be in the task's log and in the TrainError."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    from flows.train import train_flow
    from muse.launch import TrainError

    state = train_flow(config, ["train.device=cpu", "train.nproc_per_node=1"], target="local", return_state=True)
    assert state.is_failed()
    with pytest.raises(TrainError, match="(?s)exited with code .*its last lines:.*no encoded dataset"):
        state.result()

    async def task_logs():
        async with get_client() as client:
            runs = await client.read_task_runs()
            run = next(r for r in runs if r.name == "torchrun" and r.flow_run_id == state.state_details.flow_run_id)
            for _ in range(30):  # logs reach the server in batches
                logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id])))
                if any("no encoded dataset" in x.message for x in logs):
                    return logs
                await asyncio.sleep(1)
            return logs

    messages = [x.message for x in asyncio.run(task_logs())]
    assert any(m.startswith("muse train: no encoded dataset") for m in messages), messages[-20:]


def test_a_refresh_whose_url_list_is_missing_fails_with_one_line_naming_the_key_and_file(harness, config):
    """The repository's pipeline.yaml on a fresh checkout (issue 30, item 4): no traceback in the
    run's log, one error line with `source.paths`, the file and what to do."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter,
                                                LogFilterFlowRunId)
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import data_refresh_flow

    state = data_refresh_flow(config, [], return_state=True)
    assert state.is_failed()
    assert state.message.startswith(f"{config}: source.paths: file not found: 'urls.jsonl' (")
    assert "\n" not in state.message and "override \"source.paths=" in state.message
    APILogHandler().flush()   # logs reach the server in batches
    parent = state.state_details.flow_run_id

    async def logs():
        async with get_client() as client:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
            ids = [parent] + [r.id for r in children]
            return children, await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))

    children, records = asyncio.run(logs())
    assert [r.state.name for r in children] == ["Failed"]          # the download sub-flow
    errors = [x.message for x in records if x.level >= 40]
    assert len(errors) == 1 and errors[0] == state.message, errors
    assert not any("Traceback" in x.message for x in records), [x.message for x in records]


def _run_logs(flow_run_id=None, after=None) -> list:
    """The server's log records of one flow run, or of all runs since `after`, oldest first."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()   # logs reach the server in batches
    log_filter = (LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])) if flow_run_id
                  else LogFilter(timestamp=LogFilterTimestamp(after_=after)))

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC)

    return asyncio.run(read())


WAITING = "waiting for the storage root"


def test_waiting_for_the_root_is_logged_only_while_another_run_holds_it(harness, config, monkeypatch):
    """Issue 30 item 8: every run logged "waiting for the storage root", the root free or not."""
    from datetime import datetime, timezone

    from prefect.concurrency.sync import concurrency

    import flows.pipeline as pl
    from flows.common import cfg_from
    from flows.limits import lease_name

    phase = Recorder(PHASE_RESULT, sleep_s=0.1)
    monkeypatch.setattr(pl, "download_flow", phase)
    monkeypatch.setattr(pl, "encode_flow", phase)
    alone = pl.data_refresh_flow(config, [], return_state=True)
    assert alone.is_completed()
    messages = [x.message for x in _run_logs(alone.state_details.flow_run_id)]
    assert messages and not any(WAITING in m for m in messages), messages

    states, since = [], datetime.now(timezone.utc)
    with concurrency(lease_name(cfg_from(config, [])), occupy=1, strict=True):   # another run holds the root
        blocked = threading.Thread(target=lambda: states.append(pl.data_refresh_flow(config, [], return_state=True)))
        blocked.start()
        deadline = time.monotonic() + 60
        while not (waits := [x for x in _run_logs(after=since) if WAITING in x.message]):
            assert time.monotonic() < deadline, "the second run never said it waits"
            time.sleep(0.5)
        assert len(phase.spans) == 2   # (the first run's two phases): the second one waits
    blocked.join(120)
    assert states and states[0].is_completed() and len(phase.spans) == 4
    assert [x.flow_run_id for x in waits] == [states[0].state_details.flow_run_id]


def test_the_pipeline_ends_with_a_one_line_summary_and_keeps_the_whole_result_as_an_artifact(harness, config,
                                                                                               monkeypatch):
    """Issue 30 item 8: the run's last line was its ~1,000-character result dict."""
    import asyncio
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    import flows.pipeline as pl

    samples = [f"/root/samples/demo-{i:03d}.png" for i in range(24)] + ["/root/samples/demo-grid.png"]
    monkeypatch.setattr(pl, "missing_sources", lambda cfg, path: None)
    monkeypatch.setattr(pl, "download_flow", lambda *a: {"rows_in": 1202, "succeeded": 1198,
                                                         "filtered_by_reason": {"too_small": 2}})
    monkeypatch.setattr(pl, "encode_flow", lambda *a: {"rows": 1200, "version": "v1-abc"})
    monkeypatch.setattr(pl, "train_flow", lambda *a, **k: "/root/checkpoints/demo/step-00002500")
    monkeypatch.setattr(pl, "sample_task", lambda *a: samples)
    monkeypatch.setattr(pl, "report_task", lambda *a: None)
    state = pl.pipeline_flow(config, [], return_state=True)
    assert state.is_completed()
    run_id = state.state_details.flow_run_id
    mine = [x.message for x in _run_logs(run_id) if not x.message.startswith(("Beginning flow run", "Finished in"))]
    assert mine[-1] == ("pipeline done: 1200 rows (2 replaced by placeholders, 2 filtered out), 1200 encoded "
                        "(dataset v1-abc), checkpoint /root/checkpoints/demo/step-00002500, 25 sample files; "
                        "all in the artifact pipeline-result"), mine

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                any_=[run_id])))

    result = [a for a in asyncio.run(artifacts()) if a.key == "pipeline-result"]
    assert len(result) == 1
    body = result[0].data.removeprefix("```json\n").removesuffix("\n```")
    assert json.loads(body) == state.result()
