"""prefect.yaml against a real Prefect server on 127.0.0.1: deploy, a process worker, UI-style runs.

One server, one worker and one demo subset for the module (the server costs ~10 s to start).
"""

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free port with its own PREFECT_HOME (flows/demo_ui.py, as
    `make demo-ui` starts it); yields the env to talk to it."""
    from flows.demo_ui import start_server, stop

    home = tmp_path_factory.mktemp("prefect-home")
    log = open(home / "server.log", "wb")
    try:
        proc, env = start_server(home, _free_port(), log)
    except RuntimeError:
        log.close()
        pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
    try:
        yield env
    finally:
        stop(proc)
        log.close()


def _cli(env, *args, timeout=180):
    r = subprocess.run(PREFECT + list(args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """Pools created, `prefect --no-prompt deploy --all` from prefect.yaml, a process worker on `cpu`."""
    for pool in ("cpu", "gpu"):  # the gpu pool is docker in production; process here (no docker engine)
        _cli(server, "work-pool", "create", pool, "--type", "process")
    _cli(server, "--no-prompt", "deploy", "--all", timeout=300)
    log = open(tmp_path_factory.mktemp("worker") / "worker.log", "wb")
    workers = [subprocess.Popen(PREFECT + ["worker", "start", "--pool", pool, "--type", "process"], env=server,
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT) for pool in ("cpu", "gpu")]
    try:
        yield server
    finally:
        from flows.demo_ui import stop

        for w in workers:
            stop(w)
        log.close()




def _with_api(env, coro_fn):
    """Run an async client call against the test server (not the harness or a user profile)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(coro_fn())


