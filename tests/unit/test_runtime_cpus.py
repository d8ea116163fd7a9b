from pathlib import Path

import pytest
from largo.runtime.cpus import cgroup_cpu_max, usable_cores


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "cores"),
    [
        (96, "400000 100000", 4),  # a pod limited to 4 CPUs on a 96-core node
        (96, "150000 100000", 1),  # 1.5 CPUs: the half core is throttled, not granted
        (96, "50000 100000", 1),  # under one CPU still runs one thread
        (2, "800000 100000", 2),  # a quota above the CPUs it may run on
        (8, "max 100000", 8),  # no quota
        (8, None, 8),  # no cgroup to read
        (8, "", 8),
    ],
)
def test_the_usable_cores_are_the_smaller_of_affinity_and_quota(
    affinity: int, cpu_max: str | None, cores: int
) -> None:
    assert usable_cores(affinity, cpu_max) == cores


def test_cgroup_v2_and_v1_quotas_are_read_alike(tmp_path: Path) -> None:
    assert cgroup_cpu_max(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_max(v1) == "300000 100000"
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_max(v1) == "max 100000"
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("200000 100000\n")
    assert cgroup_cpu_max(v2) == "200000 100000"
    assert usable_cores(16, cgroup_cpu_max(v2)) == 2
