"""The reconciler's glue, with a fake API: the scheduler's hint is acted on before the index catches up,
a stale decision never acts, and a refused create is recorded and raised for back-off."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from largo.controllers.kube import ConflictError, CreateRefused
from largo.controllers.state import job_entry
from largo.controllers.trainjob import TrainJobReconciler, job_view
from largo.policy.conditions import timestamp
from largo.policy.trainjob import Timings
from largo.sched.inventory import node_info

NOW = 1_800_000_000.0
KEY = ("ns", "j")


def _body(phase: str | None, version: str, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "largo.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {
            "name": "j",
            "namespace": "ns",
            "uid": "uid-j",
            "resourceVersion": version,
            "generation": 1,
        },
        "spec": {"image": "i", "numNodes": 1, "resourcesPerNode": {"nvidia.com/gpu": 8}},
        "status": {"phase": phase, **status} if phase else {},
    }


class FakeKube:
    def __init__(self, conflict: bool = False, refuse: str | None = None) -> None:
        self.conflict, self.refuse = conflict, refuse
        self.writes: list[tuple[str | None, Mapping[str, Any]]] = []
        self.created: list[str] = []
        self.manifests: list[Mapping[str, Any]] = []
        self.events: list[str] = []

    async def patch_trainjob_status(
        self, namespace: str, name: str, resource_version: str | None, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        if self.conflict:
            raise ConflictError("Conflict")
        self.writes.append((resource_version, status))
        return {**_body(None, "3"), "status": dict(status)}

    async def create(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        if manifest["kind"] == "Pod" and self.refuse:
            raise CreateRefused("Pod", manifest["metadata"]["name"], "CreateRefused", self.refuse)
        self.created.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
        self.manifests.append(manifest)

    async def keep(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        await self.create(namespace, manifest)

    async def delete_pod(self, namespace: str, name: str, force: bool = False) -> None:
        raise AssertionError("nothing to delete")

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append(reason)


def _reconciler(kube: FakeKube, indexed: dict[str, Any]) -> TrainJobReconciler:
    node = node_info(
        {
            "metadata": {"name": "n0"},
            "status": {
                "allocatable": {"nvidia.com/gpu": "8", "cpu": "8", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    )
    return TrainJobReconciler(
        kube=kube,  # type: ignore[arg-type]
        nodes={"n0": [node]},
        jobs={KEY: [job_entry(indexed)]},
        pods={},
        reports={},
        wake_scheduler=lambda: None,
        clock=lambda: NOW,
        timings=Timings(),
    )


def _hinted() -> dict[str, Any]:
    placement = {"attempt": 0, "nodes": ["n0"]}
    return _body("Starting", "2", attempt=0, placement=placement, startTime="2027-01-15T08:00:00Z")


def test_the_scheduler_s_hint_creates_the_gang_before_the_index_catches_up() -> None:
    kube = FakeKube()
    reconciler = _reconciler(kube, _body("Queued", "1"))
    asyncio.run(reconciler.reconcile(KEY))
    assert kube.created == []  # the index alone says Queued: nothing to create
    reconciler.hint(KEY, _hinted())
    asyncio.run(reconciler.reconcile(KEY))
    assert kube.created == ["Service/j", "ConfigMap/j-progress", "Pod/j-node-0"]


def test_the_job_s_own_labels_stay_off_its_children() -> None:
    """Children carry the template's labels and largo's, owner references, never the job's own labels: a
    job labelled ``app: web`` put its pods behind the user's Service selecting ``app: web``."""
    kube = FakeKube()
    hinted = _hinted()
    hinted["metadata"]["labels"] = {"app": "web"}
    reconciler = _reconciler(kube, hinted)
    reconciler.hint(KEY, hinted)
    asyncio.run(reconciler.reconcile(KEY))
    assert [m["kind"] for m in kube.manifests] == ["Service", "ConfigMap", "Pod"]
    for manifest in kube.manifests:
        assert "app" not in (manifest["metadata"].get("labels") or {}), manifest["kind"]
        (reference,) = manifest["metadata"]["ownerReferences"]
        assert (reference["kind"], reference["name"], reference["controller"]) == ("TrainJob", "j", True)