async def _run_deployment_like_the_ui(name: str, parameters: dict, timeout: float = 420):
    """POST a flow run for the deployment with parameters (what the UI's Run button does), poll to the end."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        dep = await client.read_deployment_by_name(name)
        run = await client.create_flow_run_from_deployment(dep.id, parameters=parameters)
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = await client.read_flow_run(run.id)
            if run.state and run.state.is_final():
                return run
            await asyncio.sleep(1)
        raise AssertionError(f"{name} run {run.id} still {run.state.name if run.state else None} after {timeout} s")


async def _task_run_names_since(t0: float) -> list[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        runs = await client.read_task_runs(limit=200)
    return sorted(r.name for r in runs if r.created and r.created.timestamp() >= t0)


async def _train_deployment_runs():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with get_client() as client:
        return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"])))


def test_refresh_cron_matches_pipeline_yaml():
    import yaml

    deps = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    schedule = yaml.safe_load((REPO / "pipeline.yaml").read_text())["schedule"]
    cron = deps["data-refresh"]["schedules"][0]
    assert (cron["cron"], cron["timezone"], cron["active"]) == (schedule["cron"], schedule["timezone"], schedule["active"])
    assert deps["train"]["parameters"]["target"] == "local"


@pytest.mark.slow
@pytest.mark.timeout(300)  # hang guard: without the pool check the hand-off waited forever
def test_handoff_with_no_worker_online_fails_at_once_naming_the_pool(server, tmp_path):
    """train_on=deployment with nobody polling the GPU pool: a loud error, not a Running pipeline."""
    from prefect.client.orchestration import get_client

    from flows.handoff import HandoffError
    from flows.train import train_flow

    _cli(server, "work-pool", "create", "gpu-idle", "--type", "process")

    async def deploy():
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("train")
            await client.create_deployment(flow_id=flow_id, name="idle", work_pool_name="gpu-idle",
                                           entrypoint="flows/train.py:train_flow")

    _with_api(server, deploy)
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"storage: {{root: {tmp_path / 'root'}}}\nsource: {{paths: [urls.jsonl]}}\n")

    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
        try:
            state = train_flow(str(config), ["train.handoff_start_timeout_s=60"], target="train/idle",
                               return_state=True)
        finally:
            # Prefect keeps one events worker per process, keyed by client type, not by server:
            # left alive it would send a later test's events to this server once it is gone
            # (each event then waits ~70 s: test_download_filters' harness timed out in CI).
            EventsWorker.drain_all(timeout=60)
    assert state.is_failed()
    with pytest.raises(HandoffError, match="no worker online in pool 'gpu-idle': start one with `prefect worker start"):
        state.result()

    async def idle_runs():
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
        )

        async with get_client() as client:
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["idle"])))

    assert _with_api(server, idle_runs) == []   # no child run left Late behind it


@pytest.mark.slow
def test_deployments_from_prefect_yaml(deployed):
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            deps = {d.name: d for d in await client.read_deployments()}
            scheds = await client.read_deployment_schedules(deps["data-refresh"].id)
            return deps, scheds

    deps, scheds = _with_api(deployed, read)
    assert set(deps) >= {"pipeline", "data-refresh", "train"}
    assert deps["train"].work_pool_name == "gpu" and deps["pipeline"].work_pool_name == "cpu"
    assert deps["pipeline"].parameters["overrides"] == [] and deps["train"].parameters["target"] == "local"
    assert len(scheds) == 1 and scheds[0].schedule.cron == "0 3 * * *"
    assert not scheds[0].active   # shipped off: the repository's pipeline.yaml names LAION files (issue 30)
    assert str(REPO) not in json.dumps(deps["pipeline"].pull_steps)   # found on the worker, at run time


@pytest.mark.slow
def test_pipeline_deployment_run_through_the_api(deployed, demo_subset, tmp_path):
    from muse.config import load_config
    from muse.storage import Storage

    out, config = demo_subset
    overrides = [f"storage.root={tmp_path / 'root'}", f"storage.work_dir={tmp_path / 'work'}",
                 "train.job_variables={env: {MUSE_HANDOFF_CHECK: passed-through}}"]
    run = _with_api(deployed, lambda: _run_deployment_like_the_ui(
        "pipeline/pipeline", {"config_path": str(config), "overrides": overrides, "train_on": "deployment"}))
    assert run.state.is_completed(), f"pipeline run ended {run.state.name}: {run.state.message}"
    train_runs = _with_api(deployed, _train_deployment_runs)   # training went to the gpu pool's worker
    assert [r.state.name for r in train_runs] == ["Completed"]
    assert train_runs[0].parameters["overrides"] == overrides
    assert train_runs[0].job_variables == {"env": {"MUSE_HANDOFF_CHECK": "passed-through"}}
    storage = Storage.from_config(load_config(config, overrides))
    assert storage.exists("checkpoints/demo/LATEST")
    assert storage.read_bytes("samples/demo-grid.png")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_data_refresh_processes_only_new_source_rows(deployed, demo_subset, tmp_path):
    from muse.config import load_config
    from muse.layout import dataset_dir
    from muse.storage import Storage

    out, config = demo_subset
    src = tmp_path / "src"
    src.mkdir()
    lines = (out / "source" / "urls.jsonl").read_text().splitlines()
    (src / "a.jsonl").write_text("\n".join(lines[:25]) + "\n")   # one shard's worth of rows
    overrides = [f"storage.root={tmp_path / 'root'}", f"storage.work_dir={tmp_path / 'work'}",
                 f"source.paths=['{src}/*.jsonl']"]
    params = {"config_path": str(config), "overrides": overrides}
    run = _with_api(deployed, lambda: _run_deployment_like_the_ui("data-refresh/data-refresh", params))
    assert run.state.is_completed(), f"refresh ended {run.state.name}: {run.state.message}"

    new = [json.loads(x) | {"sample_id": 1000 + i} for i, x in enumerate(lines[25:35])]
    (src / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new))
    t0 = time.time()
    run = _with_api(deployed, lambda: _run_deployment_like_the_ui("data-refresh/data-refresh", params))
    assert run.state.is_completed(), f"refresh ended {run.state.name}: {run.state.message}"
    names = _with_api(deployed, lambda: _task_run_names_since(t0))
    downloads = [n for n in names if n.startswith("download-") and ".jsonl" in n]
    encodes = [n for n in names if n.startswith("encode-shards-")]
    assert len(downloads) == 1 and "b.jsonl (shards 1..1)" in downloads[0], names  # a.jsonl not fetched again
    assert encodes == ["encode-shards-00001-00001"], names                      # only the new shard encoded
    cfg = load_config(config, overrides)
    manifest = Storage.from_config(cfg).read_json(f"{dataset_dir(cfg)}/_MANIFEST.json")
    assert manifest["rows"] == 35


@pytest.mark.slow
def test_demo_ui_points_the_deployments_at_its_config_so_the_refresh_run_button_works(deployed, demo_subset):
    """`make demo-ui` makes the demo config every deployment's default: data-refresh run with no
    parameters (the Run button) completes; its schedule stays inactive as shipped."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    from flows.demo_ui import DEPLOYMENTS, point_deployments_at

    out, config = demo_subset

    async def defaults():
        async with get_client() as client:
            deps = {n: await client.read_deployment_by_name(n) for n in DEPLOYMENTS}
            return deps, await client.read_deployment_schedules(deps["data-refresh/data-refresh"].id)

    _with_api(deployed, lambda: point_deployments_at(str(config)))
    deps, scheds = _with_api(deployed, defaults)
    try:
        assert {n: d.parameters["config_path"] for n, d in deps.items()} == {n: str(config) for n in DEPLOYMENTS}
        assert deps["pipeline/pipeline"].parameters["train_on"] == "local"   # the others kept
        assert [s.active for s in scheds] == [False]
        run = _with_api(deployed, lambda: _run_deployment_like_the_ui("data-refresh/data-refresh", {}))
        assert run.state.is_completed(), f"refresh ended {run.state.name}: {run.state.message}"
    finally:  # the other tests see prefect.yaml's defaults
        async def restore():
            async with get_client() as client:
                for d in deps.values():
                    await client.update_deployment(d.id, DeploymentUpdate(
                        parameters={**d.parameters, "config_path": "pipeline.yaml"}))

        _with_api(deployed, restore)


