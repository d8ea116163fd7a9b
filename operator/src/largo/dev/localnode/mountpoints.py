"""Mount points on the host, shared by every localnode of the machine.

A container's mounts live in its own mount namespace, but their targets must exist in the one
filesystem all namespaces share. Targets that do not exist are created here and counted per pod, so the
last pod to let go removes what was created, and an empty directory never outlives its users. Each
user is recorded with the agent process that holds it: a user whose agent died without releasing it (a
SIGKILLed localnode, whose pods the cluster's sweep kills) is dropped by the next agent to take the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_REGISTRY = Path("/run/largo-localnode/mountpoints.json")


class MountPoints:
    def __init__(self, registry: Path = DEFAULT_REGISTRY) -> None:
        self.registry = registry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.registry.parent.mkdir(parents=True, exist_ok=True)
        with open(self.registry.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(self.registry.read_text())
            except (FileNotFoundError, ValueError):
                state = {}
            state.setdefault("created", {})  # path -> [users]
            state.setdefault("users", {})  # user -> [paths]
            state.setdefault("owners", {})  # user -> [pid, start time] of the agent holding it
            for user, owner in list(state["owners"].items()):
                if not _alive(*owner):
                    _drop(state, user)
            yield state
            self.registry.write_text(json.dumps(state))

    def acquire(self, user: str, targets: list[tuple[str, bool]]) -> None:
        """Makes each (target, is_file) exist; what this creates is remembered with ``user``."""
        with self._locked() as state:
            state["owners"][user] = [os.getpid(), _start_time(os.getpid())]
            for target, is_file in targets:
                path = Path(target)
                missing = [p for p in [path, *path.parents] if not os.path.lexists(p)]
                if is_file and missing and missing[0] == path:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
                else:
                    path.mkdir(parents=True, exist_ok=True)
                for created in missing:
                    state["created"].setdefault(str(created), [])
                for created_path, users in state["created"].items():
                    if (
                        created_path == target or target.startswith(created_path + "/")
                    ) and user not in users:
                        users.append(user)
                        state["users"].setdefault(user, []).append(created_path)

    def release(self, user: str) -> None:
        """Drops ``user``; created paths nobody uses any more are removed, deepest first."""
        with self._locked() as state:
            _drop(state, user)


def _drop(state: dict[str, Any], user: str) -> None:
    state["owners"].pop(user, None)
    for created_path in state["users"].pop(user, []):
        users = state["created"].get(created_path, [])
        if user in users:
            users.remove(user)
    unused = [p for p, users in state["created"].items() if not users]
    for created_path in sorted(unused, key=len, reverse=True):
        path = Path(created_path)
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        del state["created"][created_path]


def _start_time(pid: int) -> int | None:
    """The process's start (clock ticks after boot): with the pid, it tells a process from a later one
    that reused the pid. None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces or parentheses; the fields after its ")" do not.
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _alive(pid: int, start_time: int) -> bool:
    return _start_time(pid) == start_time
