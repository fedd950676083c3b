"""`encode.fanout: deployments`: each chunk of shards is one flow run of the `encode-chunk`
deployment (prefect.yaml, work pool `gpu`), so the pool's workers (one per GPU machine, or a
Kubernetes / Vertex / Cloud Run pool that starts a machine per run) share the encode.

The `encode` flow stays the parent: it submits one run per chunk with `run_deployment(...,
timeout=0)`, keeps at most `encode.max_parallel_shards` in flight, and writes the manifest once at
the end (flows/encode.py). No scheduler of our own beyond that bounded loop:
- transient errors inside a chunk are retried by the chunk's Prefect task (`encode_chunk_task`:
  retries with RETRY_DELAYS, and a retry skips the shards already done); a chunk run that still
  ends Failed is reported, not re-submitted (what is left is permanent);
- a chunk run that ends Crashed (its process or machine died) is submitted again, at most
  `encode.chunk_tries` runs per chunk. A worker killed with its flow run leaves that run Running
  in Prefect 3 (no server process watches it); Prefect's own answer is heartbeats: every flow run
  emits `prefect.flow-run.heartbeat` events (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, default 180 s,
  min 30 s), and an automation with a proactive trigger marks a run Crashed when they stop for
  `encode.crashed_after_s` (Prefect's "detect zombie flows" recipe, scoped here to this
  deployment's runs). `crash_detection` creates that automation once on the server.

Never encoded twice into the manifest: a shard is done when its record is written after its
Parquet file (muse/encode/shards.py; both atomic: a temp file renamed, or a GCS object that exists
only once uploaded), a re-run chunk skips done shards, and the manifest is rebuilt from the
records, one per shard id. A re-submit happens only after the old run is Crashed: its process is
gone, or (a run whose heartbeats stopped while its process lives on) it writes the same bytes to
the same names, so whichever lands last is a whole, identical shard. Done means encoded from the image
shard's newest generation (`encoded_among`): after a retry pass, a chunk re-encodes the shards it
rewrote into their new generation's names and skips the rest.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment

from flows.handoff import online_pool, run_link
from muse.encode.shards import encoded_among
from muse.layout import dataset_dir, done_marker, format_shard_id
from muse.storage import Storage

POLL_S = 2.0
TERMINAL = ("Completed", "Failed", "Cancelled", "Crashed")


@flow(name="encode-chunk", log_prints=True)
def encode_chunk_flow(config_path: str, overrides: list[str], shard_ids: list[int]) -> dict:
    """One chunk of image shards -> encoded shards (the threads fan-out's task, with its
    transient-error retries); returns {shard id: record} of the shards it encoded now.
    Started by the `encode` flow with `encode.fanout: deployments`, one run per chunk.

    Args:
        config_path: the pipeline.yaml of the encode run: a path on the worker or a gs:// URL
        overrides: `key=value` strings applied on top (as `muse --set`), those of the encode run
        shard_ids: the image shards of this chunk; shards already encoded are skipped
    """
    from flows.encode import encode_chunk_task  # here: flows/encode.py imports this module

    return encode_chunk_task(config_path, list(overrides or []), list(shard_ids))


def chunk_label(ids: list[int]) -> str:
    return f"encode-shards-{format_shard_id(ids[0])}-{format_shard_id(ids[-1])}"


def crash_detection(client, deployment: str, within_s: int) -> str:
    """The automation that marks a run of `deployment` Crashed once its heartbeats stop for
    `within_s` seconds (created, or replaced when its settings differ); returns its name."""
    from prefect.automations import AutomationCore
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    dep = client.read_deployment_by_name(deployment)
    name = f"muse: crash silent {deployment} runs"
    wanted = AutomationCore(
        name=name, description="encode.fanout: deployments re-submits a chunk whose run is Crashed "
        "(flows/encode_remote.py); this marks one whose heartbeats stopped (its machine or worker died)",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat"} | {f"prefect.flow-run.{s}" for s in TERMINAL},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.id": f"prefect.deployment.{dep.id}"}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s} s: its worker or machine died")])
    key = json.loads(wanted.trigger.model_dump_json())
    existing = client.read_automations_by_name(name)
    if len(existing) == 1 and json.loads(existing[0].trigger.model_dump_json()) == key and existing[0].enabled:
        return name
    for old in existing:
        client.delete_automation(old.id)
    client.create_automation(wanted)
    return name


class ChunkRuns:
    """The bounded submit loop: a flow run per chunk, at most `limit` in flight; a chunk whose run
    ends Crashed is submitted again while it has tries left. `ended[i]`: chunk i's outcome."""

    def __init__(self, client, cfg, config_path: str, overrides: list[str], chunks: list[list[int]], limit: int):
        self.client, self.cfg, self.chunks, self.limit = client, cfg, chunks, limit
        self.params = {"config_path": config_path, "overrides": list(overrides)}
        self.todo, self.tries = list(range(len(chunks))), [0] * len(chunks)
        self.running: dict = {}  # flow run id -> chunk index
        self.ended: dict[int, ChunkOutcome] = {}
        self.log = get_run_logger()

    def fill(self) -> None:
        while self.todo and len(self.running) < self.limit:
            i = self.todo.pop(0)
            self.tries[i] += 1
            name = chunk_label(self.chunks[i]) + (f" (try {self.tries[i]})" if self.tries[i] > 1 else "")
            run = run_deployment(name=self.cfg.encode.chunk_deployment, flow_run_name=name, timeout=0,
                                 parameters=self.params | {"shard_ids": self.chunks[i]})
            self.running[run.id] = i

    def poll(self) -> None:
        for run_id, i in list(self.running.items()):
            run = self.client.read_flow_run(run_id)
            if not (run.state and run.state.is_final()):
                continue
            del self.running[run_id]
            if run.state.is_crashed() and self.tries[i] < self.cfg.encode.chunk_tries:
                self.log.warning(f"{run.name} ({run_link(run)}) ended Crashed ({run.state.message}): "
                                 f"submitted again, try {self.tries[i] + 1} of {self.cfg.encode.chunk_tries}")
                self.todo.insert(0, i)
            else:
                self.ended[i] = ChunkOutcome(self.cfg, self.chunks[i], run)