@pytest.mark.slow
def test_the_handoff_logs_the_training_runs_name_link_and_each_state(deployed, demo_subset, tmp_path):
    """train_on=deployment (issue 30, item 3): the parent's log says where the training is (the
    child's name and its UI page) and follows its states. Nothing is encoded on this root, so
    the child fails fast: its Failed state, with the reason, must show in the parent too."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.train import train_flow

    out, config = demo_subset
    overrides = [f"storage.root={tmp_path / 'root'}", f"storage.work_dir={tmp_path / 'work'}"]
    with temporary_settings({PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
        try:
            state = train_flow(str(config), overrides, target="deployment", return_state=True)
        finally:  # as in the no-worker test: send this server's logs and events before it goes
            APILogWorker.drain_all(timeout=60)
            EventsWorker.drain_all(timeout=60)
    assert state.is_failed()

    async def logs():
        async with get_client() as client:
            flow_run_id = state.state_details.flow_run_id
            return [x.message for x in await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]

    messages = _with_api(deployed, logs)
    child = _with_api(deployed, _train_deployment_runs)
    child = max(child, key=lambda r: r.created)
    ui = deployed["PREFECT_API_URL"].removesuffix("/api")
    handed = [m for m in messages if m.startswith("handed to train/train on pool 'gpu'")]
    assert handed and f"flow run '{child.name}' ({ui}/runs/flow-run/{child.id})" in handed[0], messages
    followed = [m.removeprefix(f"training run '{child.name}' is ") for m in messages
                if m.startswith(f"training run '{child.name}' is ")]
    names = [m.split(":")[0] for m in followed]
    assert names[0] == "Scheduled" and "Running" in names and names[-1] == "Failed", messages
    assert names.index("Running") < len(names) - 1 and len(set(names)) == len(names), names  # in order, once each
    assert followed[-1].startswith("Failed: ") and "no encoded dataset" in followed[-1], followed  # why, in one line