def test_the_admission_write_is_completed_with_what_the_first_reconcile_would_write() -> None:
    """The scheduler's admission write carries the first reconcile's status (counts, start time, when
    the pods can be created): that reconcile then creates the pods without a write of its own."""
    queued = _body("Queued", "1", attempt=0)
    reconciler = _reconciler(FakeKube(), queued)
    patch = {"phase": "Starting", "placement": {"attempt": 0, "nodes": ["n0"]}, "queue": None}
    completed = reconciler.complete_admission(job_entry(queued), patch)
    assert completed["placement"]["creatingSince"] == timestamp(NOW)
    assert completed["placement"]["nodes"] == ["n0"]
    assert "startTime" in completed


def test_a_decision_on_a_stale_version_never_acts() -> None:
    kube = FakeKube(conflict=True)
    reconciler = _reconciler(kube, _body("Queued", "1"))
    reconciler.hint(KEY, {**_hinted(), "status": {**_hinted()["status"], "nodes": "stale"}})
    with pytest.raises(ConflictError):
        asyncio.run(reconciler.reconcile(KEY))
    assert kube.created == []
    assert kube.events == []


def test_a_refused_pod_is_recorded_then_raised_for_back_off() -> None:
    kube = FakeKube(refuse='pods "j-node-0" is forbidden: exceeded quota: q')
    reconciler = _reconciler(kube, _hinted())
    with pytest.raises(CreateRefused):
        asyncio.run(reconciler.reconcile(KEY))
    assert kube.created[0] == "Service/j"  # the Service first, then the pods (refused here)
    assert "Pod/j-node-0" not in kube.created
    refusal = kube.writes[-1][1]
    assert refusal["reason"] == "CreateRefused"
    assert "exceeded quota" in refusal["message"]
    assert kube.events[-1] == "CreateRefused"


def test_the_next_reconcile_decides_on_the_version_its_own_write_returned() -> None:
    kube = FakeKube()
    reconciler = _reconciler(kube, _hinted())  # the index shows version 2, and keeps showing it
    reconciler.count_interval = 0.0
    reconciler.hint(KEY, {**_hinted(), "status": {**_hinted()["status"], "nodes": "stale"}})
    asyncio.run(reconciler.reconcile(KEY))  # writes on version 2; the fake API answers with version 3
    assert [version for version, _ in kube.writes] == ["2"]
    pod = {
        "metadata": {
            "name": "j-node-0",
            "labels": {"largo.dev/node-rank": "0", "largo.dev/attempt": "0"},
            "ownerReferences": [{"uid": "uid-j"}],
        },
        "spec": {"nodeName": "n0"},
        "status": {"phase": "Pending"},
    }
    reconciler.pods = {KEY: [pod]}
    asyncio.run(reconciler.reconcile(KEY))  # a pod appeared: the counts change
    assert [version for version, _ in kube.writes] == ["2", "3"]  # not 2 again: that would conflict


def test_a_running_gang_on_a_node_not_ready_is_told_and_looked_at_again_when_its_grace_ends() -> None:
    """The reconciler reads the node's Ready transition time from the index: within the grace period
    it keeps the gang and returns when the grace ends (the node sends no event then)."""
    kube = FakeKube()
    running = _body(
        "Running",
        "2",
        attempt=0,
        placement={"attempt": 0, "nodes": ["n0"]},
        startTime="2027-01-15T07:00:00Z",
    )
    reconciler = _reconciler(kube, running)
    reconciler.nodes = {
        "n0": [
            node_info(
                {
                    "metadata": {"name": "n0"},
                    "status": {
                        "allocatable": {"nvidia.com/gpu": "8"},
                        "conditions": [
                            {"type": "Ready", "status": "False", "lastTransitionTime": "2027-01-15T07:59:50Z"}
                        ],
                    },
                }
            )
        ]
    }
    labels = {"largo.dev/node-rank": "0", "largo.dev/attempt": "0"}
    pod = {
        "metadata": {"name": "j-node-0", "labels": labels, "ownerReferences": [{"uid": "uid-j"}]},
        "spec": {"nodeName": "n0"},
        "status": {"phase": "Running"},
    }
    reconciler.pods = {KEY: [pod]}
    again = asyncio.run(reconciler.reconcile(KEY))
    assert again == 50  # Timings().node_lost_after (60 s) after the node stopped being Ready
    assert kube.writes[-1][1]["reason"] == "NodeNotReady"
    assert kube.events == ["NodeNotReady"]


