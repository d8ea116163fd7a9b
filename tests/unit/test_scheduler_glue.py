"""The scheduler loop's glue around the pure gang scheduler, with a fake API in place of a cluster:
no pass on a partial inventory, admissions written but not yet indexed keep their capacity, a
conflicting write admits nothing, and the admission write carries the first reconcile's status."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
from largo.controllers.kube import ConflictError
from largo.controllers.scheduler import PASS_RETRY_SECONDS, QUEUE_MESSAGE_REFRESH_SECONDS, Scheduler
from largo.controllers.state import JobEntry, JobKey, PodUsage, job_entry, service_entry
from largo.sched.inventory import node_info

NOW = 1_800_000_000.0


def _node(name: str, gpus: int = 8) -> Any:
    return node_info(
        {
            "metadata": {"name": name, "labels": {}},
            "spec": {},
            "status": {
                "allocatable": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": str(gpus), "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    )


def _job(
    name: str,
    gpus: int = 8,
    nodes: int = 1,
    created: str = "2027-01-15T08:00:00Z",
    status: Mapping[str, Any] | None = None,
    checkpoint: Mapping[str, Any] | None = None,
) -> JobEntry:
    return job_entry(
        {
            "apiVersion": "largo.dev/v1alpha1",
            "kind": "TrainJob",
            "metadata": {
                "name": name,
                "namespace": "ns",
                "uid": f"uid-{name}",
                "resourceVersion": "1",
                "creationTimestamp": created,
                "generation": 1,
            },
            "spec": {
                "image": "i",
                "numNodes": nodes,
                "resourcesPerNode": {"nvidia.com/gpu": gpus},
                **({"checkpoint": dict(checkpoint)} if checkpoint else {}),
            },
            "status": dict(status or {}),
        }
    )


class FakeKube:
    def __init__(self, conflict: set[str] | None = None) -> None:
        self.writes: list[tuple[str, Mapping[str, Any]]] = []
        self.events: list[str] = []
        self.conflict = conflict or set()

    async def patch_trainjob_status(
        self, namespace: str, name: str, resource_version: str | None, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        if name in self.conflict:
            raise ConflictError(f"{namespace}/{name}: Conflict")
        self.writes.append((name, status))
        return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": "2"}, "status": status}

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append(reason)


class Index(dict[Any, list[Any]]):
    """A kopf index's read side: key -> store."""


