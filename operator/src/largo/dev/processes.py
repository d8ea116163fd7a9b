"""Stopping a child process and everything it started (its process group)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def kill_leftovers(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to what is left of an ended process's group (children it started in the background), as
    a container runtime ends everything in a container that exited: they held its ports and files
    while it restarted."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def terminate_group(process: subprocess.Popen[bytes], grace: float, already_signalled: bool = False) -> None:
    """SIGTERM to the process group (unless sent already), ``grace`` seconds, then SIGKILL; waits for it,
    and kills what its leader left running."""
    if process.poll() is not None:
        kill_leftovers(process)
        return
    if not already_signalled:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    kill_leftovers(process)
