"""Mount points on the host, shared by every localnode of the machine.

A container's mounts live in its own mount namespace, but their targets must exist in the one
filesystem all namespaces share. Targets that do not exist are created here and counted per pod, so the
last pod to let go removes what was created, and an empty directory never outlives its users.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

DEFAULT_REGISTRY = Path("/run/largo-localnode/mountpoints.json")


class MountPoints:
    def __init__(self, registry: Path = DEFAULT_REGISTRY) -> None:
        self.registry = registry

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, list[str]]]]:
        self.registry.parent.mkdir(parents=True, exist_ok=True)
        with open(self.registry.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(self.registry.read_text())
            except (FileNotFoundError, ValueError):
                state = {}
            state.setdefault("created", {})  # path -> [users]
            state.setdefault("users", {})  # user -> [paths]
            yield state
            self.registry.write_text(json.dumps(state))

    def acquire(self, user: str, targets: list[tuple[str, bool]]) -> None:
        """Makes each (target, is_file) exist; what this creates is remembered with ``user``."""
        with self._locked() as state:
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