class ServiceStatusKube(FakeKube):
    """Writes of a service's status answered with the object as written."""

    async def patch_service_status(
        self, namespace: str, name: str, resource_version: str | None, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        self.writes.append((name, status))
        metadata = {"name": name, "namespace": namespace, "resourceVersion": "2"}
        return {"metadata": metadata, "status": status}


def _scheduler(kube: FakeKube, nodes: list[Any], jobs: list[JobEntry], **kwargs: Any) -> Scheduler:
    admitted: list[JobKey] = []
    scheduler = Scheduler(
        kube=kube,  # type: ignore[arg-type]
        nodes=Index({node.name: [node] for node in nodes}),
        pods=Index(),
        jobs=Index({entry.key: [entry] for entry in jobs}),
        admitted=lambda key, body: admitted.append(key),
        clock=lambda: NOW,
        **kwargs,
    )
    scheduler.admitted_keys = admitted  # type: ignore[attr-defined]
    return scheduler


def test_no_pass_runs_before_the_indexes_are_filled_however_long_that_takes() -> None:
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0")], [_job("a")])

    async def scenario() -> None:
        loop = asyncio.create_task(scheduler.run(resync=0.01))
        await asyncio.sleep(0.2)  # twenty resync periods without a handler call
        assert kube.writes == []
        scheduler.wake()  # the first handler call: every index is filled
        for _ in range(100):
            if kube.writes:
                break
            await asyncio.sleep(0.01)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

    asyncio.run(scenario())
    assert [name for name, _ in kube.writes] == ["a"]


def test_an_admission_not_yet_indexed_keeps_its_capacity() -> None:
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0")], [_job("a")])
    asyncio.run(scheduler.run_pass())
    assert [name for name, _ in kube.writes] == ["a"]
    # A second job arrives; the index still shows "a" as new (its watch event has not come yet).
    scheduler.jobs[("ns", "b")] = [_job("b", created="2027-01-15T08:00:01Z")]  # type: ignore[index]
    asyncio.run(scheduler.run_pass())
    admitted = [name for name, status in kube.writes if status.get("phase") == "Starting"]
    assert admitted == ["a"]  # b is not admitted onto the GPUs a was given
    assert ("b", "Queued") in [(name, status.get("phase")) for name, status in kube.writes]


def test_a_conflicting_admission_reserves_nothing_and_is_decided_again() -> None:
    kube = FakeKube(conflict={"a"})
    scheduler = _scheduler(
        kube, [_node("n0"), _node("n1")], [_job("a"), _job("b", created="2027-01-15T08:00:01Z")]
    )

    async def conflicted() -> bool:
        await scheduler.run_pass()
        # Decided again in a second, when the index shows the newer version: at once, the same write
        # conflicted again for as long as the index lagged (hundreds of passes a second).
        woken_at_once = scheduler._wake.is_set()
        await asyncio.sleep(PASS_RETRY_SECONDS + 0.2)
        return not woken_at_once and scheduler._wake.is_set()

    assert asyncio.run(conflicted())
    assert scheduler.admitted_keys == [("ns", "b")]  # type: ignore[attr-defined]
    kube.conflict.clear()
    asyncio.run(scheduler.run_pass())
    # "a" was not held for the refused write: it gets the other node now, not a second one on top.
    starts = {name: status["placement"]["nodes"] for name, status in kube.writes if "placement" in status}
    assert sorted(starts) == ["a", "b"]
    assert starts["a"] != starts["b"]


def test_the_admission_write_carries_what_complete_admission_adds() -> None:
    kube = FakeKube()

    def complete(entry: JobEntry, patch: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**patch, "observedGeneration": 1, "nodes": "0/1"}

    scheduler = _scheduler(kube, [_node("n0")], [_job("a")], complete_admission=complete)
    asyncio.run(scheduler.run_pass())
    ((_, status),) = kube.writes
    assert status["phase"] == "Starting"
    assert status["placement"]["nodes"] == ["n0"]
    assert status["observedGeneration"] == 1
    assert status["reason"] == "Admitted"


@pytest.mark.parametrize("gpus", [9, 16])
def test_a_gang_that_can_never_fit_is_told_so(gpus: int) -> None:
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0")], [_job("big", gpus=gpus)])
    asyncio.run(scheduler.run_pass())
    ((_, status),) = kube.writes
    assert status["phase"] == "Queued"
    assert status["reason"] == "Unschedulable"
    assert status["queue"]["reason"] == "Unschedulable"


@pytest.mark.parametrize("gpus", [2, 0], ids=["gpu-job", "cpu-only-job"])
def test_a_bound_exclusive_pod_holds_its_whole_node_across_passes(gpus: int) -> None:
    """The node is the exclusive pod's: its free GPUs, and its pod slots (a CPU-only job would fit in
    the free cpu and memory), are no one else's until it goes."""
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0")], [_job("small", gpus=gpus)])
    exclusive = PodUsage(
        uid="p", requests={"nvidia.com/gpu": 4}, job=("ns", "other"), attempt=0, rank=0, exclusive=True
    )
    scheduler.pods[("n0")] = [exclusive]  # type: ignore[index]
    asyncio.run(scheduler.run_pass())
    ((_, status),) = kube.writes
    assert status["phase"] == "Queued"  # four GPUs are free, but the node is the exclusive pod's
    scheduler.pods["n0"] = [PodUsage("p", {"nvidia.com/gpu": 4})]  # type: ignore[index]
    scheduler.jobs[("ns", "small")] = [_job("small", gpus=gpus)]  # type: ignore[index]
    asyncio.run(scheduler.run_pass())
    assert kube.writes[-1][1]["phase"] == "Starting"  # an ordinary 4-GPU pod leaves room


class FailingKube(FakeKube):
    """Fails one job's admission write at once, answers the other's only after a while."""

    def __init__(self, fails: str, slow: str) -> None:
        super().__init__()
        self.fails, self.slow = fails, slow

    async def patch_trainjob_status(
        self, namespace: str, name: str, resource_version: str | None, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        if name == self.fails:
            raise RuntimeError("500 Internal Server Error")
        if name == self.slow:
            await asyncio.sleep(0.2)
        return await super().patch_trainjob_status(namespace, name, resource_version, status)


def test_a_failed_admission_fails_the_pass_only_once_the_others_are_written() -> None:
    """The pass ends with its last write: the slow admission is recorded as pending before the next
    pass runs, so that pass does not hand its nodes to another gang."""
    kube = FailingKube(fails="a", slow="b")
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], [_job("a"), _job("b")])

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="500"):
            await scheduler.run_pass()
        assert [name for name, _ in kube.writes] == ["b"]  # written before the pass ended
        scheduler.jobs[("ns", "c")] = [_job("c", created="2027-01-15T08:00:01Z")]  # type: ignore[index]
        kube.fails = ""
        await scheduler.run_pass()

    asyncio.run(scenario())
    placed = {name: status["placement"]["nodes"] for name, status in kube.writes if "placement" in status}
    # Two nodes: b keeps its own, one of a (retried) and c gets the other; no node is given twice.
    assert "b" in placed
    assert len(placed) == 2
    assert sorted(node for nodes in placed.values() for node in nodes) == ["n0", "n1"]


