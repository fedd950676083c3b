"""Hand a flow run to a deployment on another work pool (training on the GPU pool), loudly.

`run_deployment` alone waits forever when no worker polls the pool: the parent sits Running
and the child goes Late. Here we first require an online worker in the deployment's pool,
then require the run to start within `train.handoff_start_timeout_s` (else it is cancelled),
then wait for it to end. `train.job_variables` (image, env, machine type) pass through.
The parent's log names the child run with a link to it in the UI, and logs each state the
child passes through (Scheduled, Pending, Running, ..., its final state) while it waits:
the training's own output is in the child run.
"""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_UI_URL
from prefect.states import Cancelled

POLL_S = 5.0


class HandoffError(RuntimeError):
    """The deployment cannot run: no worker online in its pool, or its run never started."""


def online_pool(client, name: str) -> str:
    """The deployment's work pool, if a worker is online in it; HandoffError otherwise."""
    pool = client.read_deployment_by_name(name).work_pool_name
    online = client.read_workers_for_work_pool(pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
    if not online:
        raise HandoffError(f"no worker online in pool '{pool}': start one with `prefect worker start --pool {pool}` "
                           f"on a machine of that pool (or start the pool's infrastructure), then re-run; "
                           f"deployment {name} was not started")
    return pool


def run_link(run: FlowRun) -> str:
    """The run's page in the UI when a UI address is known (PREFECT_UI_URL, which Prefect derives
    from PREFECT_API_URL for a self-hosted server), else its id as plain text."""
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{run.id}" if ui else f"id {run.id}"


class StateLog:
    """Logs every state a flow run passes through, once each, in order: read from the run's
    state history at each poll, so a short Pending between two polls is not missed."""

    def __init__(self, client, run: FlowRun, log):
        self.client, self.run, self.log, self.seen = client, run, log, set()

    def __call__(self) -> None:
        for state in sorted(self.client.read_flow_run_states(self.run.id), key=lambda s: s.timestamp):
            if state.id not in self.seen:
                self.seen.add(state.id)
                why = f": {one_line(state.message)}" if state.message and state.is_final() else ""
                self.log.info(f"training run '{self.run.name}' is {state.name}{why}")


def one_line(message: str, width: int = 300) -> str:
    """A state message on one line: its first line and, for a TrainError (which ends with
    torchrun's last lines), the last of the trainer's own `muse ...:` error lines."""
    lines = [x.strip() for x in message.splitlines() if x.strip()] or [""]
    cause = next((x for x in reversed(lines[1:]) if x.startswith("muse ")), None)
    return lines[0][:width] + (f" ... {cause[:width]}" if cause else "")


def hand_off(name: str, parameters: dict, job_variables: dict, start_timeout_s: float) -> FlowRun:
    """Run deployment `name` and wait for its final state; fail fast if it cannot start."""
    log = get_run_logger()
    with get_client(sync_client=True) as client:
        pool = online_pool(client, name)
        run = run_deployment(name=name, parameters=parameters, job_variables=job_variables or None, timeout=0)
        log.info(f"handed to {name} on pool '{pool}': flow run '{run.name}' ({run_link(run)}); "
                 "its log holds the training's output")
        states = StateLog(client, run, log)
        states()
        deadline = time.monotonic() + start_timeout_s
        while not (run.state and (run.state.is_running() or run.state.is_final())):
            if time.monotonic() > deadline:
                client.set_flow_run_state(run.id, Cancelled(message="did not start within the hand-off timeout"),
                                          force=True)
                raise HandoffError(f"flow run '{run.name}' ({run.id}) of {name} did not start within "
                                   f"train.handoff_start_timeout_s="
                                   f"{start_timeout_s:g}s (state {run.state.name if run.state else None}) and was "
                                   f"cancelled: check that the worker on pool '{pool}' can start its job "
                                   f"(image, machine type, quota) in its log")
            time.sleep(POLL_S)
            run = client.read_flow_run(run.id)
            states()
        while not run.state.is_final():
            time.sleep(POLL_S)
            run = client.read_flow_run(run.id)
            states()
    return run
