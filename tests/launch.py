"""Running a launcher (torchrun, accelerate launch, a training script) from a test, so that a hang fails fast
and says where it hung.

The command runs in a session of its own with ``PYTHONFAULTHANDLER=1``. Its output goes to files, not pipes:
a grandchild that outlives the command cannot keep the test waiting for the end of a pipe. If the command is
still running after ``timeout`` seconds, every process of the session gets SIGABRT, on which each Python
process prints the stack of all its threads (so the failure shows which collective or call hung), then
SIGKILL; the test then fails with the end of that output, or, with ``retries_on_hang``, warns with it and
runs the command again: gloo's start-up and teardown hang now and then in torch itself (e.g.
pytorch/pytorch#75097), which is not what the multi-process tests are about. A command that ends, however it
ends, is never retried. Whatever the outcome, nothing of the session is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import warnings

import pytest

__all__ = ["run_command"]


def _kill_session(process: subprocess.Popen, signal_number: int) -> None:
    try:
        os.killpg(process.pid, signal_number)
    except ProcessLookupError:  # the whole session has already ended
        pass


def _run_once(command: list[str], env: dict[str, str], timeout: float, cwd) -> tuple[int | None, str, str]:
    """(exit status, or None if it ran past ``timeout`` and was stopped; stdout; stderr)."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
            _kill_session(process, signal.SIGABRT)
            time.sleep(5)  # time for every process to print its stacks
        finally:  # also when the test itself is stopped (pytest-timeout, Ctrl-C)
            _kill_session(process, signal.SIGKILL)
            process.wait()
        stdout.seek(0), stderr.seek(0)
        return returncode, stdout.read(), stderr.read()


def run_command(
    command: list[str], *, env: dict[str, str], timeout: float, cwd=None, retries_on_hang: int = 0
) -> subprocess.CompletedProcess:
    """Runs ``command`` and returns its exit status and output; fails the test if it runs past ``timeout`` s
    more than ``retries_on_hang`` times."""
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    for attempts_left in range(retries_on_hang, -1, -1):
        returncode, out, err = _run_once(command, env, timeout, cwd)
        if returncode is not None:
            return subprocess.CompletedProcess(command, returncode, out, err)
        report = (
            f"{command} did not finish in {timeout} s; the stacks of its processes when stopped:\n"
            f"{out[-3000:]}\n{err[-12000:]}"
        )
        if not attempts_left:
            pytest.fail(report)
        warnings.warn(f"{report}\nrunning it again", stacklevel=2)