def test_a_released_gang_in_its_backoff_leaves_the_gpus_to_the_next_in_the_queue() -> None:
    """A job whose pods keep being refused waits out its backoff: the later job gets the node, and once
    the backoff is over the released one is admitted again, the time cleared."""
    backing_off = {"phase": "Queued", "attempt": 1, "releases": 1}
    backing_off["nextAdmissionTime"] = "2027-01-15T09:00:10Z"
    released = _job("released", status=backing_off)
    later = _job("later", created="2027-01-15T08:30:00Z")
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0")], [released, later])
    scheduler.clock = lambda: 1_800_000_000.0  # 2027-01-15T08:00:00Z
    asyncio.run(scheduler.run_pass())
    admitted = [name for name, status in kube.writes if status.get("phase") == "Starting"]
    assert admitted == ["later"]

    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0")], [released])
    scheduler.clock = lambda: 1_800_003_610.0  # 09:00:10, the backoff over
    asyncio.run(scheduler.run_pass())
    assert [name for name, _ in kube.writes] == ["released"]
    assert kube.writes[0][1]["phase"] == "Starting"
    assert kube.writes[0][1]["nextAdmissionTime"] is None


@pytest.mark.parametrize(
    ("holder_phase", "waits"),
    [
        ("Starting", True),
        ("Running", True),
        ("Restarting", True),
        ("Suspending", True),  # its pods may still be writing a last checkpoint
        ("Suspended", False),
        ("Succeeded", False),
        ("Failed", False),
    ],
)
def test_a_job_waits_while_another_that_writes_its_checkpoint_directory_holds_it(
    holder_phase: str, waits: bool
) -> None:
    shared = {"claimName": "ckpt"}
    placement = {"attempt": 0, "nodes": ["n1"]}
    holder = _job("sweep-1", checkpoint=shared, status={"phase": holder_phase, "placement": placement})
    later = _job("sweep-2", checkpoint=shared, created="2027-01-15T08:00:01Z")
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], [holder, later])
    asyncio.run(scheduler.run_pass())
    ((name, status),) = kube.writes
    assert name == "sweep-2"
    if waits:
        assert (status["phase"], status["reason"]) == ("Queued", "CheckpointInUse")
        said = "its checkpoint directory (claim ckpt) is in use by ns/sweep-1"
        assert status["queue"]["message"].startswith(said)
        assert kube.events == ["Queued", "CheckpointInUse"]
    else:
        assert status["phase"] == "Starting"


def test_an_admission_not_yet_indexed_holds_its_checkpoint_directory() -> None:
    kube = FakeKube()
    shared = {"claimName": "ckpt", "subPath": "run"}
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], [_job("a", checkpoint=shared)])
    asyncio.run(scheduler.run_pass())
    # The index still shows "a" as new when "b" arrives: "a"'s admission is only in the scheduler.
    scheduler.jobs[("ns", "b")] = [_job("b", checkpoint=shared, created="2027-01-15T08:00:01Z")]  # type: ignore[index]
    asyncio.run(scheduler.run_pass())
    phases = {name: status.get("phase") for name, status in kube.writes}
    assert phases == {"a": "Starting", "b": "Queued"}
    assert kube.writes[-1][1]["queue"]["reason"] == "CheckpointInUse"


SHARED = {"claimName": "ckpt"}


def _pass(jobs: list[JobEntry], pods: Mapping[str, list[PodUsage]] | None = None) -> dict[str, Any]:
    """One pass over ``jobs`` on two 8-GPU nodes; what it wrote, by job."""
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], jobs)
    scheduler.pods.update(pods or {})
    asyncio.run(scheduler.run_pass())
    return dict(kube.writes)


