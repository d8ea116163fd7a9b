"""localnode's pod status: phases, restarts, probes, address pool, mount-point bookkeeping, logs."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
from largo.dev.localnode import status
from largo.dev.localnode.logs import latest_log
from largo.dev.localnode.mountpoints import MountPoints
from largo.dev.localnode.network import AddressPool, NetworkError
from largo.dev.localnode.status import ContainerState

POD = {
    "metadata": {"name": "p"},
    "spec": {"restartPolicy": "Never", "containers": [{"name": "a", "image": "img"}]},
}


@pytest.mark.parametrize(
    ("policy", "codes", "phase"),
    [
        ("Never", [0, 0], "Succeeded"),
        ("Never", [0, 1], "Failed"),
        ("OnFailure", [0, 0], "Succeeded"),
        ("OnFailure", [1], "Running"),
        ("Always", [0], "Running"),
    ],
)
def test_phase_of_finished_containers(policy: str, codes: list[int], phase: str) -> None:
    states = [ContainerState(f"c{i}").running(1).terminated(code, 2) for i, code in enumerate(codes)]
    assert status.pod_phase(policy, states) == phase


def test_phase_pending_running_and_waiting_to_restart() -> None:
    waiting = ContainerState("a")
    running = waiting.running(1)
    assert status.pod_phase("Never", [waiting]) == "Pending"
    assert status.pod_phase("Never", [running, waiting]) == "Pending"
    assert status.pod_phase("Never", [running]) == "Running"
    crashed = running.terminated(3, 2).restarting()
    assert crashed.restart_count == 1
    assert crashed.last_terminated is not None
    assert crashed.last_terminated["exitCode"] == 3
    assert status.pod_phase("OnFailure", [crashed]) == "Running"
    assert status.pod_phase("Never", [], init_failed=True) == "Failed"


def test_restart_decision_and_backoff() -> None:
    assert status.should_restart("Always", 0)
    assert status.should_restart("OnFailure", 1)
    assert not status.should_restart("OnFailure", 0)
    assert not status.should_restart("Never", 1)
    assert [status.backoff_seconds(n) for n in (0, 1, 2, 10)] == [10.0, 20.0, 40.0, 300.0]


def test_pod_status_reports_exit_codes_ip_and_conditions() -> None:
    finished = ContainerState("a").running(100).terminated(137, 160)
    report = status.pod_status(POD, [finished], [], "10.88.1.5", "10.88.0.1", 100, 170)
    assert report["phase"] == "Failed"
    assert report["podIP"] == "10.88.1.5"
    assert report["hostIP"] == "10.88.0.1"
    terminated = report["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (137, "Error")
    ready = next(c for c in report["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodCompleted")


def test_condition_times_move_only_when_the_status_flips() -> None:
    running = ContainerState("a").running(100)
    ready = status.pod_status(
        POD, [running.__class__("a", "running", ready=True, started_at=100)], [], "ip", "h", 100, 200
    )
    pod = {**POD, "status": ready}
    again = status.pod_status(
        pod, [running.__class__("a", "running", ready=True, started_at=100)], [], "ip", "h", 100, 500
    )
    assert again["conditions"] == ready["conditions"]
    flipped = status.pod_status(pod, [running], [], "ip", "h", 100, 900)
    changed = next(c for c in flipped["conditions"] if c["type"] == "Ready")
    assert changed["status"] == "False"
    assert changed["lastTransitionTime"] == status.timestamp(900)


def test_probe_thresholds() -> None:
    tracker = status.ProbeTracker(
        {"failureThreshold": 2, "periodSeconds": 5, "initialDelaySeconds": 3}, started_at=0
    )
    assert not tracker.due(1)
    assert tracker.due(3)
    assert tracker.observe(False, 3) is None
    assert not tracker.due(4)
    assert tracker.observe(False, 8) is False
    assert tracker.observe(True, 13) is True


def test_address_pool_reuses_released_addresses_and_runs_out() -> None:
    pool = AddressPool(ipaddress.IPv4Network("10.1.2.0/30"))
    first = pool.allocate("a")
    assert pool.allocate("a") == first
    second = pool.allocate("b")
    assert {first, second} == {ipaddress.IPv4Address("10.1.2.1"), ipaddress.IPv4Address("10.1.2.2")}
    with pytest.raises(NetworkError):
        pool.allocate("c")
    pool.release("a")
    assert pool.allocate("c") == first


def test_mount_points_created_are_removed_by_their_last_user(tmp_path: Path) -> None:
    registry = MountPoints(tmp_path / "registry.json")
    existing = tmp_path / "existing"
    existing.mkdir()
    target = tmp_path / "new" / "deep"
    registry.acquire("pod-a", [(str(target), False), (str(existing), False)])
    registry.acquire("pod-b", [(str(target), False), (str(tmp_path / "new" / "file"), True)])
    assert target.is_dir()
    assert (tmp_path / "new" / "file").is_file()
    registry.release("pod-a")
    assert target.is_dir()
    registry.release("pod-b")
    assert not (tmp_path / "new").exists()
    assert existing.is_dir()


def test_mount_points_of_an_agent_that_died_holding_them_are_removed(tmp_path: Path) -> None:
    registry = tmp_path / "registry.json"
    killed = tmp_path / "killed" / "deep"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from largo.dev.localnode.mountpoints import MountPoints; "
            "MountPoints(Path(sys.argv[1])).acquire('pod-a', [(sys.argv[2], False)]); "
            "print('held', flush=True); time.sleep(600)",
            str(registry),
            str(killed),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        alive_mount = tmp_path / "alive"
        MountPoints(registry).acquire("pod-b", [(str(alive_mount), False)])
        assert killed.is_dir(), "its agent still runs"
    finally:
        holder.kill()
        holder.wait()
    MountPoints(registry).acquire("pod-c", [])
    assert not (tmp_path / "killed").exists()
    assert alive_mount.is_dir(), "this process holds it"
    assert "pod-a" not in json.loads(registry.read_text())["users"]


def test_latest_log_picks_the_newest_incarnation_and_run(tmp_path: Path) -> None:
    old = tmp_path / "team_job-node-0_uid1" / "trainer"
    new = tmp_path / "team_job-node-0_uid2" / "trainer"
    for directory, runs in ((old, 1), (new, 2)):
        directory.mkdir(parents=True)
        for run in range(runs):
            (directory / f"{run}.log").write_text(f"{directory.parent.name} run {run}")
    assert latest_log(tmp_path, "job-node-0", "team", None, False).read_text() == "team_job-node-0_uid2 run 1"
    assert (
        latest_log(tmp_path, "job-node-0", "team", "trainer", True).read_text()
        == "team_job-node-0_uid2 run 0"
    )
    with pytest.raises(FileNotFoundError, match="no logs for pod team/other"):
        latest_log(tmp_path, "other", "team", None, False)
