"""How many cores this process may use: what its container's CPU limit allows, not what the node has.

``os.cpu_count()`` counts the node's cores; a pod limited to 4 CPUs on a 96-core node that starts 95
torch threads spends its quota on contention and is throttled by the kernel. The limit is the
smaller of the CPUs the process may run on (its affinity) and the cgroup's CPU quota.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cores(affinity: int, cpu_max: str | None) -> int:
    """``affinity`` CPUs bounded by a quota in cgroup v2's ``cpu.max`` form (``"<quota> <period>"``, or
    ``"max <period>"`` for none), rounded down (a partial core is throttled, not granted), at least 1."""
    cores = affinity
    if cpu_max:
        fields = cpu_max.split()
        if len(fields) == 2 and fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1])
            if quota > 0 and period > 0:
                cores = min(cores, quota // period)
    return max(1, cores)


def cgroup_cpu_max(root: Path = CGROUP) -> str | None:
    """The CPU quota of this process's cgroup as ``cpu.max`` reads (v1's two files are translated),
    or None where there is none to read."""
    v2 = root / "cpu.max"
    if v2.exists():
        return v2.read_text().strip()
    quota, period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
    if quota.exists() and period.exists():
        limit = int(quota.read_text())
        return f"{'max' if limit < 0 else limit} {int(period.read_text())}"
    return None


def process_cores() -> int:
    """The cores this process may use, here."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    try:
        cpu_max = cgroup_cpu_max()
    except (OSError, ValueError):
        cpu_max = None
    return usable_cores(affinity, cpu_max)