@pytest.mark.parametrize(
    "released",
    [
        # Released after a binding failure, in its backoff.
        {"phase": "Queued", "attempt": 1, "releases": 1, "nextAdmissionTime": "2027-01-15T09:00:00Z"},
        # Restarted, queued again and not placeable now (more GPUs than are free).
        {"phase": "Queued", "attempt": 2, "restarts": 1},
    ],
)
def test_a_gang_queued_again_keeps_its_checkpoint_directory(released: dict[str, Any]) -> None:
    released = {**released, "checkpointDirectory": "ckpt"}
    holder = _job("a", gpus=8, nodes=2, checkpoint=SHARED, status=released)
    busy = _job("busy", gpus=8, status={"phase": "Running", "placement": {"attempt": 0, "nodes": ["n1"]}})
    later = _job("b", gpus=2, checkpoint=SHARED, created="2027-01-15T08:00:01Z")
    written = _pass([holder, busy, later])
    assert written["b"]["queue"]["reason"] == "CheckpointInUse"
    assert "in use by ns/a" in written["b"]["queue"]["message"]


def test_a_gang_queued_again_is_not_kept_out_of_its_own_directory() -> None:
    status = {"phase": "Queued", "attempt": 1, "releases": 1, "checkpointDirectory": "ckpt"}
    written = _pass([_job("a", checkpoint=SHARED, status=status)])
    assert written["a"]["phase"] == "Starting"
    assert written["a"]["checkpointDirectory"] == "ckpt"


def test_a_running_gang_holds_the_directory_it_was_admitted_with_not_an_edited_one() -> None:
    # "a" runs on ckpt; its spec now says ckpt/other, which its pods do not use until the next attempt.
    running = {"phase": "Running", "placement": {"attempt": 0, "nodes": ["n0"]}}
    running["checkpointDirectory"] = "ckpt"
    edited = _job("a", gpus=2, checkpoint={"claimName": "ckpt", "subPath": "other"}, status=running)
    on_old = _job("b", gpus=2, checkpoint=SHARED, created="2027-01-15T08:00:01Z")
    other = {"claimName": "ckpt", "subPath": "other"}
    on_new = _job("c", gpus=2, checkpoint=other, created="2027-01-15T08:00:02Z")
    written = _pass([edited, on_old, on_new])
    assert written["b"]["queue"]["reason"] == "CheckpointInUse"
    assert written["c"]["phase"] == "Starting"


def _stopping_pod_of(job: str) -> PodUsage:
    """A pod of ``job`` still there (stopping), which mounts the shared directory."""
    requests = {"nvidia.com/gpu": 8}
    return PodUsage(uid="p", requests=requests, job=("ns", job), attempt=0, rank=0, checkpoint="ns/ckpt/")


@pytest.mark.parametrize("phase", ["Failed", "Succeeded", "Suspended"])
def test_a_stopped_gang_holds_its_directory_while_a_pod_of_it_is_left(phase: str) -> None:
    stopped = _job("a", checkpoint=SHARED, status={"phase": phase, "checkpointDirectory": "ckpt"})
    later = _job("b", gpus=2, checkpoint=SHARED, created="2027-01-15T08:00:01Z")
    stopping = _stopping_pod_of("a")
    written = _pass([stopped, later], {"n0": [stopping]})
    assert written["b"]["queue"]["reason"] == "CheckpointInUse"
    assert _pass([stopped, later])["b"]["phase"] == "Starting"


def test_a_deleted_job_s_stopping_pod_holds_its_directory_from_the_job_created_again_under_its_name() -> None:
    """The new job's pods are named for attempt 0 and collide with nothing: matched by name, the old
    pod's directory was the new job's own, and both gangs wrote it."""
    again = _job("a", gpus=2, checkpoint=SHARED)  # uid-a: the object now in the index
    old = dataclasses.replace(_stopping_pod_of("a"), owner="uid-a-deleted")
    written = _pass([again], {"n0": [old]})
    assert written["a"]["queue"]["reason"] == "CheckpointInUse"
    assert "ns/a (deleted, uid uid-a-deleted)" in written["a"]["queue"]["message"]
    own = dataclasses.replace(_stopping_pod_of("a"), owner="uid-a")  # its own pod: no wait for itself
    assert _pass([again], {"n0": [own]})["a"]["phase"] == "Starting"