class ChunkOutcome:
    """A finished chunk, read like the threads fan-out's futures: `result()` is {shard id: record}
    (read back from storage: the records are the truth the manifest is built from) or raises."""

    def __init__(self, cfg, ids: list[int], run: FlowRun):
        self.cfg, self.ids, self.run = cfg, ids, run

    def result(self) -> dict:
        if not self.run.state.is_completed():
            raise RuntimeError(f"{chunk_label(self.ids)}: flow run '{self.run.name}' ({run_link(self.run)}) ended "
                               f"{self.run.state.name}: {self.run.state.message}")
        storage, ds = Storage.from_config(self.cfg), dataset_dir(self.cfg)
        storage.invalidate()  # written by another process
        done = encoded_among(storage, ds, self.ids)  # of the image shard's newest generation only
        blobs = storage.read_many([done_marker(ds, sid, gen) for sid, gen in done.items()])
        return {sid: json.loads(blobs[done_marker(ds, sid, gen)]) for sid, gen in done.items()}


def run_chunks(cfg, config_path: str, overrides: list[str], chunks: list[list[int]]):
    """Yield each chunk's outcome in chunk order, once its flow run has ended (as `submit_bounded`
    yields futures). HandoffError at once when no worker is online in the deployment's pool."""
    if not chunks:
        return
    e = cfg.encode
    with get_client(sync_client=True) as client:
        pool = online_pool(client, e.chunk_deployment)
        crash_detection(client, e.chunk_deployment, e.crashed_after_s)
        # null: one chunk per online worker (a pool that starts machines per run: set it)
        workers = client.read_workers_for_work_pool(
            pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
        limit = e.max_parallel_shards or max(len(workers), 1)
        get_run_logger().info(f"{len(chunks)} chunk(s) as flow runs of {e.chunk_deployment} on pool '{pool}', "
                              f"{limit} at once")
        runs = ChunkRuns(client, cfg, config_path, overrides, chunks, limit)
        for i in range(len(chunks)):
            while i not in runs.ended:
                runs.fill()
                time.sleep(POLL_S)
                runs.poll()
            yield runs.ended.pop(i)
