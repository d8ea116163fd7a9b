"""Stopping a child process and everything it started (its process group)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def terminate_group(process: subprocess.Popen[bytes], grace: float, already_signalled: bool = False) -> None:
    """SIGTERM to the process group (unless sent already), ``grace`` seconds, then SIGKILL; waits for it."""
    if process.poll() is not None:
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