def test_a_resumed_gang_whose_old_pods_still_stop_holds_its_spec_s_directory() -> None:
    resumed = _job("a", gpus=16, nodes=2, checkpoint=SHARED, status={"phase": "Queued", "attempt": 1})
    later = _job("b", gpus=2, checkpoint=SHARED, created="2027-01-15T08:00:01Z")
    stopping = _stopping_pod_of("a")
    written = _pass([resumed, later], {"n0": [stopping]})
    assert written["b"]["queue"]["reason"] == "CheckpointInUse"


def test_the_stopping_pods_of_a_deleted_job_hold_their_directory() -> None:
    later = _job("b", gpus=2, checkpoint=SHARED, created="2027-01-15T08:00:01Z")
    written = _pass([later], {"n0": [_stopping_pod_of("deleted")]})
    assert written["b"]["queue"]["reason"] == "CheckpointInUse"
    assert "in use by ns/deleted" in written["b"]["queue"]["message"]


def test_two_queued_jobs_whose_directories_were_swapped_do_not_wait_for_each_other() -> None:
    x, y = {"claimName": "ckpt", "subPath": "x"}, {"claimName": "ckpt", "subPath": "y"}
    # Both released after their directories were swapped in their specs: each recorded the other's.
    queued = {"phase": "Queued", "attempt": 1}
    a = _job("a", gpus=2, checkpoint=y, status={**queued, "checkpointDirectory": "ckpt/x"})
    b = _job("b", gpus=2, checkpoint=x, status={**queued, "checkpointDirectory": "ckpt/y"})
    written = _pass([a, b])
    assert (written["a"]["phase"], written["b"]["phase"]) == ("Starting", "Starting")
    assert (written["a"]["checkpointDirectory"], written["b"]["checkpointDirectory"]) == ("ckpt/y", "ckpt/x")


def test_a_queued_job_whose_spec_is_now_invalid_keeps_its_directory() -> None:
    # Released, then edited into a spec the operator cannot run: once fixed, it resumes its own training.
    broken = _job("a", nodes=0, checkpoint=SHARED, status={"phase": "Queued", "checkpointDirectory": "ckpt"})
    assert broken.request is None
    later = _job("b", gpus=2, checkpoint=SHARED, created="2027-01-15T08:00:01Z")
    assert _pass([broken, later])["b"]["queue"]["reason"] == "CheckpointInUse"


@pytest.mark.parametrize(("node", "holds"), [("not-ready", True), ("gone", False)])
def test_pods_of_a_deleted_job_hold_until_their_node_is_gone(node: str, holds: bool) -> None:
    """On a node that is not ready a pod may still run and write to network storage; on one that is
    gone it writes nothing more (and the pod garbage collector deletes it)."""
    kube = FakeKube()
    nodes = [_node("n0"), dataclasses.replace(_node("not-ready"), ready=False)]
    scheduler = _scheduler(kube, nodes, [_job("b", gpus=2, checkpoint=SHARED)])
    scheduler.pods.update({node: [_stopping_pod_of("deleted")]})
    asyncio.run(scheduler.run_pass())
    status = dict(kube.writes)["b"]
    assert (status["phase"] == "Queued") is holds
    assert (status.get("reason") == "CheckpointInUse") is holds


def test_a_wait_without_a_position_is_written_once() -> None:
    kube = FakeKube()
    holder = _job("a", checkpoint=SHARED, status={"phase": "Running", "checkpointDirectory": "ckpt"})
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], [holder, _job("b", checkpoint=SHARED)])
    asyncio.run(scheduler.run_pass())
    ((name, status),) = kube.writes
    assert (name, status["queue"]["position"]) == ("b", None)
    # The index now shows what was written, the null position dropped as the API server drops it.
    stored = {**status, "queue": {k: v for k, v in status["queue"].items() if v is not None}}
    scheduler.jobs[("ns", "b")] = [_job("b", checkpoint=SHARED, status=stored)]  # type: ignore[index]
    asyncio.run(scheduler.run_pass())
    assert [name for name, _ in kube.writes] == ["b"]


