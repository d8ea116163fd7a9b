"""The first code a container runs, inside ``ip netns exec``: its own hostname (a new UTS namespace),
its volume mounts (in the private mount namespace ``ip netns exec`` created), its working directory,
then exec of the container's command. Mounts vanish with the namespace: nothing to unmount later.

Usage: ``python -m largo.dev.localnode.sandbox LAUNCH.json`` (written by the agent).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
from typing import Any

_CLONE_NEWUTS = 0x04000000
_MS_RDONLY = 0x1
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def enter(launch: dict[str, Any]) -> None:
    _check(_libc.unshare(_CLONE_NEWUTS), "unshare(CLONE_NEWUTS)")
    socket.sethostname(launch["hostname"])
    for mount in launch["mounts"]:
        target = mount["target"]
        if mount["tmpfs"]:
            _mount("tmpfs", target, "tmpfs", 0, "mode=1777")
        else:
            _mount(mount["source"], target, None, _MS_BIND | _MS_REC)
        if mount["read_only"]:
            _mount("none", target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY)
    os.chdir(launch["working_dir"])
    argv: list[str] = launch["argv"]
    os.execvpe(argv[0], argv, launch["env"])


def main() -> None:
    with open(sys.argv[1]) as file:
        launch = json.load(file)
    try:
        enter(launch)
    except OSError as error:
        # Reported as the container's exit: 127 when the command is missing, 128 when it cannot start.
        print(f"localnode: cannot start {launch['argv'][:1]}: {error}", file=sys.stderr, flush=True)
        sys.exit(127 if isinstance(error, FileNotFoundError) else 128)


if __name__ == "__main__":
    main()