def test_a_decision_s_events_are_posted_even_when_its_pod_calls_fail() -> None:
    """The restart's event (with the exit code) went out after the deletes: a delete that failed
    lost it, and the retry, deciding on the written status, had no event to post."""
    kube = FakeKube()  # its delete_pod raises
    running = _body("Running", "2", attempt=0, placement={"attempt": 0, "nodes": ["n0"]})
    reconciler = _reconciler(kube, running)
    labels = {"largo.dev/node-rank": "0", "largo.dev/attempt": "0"}
    failed = {
        "metadata": {"name": "j-node-0", "labels": labels, "ownerReferences": [{"uid": "uid-j"}]},
        "spec": {"nodeName": "n0"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1}}}],
        },
    }
    reconciler.pods = {KEY: [failed]}
    with pytest.raises(AssertionError, match="nothing to delete"):
        asyncio.run(reconciler.reconcile(KEY))
    assert kube.writes[-1][1]["phase"] == "Restarting"
    assert "PodFailed" in kube.events


class DeletingKube(FakeKube):
    def __init__(self) -> None:
        super().__init__()
        self.deleted: list[str] = []

    async def delete_pod(self, namespace: str, name: str, force: bool = False) -> None:
        self.deleted.append(name)


def test_the_binding_timeout_counts_from_when_the_operator_saw_the_pod_wait() -> None:
    """kube-scheduler stamps PodScheduled with its own clock; one two minutes behind the operator's
    released a gang the moment its pod waited. The wait counts from the operator's first sight."""
    kube = DeletingKube()
    clock = [NOW]
    starting = _body("Starting", "2", attempt=0, placement={"attempt": 0, "nodes": ["n0"]})
    reconciler = _reconciler(kube, starting)
    reconciler.clock = lambda: clock[0]
    reconciler.count_interval = 0.0
    labels = {"largo.dev/node-rank": "0", "largo.dev/attempt": "0"}
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/1 nodes are available",
        "lastTransitionTime": "2027-01-15T07:58:00Z",  # NOW - 120 s by the scheduler's clock
    }
    pod = {
        "metadata": {"name": "j-node-0", "labels": labels, "ownerReferences": [{"uid": "uid-j"}]},
        "spec": {},
        "status": {"phase": "Pending", "conditions": [unschedulable]},
    }
    reconciler.pods = {KEY: [pod]}
    again = asyncio.run(reconciler.reconcile(KEY))
    assert kube.deleted == []
    assert again == pytest.approx(30)  # Timings().binding_timeout from now, when it was first seen
    clock[0] = NOW + 29
    asyncio.run(reconciler.reconcile(KEY))
    assert kube.deleted == []
    clock[0] = NOW + 30
    asyncio.run(reconciler.reconcile(KEY))
    assert kube.deleted == ["j-node-0"]
    assert "could not be bound" in str(kube.writes[-1][1].get("message") or kube.writes[-1][1])


def test_a_spec_largo_cannot_run_is_the_job_s_reason() -> None:
    """An object the schema let through (created before the CRD had the rule) is refused with
    InvalidSpec, shown as status.reason (``kubectl get tj -o wide``), not a stale one."""
    body = _body("Queued", "1", reason="InsufficientCapacity", message="needs 1 pod x 8 nvidia.com/gpu")
    body["spec"]["resourcesPerNode"] = {"nvidia.com/gpu": "1.5"}
    kube = FakeKube()
    asyncio.run(_reconciler(kube, body).reconcile(KEY))
    assert kube.events == ["InvalidSpec"]
    ((_, patch),) = kube.writes
    assert patch["reason"] == "InvalidSpec"
    assert "must be a whole" in patch["message"]


@pytest.mark.parametrize(("policy", "ignored"), [({}, False), ({"disruptions": "Ignore"}, True)])
def test_the_failure_policy_s_disruptions_reach_the_lifecycle(policy: dict[str, Any], ignored: bool) -> None:
    body = _body("Running", "1")
    body["spec"]["failurePolicy"] = policy
    entry = job_entry(body)
    assert entry.job is not None
    assert job_view(entry.job, body).ignore_disruptions is ignored