def test_a_job_or_service_being_deleted_is_not_admitted() -> None:
    """A foreground deletion keeps the object (with a deletionTimestamp) while its dependents go: it
    must not take GPUs meanwhile, nor hold back the jobs behind it."""
    going = _job("going")
    body = {**going.body, "metadata": {**going.body["metadata"], "deletionTimestamp": "2027-01-15T08:01:00Z"}}
    kube = FakeKube()
    after = _job("next", created="2027-01-15T08:00:01Z")
    scheduler = _scheduler(kube, [_node("n0")], [job_entry(body), after])
    asyncio.run(scheduler.run_pass())
    assert [name for name, status in kube.writes if status.get("phase") == "Starting"] == ["next"]
    service = service_entry(
        {
            "metadata": {"name": "chat", "namespace": "ns", "deletionTimestamp": "2027-01-15T08:01:00Z"},
            "spec": {"model": {"claimName": "weights"}, "replicas": 1},
            "status": {"groups": [{"replica": 0, "attempt": 0, "nodes": []}]},
        }
    )
    assert service.waiting(NOW) == []
    assert len(dataclasses.replace(service, body={}).waiting(NOW)) == 1


def test_a_gang_of_a_thousand_long_named_nodes_is_admitted() -> None:
    """The admission's message named every node: past ~750 cloud-named nodes it broke a condition's
    32768-character limit, and the pass failed every second without ever admitting the gang."""
    nodes = [_node(f"ip-10-0-{i // 250}-{i % 250}.us-west-2.compute.internal-gpu-pool") for i in range(1024)]
    kube = FakeKube()
    scheduler = _scheduler(kube, nodes, [_job("huge", nodes=1024)])
    asyncio.run(scheduler.run_pass())
    ((name, status),) = kube.writes
    assert (name, status["phase"]) == ("huge", "Starting")
    assert len(status["placement"]["nodes"]) == 1024


def test_a_waiting_job_s_detail_alone_is_rewritten_at_most_every_refresh_period() -> None:
    """The room left moves with every pod elsewhere: rewriting each waiting job at each change was one
    PATCH per queued job per pod event. Its reason or position is written at once; its detail alone
    once the refresh period has passed."""
    now = [NOW]
    waiting = _job("waiting", gpus=8, nodes=2, status={"phase": "Queued"})
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], [waiting])
    scheduler.clock = lambda: now[0]
    scheduler.pods["n0"] = [PodUsage("p", {"nvidia.com/gpu": 8})]  # type: ignore[index]
    asyncio.run(scheduler.run_pass())
    assert len(kube.writes) == 1
    told = kube.writes[0][1]["queue"]

    def again(pods_on_n1: int) -> None:
        # The index shows what was written; a pod elsewhere changes the room left.
        status = {"phase": "Queued", "queue": {k: v for k, v in told.items() if v is not None}}
        scheduler.jobs[waiting.key] = [_job("waiting", gpus=8, nodes=2, status=status)]  # type: ignore[index]
        scheduler.pods["n1"] = [PodUsage(f"q{i}", {"nvidia.com/gpu": 1}) for i in range(pods_on_n1)]  # type: ignore[index]
        asyncio.run(scheduler.run_pass())

    again(1)
    assert len(kube.writes) == 1, kube.writes[-1]  # the detail moved 1 s later: not rewritten
    now[0] += QUEUE_MESSAGE_REFRESH_SECONDS
    again(2)
    assert len(kube.writes) == 2
    assert kube.writes[-1][1]["queue"]["message"] != told["message"]


def test_a_waiting_group_s_detail_alone_is_rewritten_at_most_every_refresh_period() -> None:
    """As a waiting job's: a queued replica group's message (the room left) was written at every pod
    event elsewhere, and each write made the service's reconcile write its Ready message again."""

    def service(groups: list[dict[str, Any]]) -> Any:
        return service_entry(
            {
                "metadata": {"name": "chat", "namespace": "ns", "uid": "u1", "resourceVersion": "1"},
                "spec": {"model": {"claimName": "weights"}, "resourcesPerNode": {"nvidia.com/gpu": 8}},
                "status": {"groups": groups},
            }
        )

    now = [NOW]
    kube = ServiceStatusKube()
    groups = [{"replica": 0, "revision": "r1", "attempt": 0, "nodes": [], "queuedAt": "2027-01-15T07:00:00Z"}]
    scheduler = _scheduler(kube, [_node("n0")], [], services=Index())
    scheduler.clock = lambda: now[0]
    messages = []
    for used in (1, 2, 3):  # a pod on n0 takes more and more GPUs
        scheduler.pods = Index({"n0": [PodUsage("p", {"nvidia.com/gpu": used, "pods": 1})]})
        scheduler.services = Index({("ns", "chat"): [service(groups)]})
        kube.writes.clear()
        asyncio.run(scheduler.run_pass())
        for _, status in kube.writes:
            groups = status["groups"]  # the index shows the write
            messages.append(groups[0]["queue"]["message"])
    assert len(messages) == 1
    assert "largest free nvidia.com/gpu: 7" in messages[0]
    now[0] += QUEUE_MESSAGE_REFRESH_SECONDS
    scheduler.services = Index({("ns", "chat"): [service(groups)]})
    asyncio.run(scheduler.run_pass())
    assert "largest free nvidia.com/gpu: 5" in kube.writes[-1][1]["groups"][0]["queue"]["message"]


