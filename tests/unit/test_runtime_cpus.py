from pathlib import Path

import pytest
from largo.runtime import cpus
from largo.runtime.cpus import cgroup_cpu_maxes, own_cgroup, torch_threads, usable_cores


@pytest.mark.parametrize(
    ("affinity", "cpu_maxes", "cores"),
    [
        (96, ["400000 100000"], 4),  # a pod limited to 4 CPUs on a 96-core node
        (96, ["150000 100000"], 1),  # 1.5 CPUs: the half core is throttled, not granted
        (96, ["50000 100000"], 1),  # under one CPU still runs one thread
        (2, ["800000 100000"], 2),  # a quota above the CPUs it may run on
        (8, ["max 100000"], 8),  # no quota
        (8, [], 8),  # no cgroup to read
        (96, ["max 100000", "300000 100000", "800000 100000"], 3),  # the tightest of the ancestors
    ],
)
def test_the_usable_cores_are_the_smallest_of_affinity_and_quotas(
    affinity: int, cpu_maxes: list[str], cores: int
) -> None:
    assert usable_cores(affinity, cpu_maxes) == cores


def test_a_quota_in_another_form_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        usable_cores(8, ["lots 100000"])


def test_the_own_cgroup_is_read_from_the_membership_list() -> None:
    assert own_cgroup("0::/\n") == ("/", "")
    v1 = "12:memory:/kubepods/pod1\n4:cpu,cpuacct:/kubepods/pod1/c1\n1:name=systemd:/x\n"
    assert own_cgroup(v1) == ("", "/kubepods/pod1/c1")


def test_cgroup_v2_quotas_are_read_from_the_own_cgroup_up_to_the_root(tmp_path: Path) -> None:
    assert cgroup_cpu_maxes(tmp_path, "0::/\n") == []
    pod = tmp_path / "kubepods" / "pod1"
    container = pod / "c1"
    container.mkdir(parents=True)
    (container / "cpu.max").write_text("max 100000\n")
    (pod / "cpu.max").write_text("200000 100000\n")  # the limit set on the pod, not the container
    assert cgroup_cpu_maxes(tmp_path, "0::/kubepods/pod1/c1\n") == ["max 100000", "200000 100000"]
    assert usable_cores(16, cgroup_cpu_maxes(tmp_path, "0::/kubepods/pod1/c1\n")) == 2


def test_cgroup_v1_quotas_are_translated(tmp_path: Path) -> None:
    own = tmp_path / "cpu" / "kubepods" / "c1"
    own.mkdir(parents=True)
    (own / "cpu.cfs_quota_us").write_text("300000\n")
    (own / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    membership = "4:cpu,cpuacct:/kubepods/c1\n"
    assert cgroup_cpu_maxes(tmp_path, membership) == ["300000 100000", "max 100000"]
    assert usable_cores(16, cgroup_cpu_maxes(tmp_path, membership)) == 3


def test_torch_threads_follow_omp_num_threads_else_share_the_usable_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpus, "process_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert torch_threads() == 8
    assert torch_threads(3) == 2  # three processes in the pod share its cores
    assert torch_threads(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads(2) == 3
