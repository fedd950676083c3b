"""The rank's watchdog (`exit_with_parent`) exits once its parent is gone, whatever its stderr is.

Issue 30 item 6: a rank whose stderr is a pipe to the Prefect task that pumped its output saw
that task's process die with torchrun; the watchdog's print raised BrokenPipeError, the thread
died before os._exit, and the rank trained on at ~97% CPU.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# the rank: arms the watchdog, says so through a file, then "trains" for a minute
CHILD = """
import os, sys, time
from muse.lifecycle import exit_with_parent
if sys.argv[2] == "closed":
    os.close(2)
exit_with_parent("the test's parent", interval=0.05)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(60)
"""

# torchrun's stand-in: holds the only read end of the child's stderr pipe and never reads it
PARENT = """
import os, subprocess, sys, time
r, w = os.pipe()
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], stderr=w)
os.close(w)
time.sleep(60)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan that exited waits for its reaper, which may be slow)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stderr", ["broken", "closed"])
def test_the_watchdog_exits_when_its_parent_dies_with_stderr_broken_or_closed(tmp_path, stderr):
    ready = tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(ready), stderr], env=env)
    child = None
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent exited early"
            time.sleep(0.05)
        child = int(ready.read_text())
        parent.kill()   # the pipe's reader goes with it
        parent.wait()
        deadline = time.monotonic() + 10   # it polls every 0.05 s; 10 s for a loaded machine
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), f"the child outlived its parent with its stderr {stderr}"
    finally:
        parent.kill()
        parent.wait()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)


# a demo-ui in small: adopts orphans, leaves two (one ignores SIGTERM), then ends what is below it
REAPER = """
import os, subprocess, sys
from muse.lifecycle import adopt_orphans, descendants, end_descendants
adopt_orphans()
def orphan(script):   # the shell exits at once: its background child is re-parented
    return int(subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout)
polite = orphan("sleep 300 > /dev/null 2>&1 & echo $!")
stubborn = orphan("(trap '' TERM; exec sleep 300) > /dev/null 2>&1 & echo $!")
assert set(descendants(os.getpid())) == {polite, stubborn}, descendants(os.getpid())
killed = end_descendants(grace_s=1)
print(polite, stubborn, killed, descendants(os.getpid()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_adopted_orphan_is_found_and_ended_and_one_that_ignores_sigterm_is_killed():
    """What demo-ui relies on to leave nothing behind (issue 30 item 6): a rank whose torchrun
    died, a flow run whose worker was stopped."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", REAPER], env=env, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    polite, stubborn, killed, left = r.stdout.split(" ", 3)
    assert killed == f"[{stubborn}]" and left.strip() == "[]", r.stdout
    assert not _running(int(polite)) and not _running(int(stubborn))