def test_failed_passes_back_off_to_thirty_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """An API server down for minutes was retried every second, each time with a traceback."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 7:
            raise asyncio.CancelledError

    async def failing() -> None:
        raise OSError("connection refused")

    scheduler = _scheduler(FakeKube(), [_node("n0")], [])
    scheduler.run_pass = failing  # type: ignore[method-assign]
    scheduler.wake()
    monkeypatch.setattr(asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(scheduler.run(resync=0.01))
    assert delays == [1, 2, 4, 8, 16, 30, 30]


def test_what_a_daemonset_pod_holds_makes_a_gang_that_needs_it_one_that_never_fits() -> None:
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0")], [_job("whole", gpus=8)])
    daemon = PodUsage(uid="d", requests={"nvidia.com/gpu": 1, "pods": 1}, resident=True)
    scheduler.pods["n0"] = [daemon]  # type: ignore[index]
    asyncio.run(scheduler.run_pass())
    ((_, status),) = kube.writes
    assert status["queue"]["reason"] == "Unschedulable"
    assert "DaemonSet" in status["queue"]["message"]


def test_a_finished_rank_of_a_running_gang_leaves_its_gpus_to_the_queue() -> None:
    """Rank 1 ended 0 (recorded in placement.succeededRanks: never created again) while rank 0 runs
    on: its node is free for the next job, not reserved as a rank still to be bound."""
    placement = {"attempt": 0, "nodes": ["n0", "n1"], "succeededRanks": [1]}
    running = _job("a", nodes=2, status={"phase": "Running", "attempt": 0, "placement": placement})
    waiting = _job("b", created="2027-01-15T08:00:05Z")
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], [running, waiting])
    rank_0 = PodUsage(uid="p0", requests={"nvidia.com/gpu": 8, "pods": 1}, job=("ns", "a"), attempt=0, rank=0)
    scheduler.pods = Index({"n0": [rank_0]})
    usage, _ = scheduler.usage([running, waiting])
    assert usage.get("n1", {}).get("nvidia.com/gpu", 0) == 0
    asyncio.run(scheduler.run_pass())
    assert [(name, status.get("phase")) for name, status in kube.writes] == [("b", "Starting")]


def test_a_stop_that_comes_with_a_wake_up_stops_the_scheduler() -> None:
    """Python 3.11's wait_for swallowed a cancel that came as its event was set: the operator's
    graceful stop then waited for ever on the scheduler, and kept the Lease till the kubelet's kill."""
    scheduler = _scheduler(FakeKube(), [_node("n0")], [])

    async def stopped() -> bool:
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.05)
        scheduler.wake()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        return task in done and task.cancelled()

    assert asyncio.run(stopped())


def test_a_job_deleted_and_created_again_before_the_index_showed_its_admission_is_decided() -> None:
    """``kubectl replace --force`` between two passes: the new object (another uid, no status) is another
    gang. The old one's admission, written but not indexed, was kept for it: the new job got no status
    at all and the old placement's GPUs stayed reserved."""
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0")], [_job("a")])
    asyncio.run(scheduler.run_pass())
    assert [name for name, _ in kube.writes] == ["a"]
    scheduler.jobs[("ns", "a")] = [dataclasses.replace(_job("a"), uid="uid-a-2")]  # type: ignore[index]
    kube.writes.clear()
    asyncio.run(scheduler.run_pass())
    ((name, status),) = kube.writes
    assert (name, status["phase"]) == ("a", "Starting")  # the old admission's GPUs are free again


