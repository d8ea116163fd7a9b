"""Two operator replicas with Lease-based leader election: only the leader acts, a standby takes over
when the leader dies or is cut off, and a cut-off leader that comes back writes nothing."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from largo.dev.cluster import LocalCluster, NodePool, wait_for
from largo.dev.operator_process import OperatorProcess
from trainjobs import TIMEOUT, Jobs, overbooked

pytestmark = pytest.mark.integration

LEASE = "largo-operator"
QUICK = {
    "LARGO_RESTART_BACKOFF_SECONDS": "1",
    "LARGO_RESTART_BACKOFF_MAX_SECONDS": "2",
    "LARGO_BINDING_TIMEOUT_SECONDS": "10",
}


class Replicas:
    def __init__(self, api: client.ApiClient, namespace: str, processes: dict[str, OperatorProcess]) -> None:
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.processes = processes

    def holder(self) -> str | None:
        try:
            lease = self.coordination.read_namespaced_lease(LEASE, self.namespace)
        except client.ApiException:
            return None
        return lease.spec.holder_identity

    def leader(self) -> str | None:
        """The replica name (POD_NAME) of the Lease's holder."""
        holder = self.holder()
        return holder.rsplit("_", 1)[0] if holder else None

    def assert_alive(self) -> None:
        for process in self.processes.values():
            process.assert_alive()


@pytest.fixture
def replicas(
    api: client.ApiClient, cluster: LocalCluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> Iterator[Replicas]:
    """Two elected replicas in place of the session's single operator, which is restored afterwards."""
    operator.stop()
    processes = {
        name: OperatorProcess(
            cluster.kubeconfig,
            tmp_path / f"{name}.log",
            {**QUICK, "POD_NAME": name},
            args=["--leader-elect", "--leader-election-namespace", namespace],
        )
        for name in ("replica-a", "replica-b")
    }
    try:
        for process in processes.values():
            process.start()
        yield Replicas(api, namespace, processes)
    finally:
        for process in processes.values():
            process.thaw()
            process.stop()
        operator.start()


def test_the_standby_takes_over_from_a_killed_leader_without_overbooking(
    replicas: Replicas, api: client.ApiClient, namespace: str, make_pool: Callable[..., NodePool]
) -> None:
    jobs = Jobs(api, namespace, replicas)
    wait_for(lambda: replicas.leader() is not None, TIMEOUT, "a leader", replicas.assert_alive)
    pool = make_pool(count=4)  # 32 GPUs: eight 4-GPU jobs at a time
    names = [f"ha-{index}" for index in range(20)]
    for name in names:
        jobs.create(name, pool, num_nodes=1, gpus=4)
    samples: list[dict[str, int]] = []
    wait_for(
        lambda: any(jobs.status(name).get("phase") in ("Starting", "Running") for name in names),
        TIMEOUT,
        "admissions under way",
    )
    leader = replicas.leader()
    assert leader is not None
    standby = next(name for name in replicas.processes if name != leader)
    replicas.processes[leader].kill()
    killed_at = time.monotonic()

    def standby_leads() -> bool:
        samples.append(overbooked(jobs, names, gpus_per_job=4, gpus_per_node=8))
        return replicas.leader() == standby

    wait_for(standby_leads, 60, "the standby holding the Lease", replicas.processes[standby].assert_alive)
    takeover = time.monotonic() - killed_at

    finished: set[str] = set()

    def progress() -> bool:
        samples.append(overbooked(jobs, names, gpus_per_job=4, gpus_per_node=8))
        for name in names:
            status = jobs.status(name)
            if status.get("phase") == "Succeeded":
                finished.add(name)
            elif status.get("phase") == "Running" and name not in finished:
                jobs.exit(name, 0)
        return len(finished) == len(names)

    wait_for(
        progress, 240, "all 20 jobs Succeeded under the new leader", replicas.processes[standby].assert_alive
    )
    assert [sample for sample in samples if sample] == []  # never more GPUs placed on a node than it has
    assert len(samples) > 2
    for name in names:
        status = jobs.status(name)
        assert (status["restarts"], status["attempt"]) == (0, 0), (name, status)  # admitted once
    # The lease lasts 10 s: a standby polling every second takes over within lease + 2 retry periods.
    assert takeover < 20, takeover


def _writes_after(manager: str, since: datetime.datetime, objects: list[dict[str, Any]]) -> list[str]:
    """Objects that ``manager`` wrote after ``since`` (from their managedFields, second precision)."""
    found = []
    for item in objects:
        for entry in (item.get("metadata") or {}).get("managedFields") or []:
            if entry.get("manager") != manager:
                continue  # among them the applies' one manager, whose entry of a no-op apply has no time
            stamp = entry.get("time")
            if stamp is None or datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")) > since:
                found.append(f"{item['metadata']['name']} at {stamp}")  # an undated write counts
    return found


def test_a_frozen_leader_is_replaced_and_writes_nothing_when_it_resumes(
    replicas: Replicas, api: client.ApiClient, namespace: str, gpu_pool: NodePool
) -> None:
    jobs = Jobs(api, namespace, replicas)
    wait_for(lambda: replicas.leader() is not None, TIMEOUT, "a leader", replicas.assert_alive)
    jobs.create("before", gpu_pool, num_nodes=1, gpus=4)
    jobs.wait_phase("before", "Running")
    leader, old_holder = replicas.leader(), replicas.holder()
    assert leader is not None
    assert old_holder is not None
    standby = next(name for name in replicas.processes if name != leader)
    jobs = Jobs(api, namespace, replicas.processes[standby])  # the old leader is meant to exit

    # Cut off, as by a partition: it neither renews its Lease nor writes, and does not know it.
    frozen_at = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(seconds=1)
    old, new = replicas.processes[leader], replicas.processes[standby]
    old.freeze()
    wait_for(lambda: replicas.leader() == standby, 60, "the standby holding the Lease")

    # The old leader comes back to work only it can see: a job created while the new leader is
    # briefly frozen too (well within its renew deadline). Unfenced, it would admit that job at once.
    new.freeze()
    jobs.create("late", gpu_pool, num_nodes=1, gpus=4)
    old.thaw()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and old.process is not None and old.process.poll() is None:
        time.sleep(0.1)
    new.thaw()
    wait_for(lambda: old.process is not None and old.process.poll() is not None, 60, "the old leader exiting")
    assert "lost the lease" in old.log.read_text()
    jobs.wait_phase("late", "Running")  # the new leader acts
    jobs.exit("before", 0)
    jobs.exit("late", 0)
    jobs.wait_phase("before", "Succeeded")
    jobs.wait_phase("late", "Succeeded")

    core = client.CoreV1Api(api)
    listings = (core.list_namespaced_pod, core.list_namespaced_service, core.list_namespaced_event)
    written: list[dict[str, Any]] = [
        *client.CustomObjectsApi(api).list_namespaced_custom_object(
            "largo.dev", "v1alpha1", namespace, "trainjobs"
        )["items"],
        *(api.sanitize_for_serialization(item) for listing in listings for item in listing(namespace).items),
    ]
    new_holder = replicas.holder()
    assert new_holder is not None
    assert _writes_after(new_holder, frozen_at, written)  # the check sees writes where there are some
    assert _writes_after(old_holder, frozen_at, written) == []
