"""Running a launcher (torchrun, accelerate launch, a training script) from a test, so that a hang fails fast
and says where it hung.

The command runs in a session of its own with ``PYTHONFAULTHANDLER=1``. Its output goes to files, not pipes:
a grandchild that outlives the command cannot keep the test waiting for the end of a pipe. If the command is
still running after ``timeout`` seconds, every process of the session gets SIGABRT, on which each Python
process prints the stack of all its threads (so the failure shows which collective or call hung), then
SIGKILL; the test then fails with the end of that output. Whatever the outcome, nothing of the session is
left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

import pytest

__all__ = ["run_command"]


def _kill_session(process: subprocess.Popen, signal_number: int) -> None:
    try:
        os.killpg(process.pid, signal_number)
    except ProcessLookupError:  # the whole session has already ended
        pass


def run_command(
    command: list[str], *, env: dict[str, str], timeout: float, cwd=None
) -> subprocess.CompletedProcess:
    """Runs ``command`` and returns its exit status and output; fails the test if it runs past ``timeout`` s."""
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True, start_new_session=True
        )
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_session(process, signal.SIGABRT)
            time.sleep(5)  # time for every process to print its stacks
        _kill_session(process, signal.SIGKILL)
        process.wait()
        stdout.seek(0), stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if timed_out:
        pytest.fail(
            f"{command} did not finish in {timeout} s; the stacks of its processes when stopped:\n"
            f"{out[-3000:]}\n{err[-12000:]}"
        )
    return subprocess.CompletedProcess(command, process.returncode, out, err)
