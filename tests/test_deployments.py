"""A real Prefect server on 127.0.0.1: deploy prefect.yaml, run a process worker, trigger runs like the UI.

Checks: the `pipeline` deployment completes with parameters given through the API; the
`data-refresh` deployment carries an active cron schedule; a refresh after a new source
file is added fetches and encodes only the new rows.
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from muse import demo
from muse.config import load_config
from muse.encode import dataset_dir
from muse.storage import Storage

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_bin() -> str:
    return shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _port()
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PYTHONPATH": str(REPO),
           "MUSE_PIPELINE_DIR": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([_prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("prefect server did not start: " + (home / "server.log").read_text()[-2000:])
    yield env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def _cli(env, *args, timeout=180):
    out = subprocess.run([_prefect_bin(), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    for pool in ("cpu", "gpu"):
        _cli(server, "work-pool", "create", pool, "--type", "process")
    _cli(server, "--no-prompt", "deploy", "--all")
    logdir = tmp_path_factory.mktemp("worker")
    worker = subprocess.Popen([_prefect_bin(), "worker", "start", "--pool", "cpu", "--type", "process"],
                              env=server, cwd=REPO, stdout=open(logdir / "worker.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    yield server
    os.killpg(worker.pid, signal.SIGTERM)
    worker.wait(timeout=30)


def _client_call(env, coro_fn):
    """Run `coro_fn(client)` against the test server."""
    from prefect.client.orchestration import PrefectClient

    async def go():
        async with PrefectClient(api=env["PREFECT_API_URL"]) as client:
            return await coro_fn(client)

    return asyncio.run(go())


def _run_deployment(env, name, parameters, timeout=400):
    """Create a flow run from the deployment with parameters (what the UI's Run button does), wait for it."""
    async def create(client):
        dep = await client.read_deployment_by_name(name)
        return await client.create_flow_run_from_deployment(dep.id, parameters=parameters)

    run = _client_call(env, create)
    deadline = time.time() + timeout
    while time.time() < deadline:
        fr = _client_call(env, lambda c: c.read_flow_run(run.id))
        if fr.state and fr.state.is_final():
            return fr
        time.sleep(2)
    pytest.fail(f"flow run of {name} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config, images = demo.prepare(out)
    with demo.ImageServer(images, port=0) as url:
        demo.write_urls(out, url)
        yield out, config, url


def test_pipeline_deployment_runs_from_the_api_with_parameters(deployed, demo_files, tmp_path):
    out, config, _ = demo_files
    overrides = [f"storage.root={tmp_path / 'root'}", f"storage.work_dir={tmp_path / 'work'}"]
    fr = _run_deployment(deployed, "pipeline/pipeline", {"config_path": str(config), "overrides": overrides})
    assert fr.state.is_completed(), fr.state
    assert fr.parameters["overrides"] == overrides
    storage = Storage.from_config(load_config(config, overrides))
    assert storage.exists("checkpoints/demo/LATEST") and storage.exists("samples/demo-grid.png")


def test_data_refresh_is_scheduled_and_incremental(deployed, demo_files, tmp_path):
    dep = _client_call(deployed, lambda c: c.read_deployment_by_name("data-refresh/data-refresh"))
    assert dep.schedules and dep.schedules[0].active
    assert dep.schedules[0].schedule.cron == "0 3 * * *"
    out, config, url = demo_files
    overrides = [f"storage.root={tmp_path / 'root'}", f"storage.work_dir={tmp_path / 'work'}"]
    fr = _run_deployment(deployed, "data-refresh/data-refresh", {"config_path": str(config), "overrides": overrides})
    assert fr.state.is_completed(), fr.state
    cfg = load_config(config, overrides)
    storage = Storage.from_config(cfg)
    first = {p: storage.read_bytes(p) for p in storage.list("images", ".parquet")}
    first_mtimes = {p: os.path.getmtime(storage.path(p)) for p in first}
    # a new source file arrives: only its rows are fetched and encoded
    extra = tmp_path / "more.jsonl"
    extra.write_text("".join(json.dumps({"url": f"{url}/000-red-circle.jpg", "caption": f"new row {i}"}) + "\n"
                             for i in range(5)))
    src = cfg.source.paths + [str(extra)]
    overrides2 = overrides + ["source.paths=" + json.dumps(src)]
    fr = _run_deployment(deployed, "data-refresh/data-refresh", {"config_path": str(config), "overrides": overrides2})
    assert fr.state.is_completed(), fr.state
    after = storage.list("images", ".parquet")
    assert set(first) < set(after) and len(after) == len(first) + 1
    for p in first:  # old shards untouched
        assert storage.read_bytes(p) == first[p] and os.path.getmtime(storage.path(p)) == first_mtimes[p]
    manifest = storage.read_json(f"{dataset_dir(cfg)}/_MANIFEST.json")
    assert manifest["rows"] == 50 + 5
