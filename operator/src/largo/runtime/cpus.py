"""How many cores this process may use: what its container's CPU limit allows, not what the node has.

``os.cpu_count()`` counts the node's cores; a pod limited to 4 CPUs on a 96-core node that starts 95
torch threads spends its quota on contention and is throttled by the kernel. The limit is the
smallest of the CPUs the process may run on (its affinity) and the CPU quotas of its cgroup and of
the cgroups above it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cores(affinity: int, cpu_maxes: Iterable[str]) -> int:
    """``affinity`` CPUs bounded by quotas in cgroup v2's ``cpu.max`` form (``"<quota> <period>"``, or
    ``"max <period>"`` for none), rounded down (a partial core is throttled, not granted), at least 1.
    Raises ValueError for a quota that is not in that form."""
    cores = affinity
    for cpu_max in cpu_maxes:
        fields = cpu_max.split()
        if not fields or fields[0] == "max":
            continue
        quota, period = int(fields[0]), int(fields[1])
        if quota > 0 and period > 0:
            cores = min(cores, quota // period)
    return max(1, cores)


def own_cgroup(membership: str) -> tuple[str, str]:
    """(cgroup v2 path, cgroup v1 cpu controller path) of this process from ``/proc/self/cgroup``'s
    text; "" where a hierarchy is not listed."""
    unified, cpu = "", ""
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            unified = path
        elif "cpu" in controllers.split(","):
            cpu = path
    return unified, cpu


def cgroup_cpu_maxes(root: Path, membership: str) -> list[str]:
    """The CPU quotas of this process's cgroup and of every cgroup above it, as ``cpu.max`` reads (v1's
    two files are translated). Inside a container's cgroup namespace its own cgroup is the root."""
    unified, cpu = own_cgroup(membership)
    found = []
    for directory in _upwards(root, unified):
        if (directory / "cpu.max").exists():
            found.append((directory / "cpu.max").read_text().strip())
    if not found:
        for directory in _upwards(root / "cpu", cpu):
            quota, period = directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us"
            if quota.exists() and period.exists():
                limit = int(quota.read_text())
                found.append(f"{'max' if limit < 0 else limit} {int(period.read_text())}")
    return found


def _upwards(root: Path, path: str) -> list[Path]:
    parts = [part for part in path.split("/") if part]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def process_cores() -> int:
    """The cores this process may use, here."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    try:
        membership = Path("/proc/self/cgroup").read_text()
        return usable_cores(affinity, cgroup_cpu_maxes(CGROUP, membership))
    except (OSError, ValueError, IndexError):
        return max(1, affinity)


def torch_threads(processes: int = 1) -> int:
    """Torch's threads for each of ``processes`` processes sharing this container: ``OMP_NUM_THREADS``
    when set (torchrun sets it to 1 for several processes), else their share of the usable cores."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, process_cores() // processes)
