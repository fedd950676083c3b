"""`make demo-ui`: the tiny demo world on a local Prefect server, to click through the UI.

    python -m flows.demo_ui --output demo-ui-output        # Ctrl-C stops everything

Starts `prefect server start` (its own PREFECT_HOME under the output folder), creates the
`cpu` and `gpu` pools (process type, both on this machine), deploys `prefect.yaml`, starts
one worker per pool, makes the demo config every deployment's default `config_path` (so
the Run buttons, data-refresh's included, work), keeps the demo's image server alive, triggers the `pipeline`
deployment on the demo config with `train_on=deployment`, prints the UI address and waits.
`--until-done` exits when that run ends instead (0 if Completed): what the test does.

Ctrl-C, SIGTERM or a closed terminal stop it all: workers, server, and every process below
them (flow runs, torchrun and its ranks), which this process adopts when their parent goes
(`muse.lifecycle.adopt_orphans`), so none is left training on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import flows.demo  # noqa: F401 - its environment defaults: offline hub, no telemetry
from muse.lifecycle import adopt_orphans, end_descendants, reap_children

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def free_port(preferred: int) -> int:
    """`preferred` when a server could listen on it, else any free port. Probed with SO_REUSEADDR,
    as uvicorn (the Prefect server) binds: a port left in TIME_WAIT by the last run is free to
    it, and without the option a restart within a minute moved the UI off 4200 (issue 30 item 7)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server(home: Path, port: int, log) -> tuple[subprocess.Popen, dict]:
    """A Prefect server on 127.0.0.1:port with its own PREFECT_HOME; (process, env to reach it)."""
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MUSE_PIPELINE_DIR": str(REPO),
           "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
    proc = subprocess.Popen(PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2).read()
            return proc, env
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop(proc)
                raise RuntimeError(f"prefect server did not start; see {log.name}") from None
            time.sleep(0.5)


def prefect_cli(env: dict, *args: str) -> None:
    r = subprocess.run(PREFECT + list(args), env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if r.returncode and "already exists" not in r.stdout + r.stderr:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


DEPLOYMENTS = ("pipeline/pipeline", "data-refresh/data-refresh", "train/train")


async def point_deployments_at(config: str) -> None:
    """Make `config` the default `config_path` of every deployment, so the UI's Run buttons (the
    data-refresh one included) run the demo world, not the repository's LAION pipeline.yaml.
    The data-refresh schedule stays as prefect.yaml ships it (inactive)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    async with get_client() as client:
        for name in DEPLOYMENTS:
            dep = await client.read_deployment_by_name(name)
            params = {**dep.parameters, "config_path": config}
            await client.update_deployment(dep.id, DeploymentUpdate(parameters=params))


async def free_stale_root(config: str, overrides: list[str]) -> None:
    """Drop the demo storage root's concurrency limit before the run starts. Nothing of this demo
    runs yet, so a slot still held is a leftover of a demo-ui stopped mid-run (a killed flow run
    does not give it back), and the server kept that lease in memory: after its restart nothing
    frees the slot, and the new run waited for the root (seen for minutes, until stopped)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.limits import lease_name
    from muse.config import load_config

    async with get_client() as client:
        try:
            await client.delete_global_concurrency_limit_by_name(lease_name(load_config(config, overrides)))
        except ObjectNotFound:  # a first run: root_lease creates it
            pass


async def trigger_and_wait(config: str, overrides: list[str], wait: bool):
    """Start the `pipeline` deployment (what the UI's Run button does); with `wait`, poll to the end."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        dep = await client.read_deployment_by_name("pipeline/pipeline")
        run = await client.create_flow_run_from_deployment(
            dep.id, parameters={"config_path": config, "overrides": overrides, "train_on": "deployment"})
        print(f"demo-ui: started flow run {run.name} ({run.id})", flush=True)
        while wait and not (run.state and run.state.is_final()):
            await asyncio.sleep(2)
            run = await client.read_flow_run(run.id)
        return run


def serve(args, config: Path, home: Path, log, procs: list[subprocess.Popen]) -> int:
    """Server, pools, deployments, workers (each appended to `procs` as started), the pipeline run."""
    server, env = start_server(home, free_port(args.port), log)
    procs.append(server)
    for pool in ("cpu", "gpu"):  # both on this machine; in production gpu is a GPU pool
        prefect_cli(env, "work-pool", "create", pool, "--type", "process")
    prefect_cli(env, "--no-prompt", "deploy", "--all")
    procs += [subprocess.Popen(PREFECT + ["worker", "start", "--pool", pool, "--type", "process"], env=env,
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT) for pool in ("cpu", "gpu")]
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ui = env["PREFECT_API_URL"].removesuffix("/api")
    print(f"demo-ui: Prefect UI at {ui} (logs {log.name}); Ctrl-C stops the server, workers and runs", flush=True)
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        asyncio.run(point_deployments_at(str(config)))
        asyncio.run(free_stale_root(str(config), args.set))
        run = asyncio.run(trigger_and_wait(str(config), args.set, args.until_done))
    if args.until_done:
        print(f"demo-ui: pipeline run ended {run.state.name}", flush=True)
        return 0 if run.state.is_completed() else 1
    while True:
        time.sleep(5)
        reap_children()  # processes adopted by `adopt_orphans` that have exited (img2dataset's helpers)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def shutdown(procs: list[subprocess.Popen]) -> None:
    """Workers, then the server, then every process still below this one: flow runs a stopped
    worker left, torchrun and its ranks (adopted here by `adopt_orphans` when their parent went)."""
    for s in STOP_SIGNALS:  # a second Ctrl-C must not cut the clean-up short and leave orphans
        signal.signal(s, signal.SIG_IGN)
    for p in reversed(procs):
        stop(p)
    if killed := end_descendants(grace_s=20):
        print(f"demo-ui: killed {len(killed)} processes that had not stopped 20 s after SIGTERM", flush=True)


def main(argv=None) -> int:
    from muse.config import load_config
    from muse.testing import demo
    from muse.testing.imageserver import ImageServer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="demo-ui-output")
    ap.add_argument("--port", type=int, default=4200, help="the UI's port (another if taken)")
    ap.add_argument("--quick", action="store_true", help="the tests' smaller world (50 rows, 40 steps)")
    ap.add_argument("--until-done", action="store_true", help="exit when the pipeline run ends")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting on top of the demo config for the run it starts, e.g. train.max_steps=100")
    args = ap.parse_args(argv)
    out = Path(args.output).resolve()
    # SIGTERM (kill, a service manager) and a closed terminal stop everything as Ctrl-C does: on
    # main SIGTERM skipped the clean-up and left the server, workers and training running
    for s in STOP_SIGNALS:
        signal.signal(s, _interrupt)
    adopt_orphans()
    procs: list[subprocess.Popen] = []
    try:
        config, images = demo.prepare(out, quick=args.quick)
        load_config(config, args.set)  # a bad --set fails here, naming its key, before any server starts
        home = out / "prefect-home"
        home.mkdir(parents=True, exist_ok=True)
        with ImageServer(images, port=demo.PORT) as srv, open(home / "server-and-workers.log", "ab") as log:
            demo.write_urls(out, srv.url())
            return serve(args, config, home, log, procs)
    except KeyboardInterrupt as e:
        print(f"\ndemo-ui: {e.args[0] if e.args else 'SIGINT'}: stopping the server, workers and runs", flush=True)
        return 0
    finally:
        shutdown(procs)


if __name__ == "__main__":
    sys.exit(main())
