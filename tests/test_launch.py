"""tests/launch.py leaves nothing running: workers in sessions of their own (as torch elastic starts them),
orphaned workers whose launcher died, whether the command ends, hangs, or the test is interrupted."""

import _thread
import sys
import threading
import time
import warnings

import psutil
import pytest
from launch import run_command

# A launcher that starts a worker in a session of its own, as torch elastic does, writes the worker's pid,
# then ends at once ("exit"), hangs ("hang") or dies by SIGKILL leaving the worker orphaned ("die").
LAUNCHER = """
import os, signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
with open(sys.argv[1] + ".tmp", "w") as file:
    file.write(str(worker.pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[2] == "hang":
    time.sleep(600)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _worker_pid(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the launcher never started its worker"
        time.sleep(0.05)
    return int(path.read_text())


def _gone(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _command(tmp_path, outcome):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    return [sys.executable, str(script), str(tmp_path / "worker.pid"), outcome]


@pytest.mark.parametrize("outcome", ["exit", "die"])
def test_workers_of_a_command_that_ended_are_killed_and_named(tmp_path, outcome):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        completed = run_command(_command(tmp_path, outcome), env={}, timeout=60)
    assert completed.returncode == (0 if outcome == "exit" else -9)
    worker = _worker_pid(tmp_path / "worker.pid")
    assert _gone(worker)
    assert any(
        f"{worker} (" in str(warning.message) and "left processes running" in str(warning.message)
        for warning in caught
    )


def test_workers_of_a_command_that_hangs_are_killed(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="did not finish in 3 s"):
        run_command(_command(tmp_path, "hang"), env={}, timeout=3)
    assert _gone(_worker_pid(tmp_path / "worker.pid"))


def test_workers_are_killed_when_the_test_is_interrupted(tmp_path):
    path = tmp_path / "worker.pid"
    # Ctrl-C (or pytest-timeout) while the command runs: once the worker is up, interrupt the main thread
    threading.Thread(target=lambda: (_worker_pid(path), _thread.interrupt_main()), daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_command(_command(tmp_path, "hang"), env={}, timeout=120)
    assert _gone(_worker_pid(path))