def test_a_service_deleted_and_created_again_before_its_group_s_admission_was_indexed_is_decided() -> None:
    def service(uid: str) -> Any:
        group = {"replica": 0, "revision": "r1", "attempt": 0, "nodes": [], "queuedAt": "2027-01-15T08:00Z"}
        return service_entry(
            {
                "metadata": {"name": "chat", "namespace": "ns", "uid": uid, "resourceVersion": "1"},
                "spec": {"model": {"claimName": "weights"}, "resourcesPerNode": {"nvidia.com/gpu": 8}},
                "status": {"groups": [group]},
            }
        )

    kube = ServiceStatusKube()
    scheduler = _scheduler(kube, [_node("n0")], [], services=Index({("ns", "chat"): [service("uid-1")]}))
    asyncio.run(scheduler.run_pass())
    assert kube.writes[0][1]["groups"][0]["nodes"] == ["n0"]
    scheduler.services[("ns", "chat")] = [service("uid-2")]  # type: ignore[index]
    kube.writes.clear()
    asyncio.run(scheduler.run_pass())
    assert kube.writes
    assert kube.writes[0][1]["groups"][0]["nodes"] == ["n0"]


def test_the_stopping_pods_of_a_deleted_job_do_not_stand_for_the_ranks_of_its_namesake() -> None:
    """The new job of the same name is at attempt 0 again: the old one's pod of rank 0, still in its
    grace period, was taken for the new rank 0's, nothing was reserved where the new one was admitted,
    and the next gang got the same GPUs."""
    placement = {"attempt": 0, "nodes": ["n1"], "admittedAt": "2027-01-15T09:00:01Z"}
    new = _job("a", status={"phase": "Starting", "attempt": 0, "placement": placement})
    waiting = _job("b", created="2027-01-15T09:00:02Z")
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], [new, waiting])
    old_pod = PodUsage("old", {"nvidia.com/gpu": 8, "pods": 1}, ("ns", "a"), 0, 0, owner="uid-a-deleted")
    scheduler.pods = Index({"n0": [old_pod]})
    usage, _ = scheduler.usage([new, waiting])
    assert usage["n1"]["nvidia.com/gpu"] == 8
    asyncio.run(scheduler.run_pass())
    assert [name for name, status in kube.writes if status.get("phase") == "Starting"] == []
    # Its own pod (owned by the new object) is the rank's.
    pod = PodUsage("new", {"nvidia.com/gpu": 8, "pods": 1}, ("ns", "a"), 0, 0, owner="uid-a")
    scheduler.pods = Index({"n1": [pod]})
    assert scheduler.usage([new])[0]["n1"]["nvidia.com/gpu"] == 8


def test_a_pod_orphaned_by_hand_does_not_stand_for_the_rank_of_a_new_job_of_its_name() -> None:
    """``kubectl delete trainjob a --cascade=orphan`` leaves its pods running, with their labels and no
    owner: one on n0 was taken for the rank of a new job "a" admitted to n1, whose reservation there
    was dropped, and the next gang got the same GPUs."""
    placement = {"attempt": 0, "nodes": ["n1"], "admittedAt": "2027-01-15T09:00:01Z"}
    new = _job("a", status={"phase": "Starting", "attempt": 0, "placement": placement})
    kube = FakeKube()
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], [new])
    orphan = PodUsage("orphan", {"nvidia.com/gpu": 8, "pods": 1}, ("ns", "a"), 0, 0, owner=None)
    scheduler.pods = Index({"n0": [orphan]})
    usage, _ = scheduler.usage([new])
    assert usage["n0"]["nvidia.com/gpu"] == 8  # what it holds is held
    assert usage["n1"]["nvidia.com/gpu"] == 8  # and the new job's rank is still reserved


def test_a_job_created_suspended_waits_for_its_first_admission_from_its_resumption() -> None:
    """Created suspended a day before it was resumed: the day was counted as queue wait."""
    resumed = {"type": "Suspended", "status": "False", "lastTransitionTime": "2027-01-15T07:59:30Z"}
    waited: list[float] = []
    kube = FakeKube()
    jobs = [
        _job("resumed", created="2027-01-14T08:00:00Z", status={"phase": "Queued", "conditions": [resumed]}),
        _job("plain", created="2027-01-15T07:59:00Z"),
    ]
    scheduler = _scheduler(kube, [_node("n0"), _node("n1")], jobs, observe_admission=waited.append)
    asyncio.run(scheduler.run_pass())
    assert sorted(waited) == [30.0, 60.0]
