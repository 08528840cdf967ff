"""Running a launcher (torchrun, accelerate launch, a training script) from a test, so that a hang fails fast,
says where it hung, and leaves nothing running.

Launchers start their workers in sessions of their own (torch elastic's ``start_new_session=True``), so
killing the launcher's process group does not reach them, and a worker whose launcher died is re-parented
to init, out of reach of a walk down the launcher's process tree. Every process the command starts is
therefore marked with an environment variable holding a value of its own (as Jenkins' process-tree killer
does): whatever it is re-parented to, whatever session it is in, it is found by that mark, besides the
launcher's descendants.

The command runs with ``PYTHONFAULTHANDLER=1``. Its output goes to files, not pipes: a grandchild that
outlives the command cannot keep the test waiting for the end of a pipe. If the command is still running
after ``timeout`` seconds, every process it started gets SIGABRT, on which each Python process prints the
stack of all its threads (so the failure shows which collective or call hung), then SIGKILL; the test then
fails with the end of that output, or, with ``retries_on_hang``, warns with it and runs the command again:
gloo's start-up and teardown hang now and then in torch itself (e.g. pytorch/pytorch#75097), which is not
what the multi-process tests are about. A command that ends, however it ends, is never retried. Whatever the
outcome (the test stopped by pytest-timeout or Ctrl-C included), every process the command started is
killed; processes left running by a command that ended are named in a warning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
import warnings

import psutil
import pytest

__all__ = ["MARK_VARIABLE", "run_command", "started_processes"]

# the environment variable that marks every process started by `run_command`
MARK_VARIABLE = "DYNREFER_TEST_LAUNCH"


def started_processes(launcher_pid: int, mark: str) -> list[psutil.Process]:
    """The processes ``run_command`` started: the launcher, its descendants and any process carrying ``mark``."""
    found = {}
    try:
        launcher = psutil.Process(launcher_pid)
        for process in [launcher, *launcher.children(recursive=True)]:
            found[process.pid] = process
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter():
        if process.pid in found or process.pid == os.getpid():
            continue
        try:
            if process.environ().get(MARK_VARIABLE) == mark:
                found[process.pid] = process
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # gone, another user's, or a zombie (already dead)
    return list(found.values())


def _signal_all(processes: list[psutil.Process], signal_number: int) -> None:
    for process in processes:
        try:
            process.send_signal(signal_number)
        except psutil.NoSuchProcess:
            pass


def _kill_all(launcher: subprocess.Popen, mark: str) -> list[str]:
    """SIGKILL every process the command started, until none is left (a dying launcher may still start one);
    returns a description of those that were still running, the launcher aside."""
    left = []
    for _ in range(10):
        processes = [p for p in started_processes(launcher.pid, mark) if _running(p)]
        if not processes:
            break
        left += [_describe(p) for p in processes if p.pid != launcher.pid and _describe(p) not in left]
        _signal_all(processes, signal.SIGKILL)
        psutil.wait_procs(processes, timeout=5)
    else:
        pytest.fail(f"processes of {launcher.args} still running after SIGKILL: {left}")
    launcher.wait()
    return left


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} ({' '.join(process.cmdline())[:200]})"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return str(process.pid)


def _run_once(command: list[str], env: dict[str, str], timeout: float, cwd) -> tuple[int | None, str, str]:
    """(exit status, or None if it ran past ``timeout`` and was stopped; stdout; stderr)."""
    mark = uuid.uuid4().hex
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**env, MARK_VARIABLE: mark},
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        left = []
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
            _signal_all(started_processes(process.pid, mark), signal.SIGABRT)
            time.sleep(5)  # time for every process to print its stacks
        finally:  # also when the test itself is stopped (pytest-timeout, Ctrl-C)
            left = _kill_all(process, mark)
        if left and returncode is not None:
            warnings.warn(f"{command} ended but left processes running, now killed: {left}", stacklevel=3)
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
