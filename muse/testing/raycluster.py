"""A real Ray cluster of several nodes on 127.0.0.1, for tests/test_ray.py and bench/encode_ray.py.

Each node is one `ray start --block` (the head first, then `--address` to it) declaring
`gpus` logical GPUs and `cpus` CPUs; the work on them runs on the CPU. Each runs in a session
of its own, so its Ray processes (GCS, raylet, agents, and the workers, which Ray puts in
process groups of their own but not in new sessions) are that session's, and `stop()` kills
them by it: no `ray stop`, which would end every Ray on the machine.
Every address stays on loopback (Ray otherwise advertises the machine's interface address).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """The live processes of one session (read from /proc: no `ps` parsing); a killed one
    waiting to be reaped (a zombie) is not counted."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # /proc/<pid>/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RayCluster:
    """`with RayCluster(nodes=2) as c:` ... `c.address` (for ray.init / RAY_ADDRESS)."""

    def __init__(self, nodes: int = 2, gpus: int = 1, cpus: int = 1, env: dict | None = None,
                 start_timeout_s: float = 180.0):
        self.nodes, self.gpus, self.cpus, self.start_timeout_s = nodes, gpus, cpus, start_timeout_s
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **(env or {}))
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        # short paths: Ray's unix sockets live under the temp dir (a socket path has ~107 bytes)
        self.root = Path(tempfile.mkdtemp(prefix="muse-ray-"))
        self.address = f"127.0.0.1:{_free_port()}"

    def _start_node(self, i: int) -> None:
        tmp = self.root / f"n{i}"
        tmp.mkdir()
        args = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.cpus}", f"--num-gpus={self.gpus}", f"--temp-dir={tmp}",
                "--object-store-memory=100000000", "--disable-usage-stats"]
        if i == 0:
            args += ["--head", f"--port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=false",
                     f"--ray-client-server-port={_free_port()}", f"--node-manager-port={_free_port()}"]
        else:
            args += [f"--address={self.address}", f"--node-manager-port={_free_port()}"]
        log = open(self.root / f"n{i}.log", "wb")  # noqa: SIM115 - the node's own process owns it
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           stdin=subprocess.DEVNULL, start_new_session=True))

    def _wait_for_nodes(self, n: int) -> None:
        """Until `n` nodes are alive (asked in a child: this process stays out of Ray)."""
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"ray start exited: see {self.root}/n*.log")
            out = subprocess.run([sys.executable, "-c", probe, self.address], capture_output=True, text=True,
                                 env=self.env, timeout=self.start_timeout_s)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(1.0)
        raise TimeoutError(f"{n} Ray node(s) not up in {self.start_timeout_s:.0f} s: see {self.root}/n*.log")

    def _wait_for_head(self) -> None:
        """Until the head's GCS port takes connections: a node can join from then on."""
        host, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"ray start --head exited: see {self.root}/n0.log")
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"Ray head not listening in {self.start_timeout_s:.0f} s: see {self.root}/n0.log")

    def start(self) -> "RayCluster":
        try:
            self._start_node(0)
            self._wait_for_head()
            for i in range(1, self.nodes):
                self._start_node(i)
            self._wait_for_nodes(self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def pids(self, node: int) -> list[int]:
        return _session_pids(self.procs[node].pid)

    def kill_raylet(self, node: int) -> int:
        """SIGKILL the raylet of `node` (as a lost machine): its workers die with it."""
        for pid in self.pids(node):
            try:
                if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                    os.kill(pid, signal.SIGKILL)
                    return pid
            except (OSError, ProcessLookupError):
                pass
        raise RuntimeError(f"no raylet in node {node}'s process group")

    def stop(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            left = [pid for proc in reversed(self.procs) for pid in _session_pids(proc.pid)]
            if not left or time.monotonic() > deadline:
                break
            _kill(left)  # again while any is left: one may have been forking during the first
            time.sleep(0.2)
        for proc in self.procs:
            proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
        if left:
            raise RuntimeError(f"Ray processes {left} outlived SIGKILL")

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
