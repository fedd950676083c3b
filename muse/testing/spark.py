"""A real Spark standalone cluster on 127.0.0.1 (one master, one worker) for the download tests.

`with SparkStandalone(tmp) as cluster: cluster.master_url` -> "spark://127.0.0.1:PORT".
It runs the master and the worker with the `spark-class` script that the pyspark wheel ships
(the wheel has no sbin/start-master.sh), each in its own process group, on free ports, with
every directory (logs, work, scratch, an empty conf dir so no user spark-defaults.conf leaks in)
under `tmp`. Leaving the block stops both groups,
executors and Python workers included, and waits until no process of them is left.
Needs pyspark and Java 17.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MASTER = "org.apache.spark.deploy.master.Master"
WORKER = "org.apache.spark.deploy.worker.Worker"
# short-lived JVMs on a busy 2-core machine: the C1 compiler alone and the serial collector
# start faster and burn less CPU than C2 + G1's threads (these JVMs run seconds, not hours)
LIGHT_JVM = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


class SparkStandalone:
    """A master and one worker with `cores` cores and `memory` (Spark's size syntax, e.g. 1g).

    `wait=False`: entering only launches them, so the caller can work while the JVMs start and
    call `wait_ready()` when it needs the cluster."""

    def __init__(self, tmp: str | Path, cores: int = 2, memory: str = "1g", start_timeout_s: float = 120.0,
                 wait: bool = True):
        self.tmp, self.cores, self.memory, self.timeout, self.wait = Path(tmp), cores, memory, start_timeout_s, wait
        self.procs: list[subprocess.Popen] = []
        self.master_url = ""

    def env(self) -> dict:
        """The environment of the master and worker (and what a driver should use too)."""
        conf = self.tmp / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        return dict(os.environ, SPARK_HOME=str(spark_home()), SPARK_CONF_DIR=str(conf),
                    SPARK_LOCAL_IP="127.0.0.1", SPARK_LOCAL_DIRS=str(self.tmp / "local"),
                    SPARK_LOG_DIR=str(self.tmp / "logs"), SPARK_WORKER_DIR=str(self.tmp / "work"),
                    SPARK_DAEMON_MEMORY="512m", SPARK_DAEMON_JAVA_OPTS=LIGHT_JVM, PYSPARK_PYTHON=sys.executable,
                    # the REST submission server binds the fixed port 6066: off, so two clusters can run
                    SPARK_MASTER_OPTS="-Dspark.master.rest.enabled=false")

    def submit_args(self) -> str:
        """PYSPARK_SUBMIT_ARGS for a driver on this machine: this master, no driver UI, light JVMs."""
        return (f"--master {self.master_url} --conf spark.ui.enabled=false "
                f"--conf 'spark.driver.extraJavaOptions={LIGHT_JVM}' "
                f"--conf 'spark.executor.extraJavaOptions={LIGHT_JVM}' pyspark-shell")

    def _start(self, name: str, cls: str, *args: str) -> None:
        log = self.tmp / f"{name}.log"
        with open(log, "ab") as f:
            self.procs.append(subprocess.Popen(
                [str(spark_home() / "bin" / "spark-class"), cls, *args], stdout=f, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env(), start_new_session=True))

    def _wait_for(self, log: Path, pattern: str) -> re.Match:
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            m = re.search(pattern, log.read_text(errors="replace"))
            if m:
                return m
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        raise RuntimeError(f"Spark standalone: {pattern!r} not in {log} within {self.timeout:g}s; "
                           f"its tail:\n{log.read_text(errors='replace')[-3000:]}")

    def __enter__(self) -> "SparkStandalone":
        self.launch()
        if self.wait:
            self.wait_ready()
        return self

    def launch(self) -> None:
        """Start the master and the worker together (the worker retries until the master
        listens): each JVM takes 10-60 s to start on a busy machine, hence a port picked here."""
        for d in ("local", "logs", "work"):
            (self.tmp / d).mkdir(parents=True, exist_ok=True)
        self.master_url = f"spark://127.0.0.1:{free_port()}"
        try:
            self._start("master", MASTER, "--host", "127.0.0.1", "--port", self.master_url.rsplit(":", 1)[1],
                        "--webui-port", "0")
            self._start("worker", WORKER, self.master_url, "--host", "127.0.0.1", "--port", "0",
                        "--webui-port", "0", "--cores", str(self.cores), "--memory", self.memory,
                        "--work-dir", str(self.tmp / "work"))
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Until the worker has registered with the master (or raise with the log's tail)."""
        try:
            self._wait_for(self.tmp / "master.log", r"Starting Spark master at " + re.escape(self.master_url))
            self._wait_for(self.tmp / "worker.log", r"Successfully registered with master")
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM each process group (JVM, executors, pyspark daemons), SIGKILL what is left."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            for p in self.procs:
                _signal_group(p.pid, sig)
            end = time.monotonic() + wait_s
            while self.alive() and time.monotonic() < end:
                for p in self.procs:
                    p.poll()  # reap the JVMs we started
                time.sleep(0.2)
            if not self.alive():
                break
        for p in self.procs:
            p.wait()

    def alive(self) -> list[int]:
        """The process groups of this cluster that still have a process."""
        left = []
        for p in self.procs:
            try:
                os.killpg(p.pid, 0)
                left.append(p.pid)
            except ProcessLookupError:
                pass
        return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
