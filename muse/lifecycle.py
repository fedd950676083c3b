"""Who owns which process in a training job, so that none outlives the job (Linux).

    muse train (the CLI)  ->  torchrun  ->  ranks (muse.train)  ->  DataLoader workers

* `run_owned` (the CLI) starts torchrun in its own process group, so a terminal's Ctrl-C reaches
  only the CLI, and through `python -m muse.lifecycle --parent PID -- CMD`, which sets the
  parent-death signal and execs CMD, so torchrun dies with the CLI (no preexec_fn: the CLI
  may have threads, e.g. in a Prefect task). The first SIGTERM or
  SIGINT is passed to the ranks as SIGTERM (they checkpoint at the step boundary and exit) and
  the CLI waits for them; a second one kills the job at once.
* torchrun starts every rank in a session of its own (torch.distributed.elastic), where no
  signal to the CLI's process group reaches it: `exit_with_parent` (a rank) exits as soon as
  its parent, torchrun, is gone.
* DataLoader workers get the kernel's parent-death signal (`die_with_parent`, see data.py).
* A process that owns a whole tree of them (`flows.demo_ui`: Prefect server, workers, flow runs,
  torchrun, ranks) calls `adopt_orphans` at start and `end_descendants` when it stops.
"""

from __future__ import annotations

import contextvars
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """The kernel sends `sig` to this process when the thread that started it exits; call it in
    the child (preexec_fn, worker_init). No-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() == 1:  # the parent died before prctl: nobody is left to read our output
        os._exit(1)


def exit_with_parent(what: str, interval: float = 0.5) -> None:
    """Exit this process (and so its loader workers) once its parent is gone. A watchdog thread
    polling getppid() rather than prctl: the kernel's parent-death signal follows the *thread*
    that forked us, and torchrun does not promise which of its threads that is."""
    parent = os.getppid()
    if parent == 1:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        # the message is best effort, the exit is not: stderr is often a pipe whose reader (the
        # Prefect task that pumped our output) died with our parent. A print then raised
        # BrokenPipeError and ended this thread before os._exit, and the rank trained on
        # (issue 30 item 6); a full pipe nobody reads would block a write for ever.
        note = f"muse train: {what} (pid {parent}) is gone: stopping this process\n".encode()
        threading.Thread(target=_write_quietly, args=(2, note), daemon=True).start()
        time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _write_quietly(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:  # closed, broken or bad: nobody to tell
        pass


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc (empty where there is no /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(stat.parent.name))
    return out


def adopt_orphans() -> None:
    """Become the child subreaper (Linux): a descendant whose parent dies is re-parented to this
    process instead of init, so `end_descendants` still finds it (a rank left by a killed
    torchrun, a flow run left by a stopped Prefect worker). No-op off Linux."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process, from one /proc scan."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), fields[0])
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, theirs, ...) that still run (zombies left out)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        if table[p][1] != "Z":
            out.append(p)
    return out


def reap_children() -> None:
    """Collect the exit status of our exited children, so that adopted orphans do not stay zombies."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def end_descendants(grace_s: float = 20.0) -> list[int]:
    """SIGTERM every process below this one (ranks checkpoint and stop), SIGKILL those still
    running after `grace_s`, reap them -> the pids that needed SIGKILL. Call it last: it reaps
    children that subprocess.Popen objects may still want to wait for."""
    me, told = os.getpid(), set()
    deadline = time.monotonic() + grace_s
    while (left := descendants(me)) and time.monotonic() < deadline:
        _kill([p for p in left if p not in told], signal.SIGTERM)  # once each: a second may mean "now"
        told.update(left)  # (those started since the last look too: a rank torchrun was starting)
        reap_children()
        time.sleep(0.2)
    _kill(left, signal.SIGKILL)
    time.sleep(0.1)
    reap_children()
    return left


def _kill(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _pump(stream, on_line: Callable[[str], None]) -> None:
    """Hand each line of the job's output to `on_line` as it comes (until every writer closes)."""
    for line in stream:
        try:
            on_line(line.rstrip("\n"))
        except Exception as e:  # noqa: BLE001 - keep reading: a full pipe would stall the job
            print(f"(output line not delivered: {type(e).__name__}: {e}) {line}", end="", file=sys.stderr)
    stream.close()


def run_owned(cmd: list[str], label: str = "muse train", on_line: Callable[[str], None] | None = None,
              env: dict[str, str] | None = None) -> tuple[int, str | None]:
    """Run `cmd` (torchrun) as a child that dies with us; SIGTERM/SIGINT stop it gracefully (see
    the module docstring) -> (its exit code, the name of the signal that stopped it or None).
    With `on_line`, the job's stdout and stderr go to it line by line (unbuffered) instead of
    to our terminal: a Prefect task sends them to its run log. `env`: added to our environment."""
    wrapped = [sys.executable, "-m", "muse.lifecycle", "--parent", str(os.getpid()), "--", *cmd]
    env = {**os.environ, **(env or {})}
    pipe = {} if on_line is None else {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True,
                                       "errors": "replace", "env": {**env, "PYTHONUNBUFFERED": "1"}}
    proc = subprocess.Popen(wrapped, process_group=0, **{"env": env, **pipe})
    pump = None
    if on_line is not None:
        # in a copy of our context: on_line may use context variables (Prefect's run and settings)
        pump = threading.Thread(target=contextvars.copy_context().run, args=(_pump, proc.stdout, on_line),
                                daemon=True)
        pump.start()
    got: list[str] = []

    def on_signal(signum, _frame) -> None:
        got.append(signal.Signals(signum).name)
        if len(got) == 1:
            print(f"{label}: {got[0]}: the ranks write a checkpoint at the end of this step and stop "
                  "(send it again to kill them now)", file=sys.stderr, flush=True)
            ranks = child_pids(proc.pid)
            _kill(ranks or [proc.pid], signal.SIGTERM)  # no ranks yet: torchrun stops itself
        else:
            print(f"{label}: {got[-1]} again: killing the job", file=sys.stderr, flush=True)
            _kill([*child_pids(proc.pid), proc.pid], signal.SIGKILL)

    # signal handlers can only be set in the main thread (a Prefect task runs in a worker thread)
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        rc = proc.wait()  # resumed after each handler (PEP 475)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:  # an exception in this process: do not leave the job behind
            proc.kill()
            proc.wait()
        if pump is not None:  # the last lines; a rank that outlives torchrun must not hold us up
            pump.join(30)
    return rc, (got[0] if got else None)


def _exec_with_parent_death(argv: list[str]) -> None:
    """`python -m muse.lifecycle --parent PID -- CMD...`: die with PID, then become CMD (the
    parent-death signal survives exec)."""
    if len(argv) < 4 or argv[0] != "--parent" or argv[2] != "--":
        sys.exit("usage: python -m muse.lifecycle --parent PID -- CMD...")
    die_with_parent()
    if os.getppid() != int(argv[1]):  # the launcher died before prctl
        os._exit(1)
    os.execvp(argv[3], argv[3:])


if __name__ == "__main__":
    _exec_with_parent_death(sys.argv[1:])
