"""``sweeps.stack.stop`` ends a service's whole session, and only it.

Ray puts each worker process in a process group of its own; killing the node's group left its
Ray Train worker training for seconds (it may finish a trial whose node was "lost"). The
stand-in here is a session leader with a child that moved to its own process group, the same
shape as ``ray start`` and its workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeps import stack

pytestmark = pytest.mark.skipif(not Path("/proc/self").exists(), reason="sessions are read from /proc")

LEADER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgid(0, 0); time.sleep(600)"])
while os.getpgid(child.pid) == os.getpgid(0):
    time.sleep(0.01)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Not reaped yet counts as gone: a zombie's state is Z.
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


def _start_service(state: Path, name: str) -> tuple[int, int, subprocess.Popen]:
    pid_file = state / f"{name}.child"
    leader = subprocess.Popen([sys.executable, "-c", LEADER, str(pid_file)], start_new_session=True,
                              stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the stand-in service did not start"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert os.getpgid(child) != leader.pid and os.getsid(child) == leader.pid
    stack._save(state, stack.Service(name, leader.pid, "", ""))
    return leader.pid, child, leader


@pytest.mark.parametrize("grace", [0.0, 5.0], ids=["kill-at-once", "terminate-first"])
def test_stop_ends_processes_that_left_the_process_group(tmp_path, grace):
    leader_pid, child, leader = _start_service(tmp_path, "node")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        assert stack.stop(tmp_path, "node", grace=grace) == [f"node (process group {leader_pid})"]
        leader.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "a process of the stopped service's session outlived stop()"
        assert leader.returncode == (-signal.SIGKILL if grace == 0 else -signal.SIGTERM)
        assert bystander.poll() is None, "stop() ended a process of another session"
        assert stack.load(tmp_path, "node") is None
    finally:
        bystander.kill()
        for pid in (leader_pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
