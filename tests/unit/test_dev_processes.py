"""Stopping a local pod's process group: nothing it started is left running."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from largo.dev.processes import kill_leftovers, terminate_group


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def _with_background_child(script: str) -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen(
        ["sh", "-c", f"sleep 300 & echo $!; {script}"], stdout=subprocess.PIPE, start_new_session=True
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _gone(pid)


@pytest.mark.parametrize("stop", ["exited", "terminated"])
def test_what_a_container_started_in_the_background_ends_with_it(stop: str) -> None:
    """A crashed container's background children held its ports and files while it restarted; a
    container runtime ends everything in a container that exited."""
    process, child = _with_background_child("exit 1" if stop == "exited" else "sleep 300")
    try:
        if stop == "exited":
            process.wait()
            assert not _gone(child)
            kill_leftovers(process)
        else:
            terminate_group(process, grace=5)
        assert _wait_gone(child)
    finally:
        if not _gone(child):
            os.kill(child, 9)


def test_a_leader_that_already_ended_still_has_its_group_ended() -> None:
    process, child = _with_background_child("exit 0")
    process.wait()
    terminate_group(process, grace=1)
    assert _wait_gone(child)
