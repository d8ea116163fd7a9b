"""The InferenceService reconciler's glue, with a fake API: what it deletes is deleted even when the API
server refuses a create of the same cycle."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from largo.api.v1alpha1 import InferenceService
from largo.controllers.inferenceservice import InferenceServiceReconciler
from largo.controllers.kube import CreateRefused
from largo.controllers.state import service_entry
from largo.manifests import names
from largo.manifests.inferenceservice import ModelMount, revision
from largo.policy.conditions import timestamp
from largo.sched.inventory import node_info

NOW = 1_800_000_000.0
KEY = ("ns", "chat")


def _service(replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "largo.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {
            "name": "chat",
            "namespace": "ns",
            "uid": "uid-chat",
            "resourceVersion": "1",
            "generation": 2,
        },
        "spec": {"model": {"claimName": "weights"}, "replicas": replicas},
        "status": {},
    }


def _leftover_pod() -> dict[str, Any]:
    """A running member of a group the status no longer lists: the reconcile deletes it."""
    return {
        "metadata": {
            "name": names.member_pod_name("chat", 0, 0),
            "labels": {names.LABEL_REPLICA: "0", names.LABEL_MEMBER: "0", names.LABEL_ATTEMPT: "0"},
            "ownerReferences": [{"uid": "uid-chat"}],
        },
        "spec": {"nodeName": "n0"},
        "status": {"phase": "Running"},
    }


class RefusingKube:
    """Refuses the Service named after the InferenceService, as when one of that name is not ours."""

    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.events: list[str] = []

    async def patch_service_status(
        self, namespace: str, name: str, resource_version: str | None, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {**_service(0), "status": dict(status)}

    async def create(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        if (manifest["kind"], manifest["metadata"]["name"]) == ("Service", "chat"):
            raise CreateRefused("Service", "chat", "NameConflict", 'services "chat" already exists')

    async def apply(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        pass

    async def keep(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        await self.create(namespace, manifest)

    async def delete_pod(self, namespace: str, name: str, force: bool = False) -> None:
        self.deleted.append(name)

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append(reason)


def test_a_refused_network_create_does_not_hold_back_the_deletes() -> None:
    kube = RefusingKube()
    reconciler = InferenceServiceReconciler(
        kube=kube,  # type: ignore[arg-type]
        nodes={},
        services={KEY: [service_entry(_service(0))]},
        pods={KEY: [_leftover_pod()]},
        trainjobs={},
        claims={("ns", "weights"): [{}]},
        autoscalers={},
        wake_scheduler=lambda: None,
        clock=lambda: NOW,
    )
    with pytest.raises(CreateRefused):  # raised for kopf's back-off, after the deletes
        asyncio.run(reconciler.reconcile(KEY))
    assert kube.deleted == [names.member_pod_name("chat", 0, 0)]
    assert kube.events[-1] == "NameConflict"


class AcceptingKube(RefusingKube):
    async def create(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        pass


def _serving_one_group(
    body: dict[str, Any], node_status: Mapping[str, Any], now: float, **settings: Any
) -> tuple[AcceptingKube, float | None, list[Mapping[str, Any]]]:
    """One reconcile at ``now`` of ``body``, whose group 0 runs its member on n0 (``node_status``):
    the fake API, what the reconcile returned, and the status patches it wrote."""
    current = revision(InferenceService.from_body(body).spec, ModelMount(claim_name="weights"))
    member = _leftover_pod()
    member["metadata"]["labels"][names.LABEL_REVISION] = current
    kube = AcceptingKube()
    written: list[Mapping[str, Any]] = []

    async def patch(namespace: str, name: str, version: str | None, status: Mapping[str, Any]) -> Any:
        written.append(status)
        return {**body, "status": dict(status)}

    kube.patch_service_status = patch  # type: ignore[method-assign]
    node = node_info({"metadata": {"name": "n0"}, "spec": {}, "status": dict(node_status)})
    reconciler = InferenceServiceReconciler(
        kube=kube,  # type: ignore[arg-type]
        nodes={"n0": [node]},
        services={KEY: [service_entry(body)]},
        pods={KEY: [member]},
        trainjobs={},
        claims={("ns", "weights"): [{}]},
        autoscalers={},
        wake_scheduler=lambda: None,
        clock=lambda: now,
        **settings,
    )
    return kube, asyncio.run(reconciler.reconcile(KEY)), written


def _group(body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    current = revision(InferenceService.from_body(body).spec, ModelMount(claim_name="weights"))
    return {"replica": 0, "attempt": 0, "revision": current, "nodes": ["n0"], **extra}


def test_a_group_with_a_newer_operator_s_field_keeps_its_running_pods() -> None:
    """After a rollback of the operator (not of its CRD), a group entry holds a field this version does
    not know: the group is kept (without that field), never taken for gone and its pods deleted."""
    body = _service(1)
    body["status"] = {"groups": [_group(body, admittedAt="2027-01-15T08:00:00Z", zone="a")]}
    ready = {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]}
    kube, _, written = _serving_one_group(body, ready, NOW)
    assert kube.deleted == []
    groups = [group for status in written for group in status.get("groups") or []]
    assert groups
    assert all(group["replica"] == 0 and group["nodes"] == ["n0"] and "zone" not in group for group in groups)


def test_a_member_s_node_not_ready_restarts_its_group_only_when_the_grace_period_ends() -> None:
    """As for a TrainJob: a node not Ready for less than LARGO_NODE_LOST_SECONDS keeps the group, and
    the reconcile looks again when the grace ends; then the group restarts and its pod is removed."""
    body = _service(1)
    body["status"] = {"groups": [_group(body, admittedAt="2027-01-15T08:00:00Z")]}
    not_ready = {
        "allocatable": {"nvidia.com/gpu": "8"},
        "conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "2027-01-15T07:59:50Z"}],
    }
    node = node_info({"metadata": {"name": "n0"}, "spec": {}, "status": not_ready})
    assert node.not_ready_since == NOW - 10
    kube, again, written = _serving_one_group(body, not_ready, NOW, node_lost_after=60.0)
    assert kube.deleted == []
    assert again == 50  # 60 s of grace, 10 of them gone
    assert all(g["attempt"] == 0 for status in written for g in status.get("groups") or [])
    kube, _, written = _serving_one_group(body, not_ready, NOW + 50, node_lost_after=60.0)
    assert kube.deleted == [names.member_pod_name("chat", 0, 0)]
    assert [g["attempt"] for g in written[-1]["groups"]] == [1]
    assert "GroupRestarted" in kube.events


GPU_NODE = node_info(
    {
        "metadata": {"name": "n0"},
        "spec": {},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "allocatable": {"nvidia.com/gpu": "8"},
        },
    }
)


def test_an_admitted_group_whose_service_name_is_taken_gives_its_gpus_back() -> None:
    """The network goes before the pods: its refusal (a Service of that name that is not ours, a
    TrainJob's of the same name) is recorded on the group waiting for it, whose GPUs go back after the
    binding timeout, as when its pods are refused. It once held them for good, without a pod."""
    body = _service(1)
    body["spec"]["resourcesPerNode"] = {"nvidia.com/gpu": 8}
    admitted = {"queuedAt": timestamp(NOW - 60), "admittedAt": timestamp(NOW - 50), "ready": False}
    body["status"] = {"groups": [{**_group(body), **admitted, "restarts": 0}]}
    kube = RefusingKube()
    created: list[str] = []
    refuse = kube.create

    async def create(namespace: str, manifest: Mapping[str, Any]) -> None:
        if manifest["kind"] == "Pod":
            created.append(manifest["metadata"]["name"])
        await refuse(namespace, manifest)

    async def patch(namespace: str, name: str, version: str | None, status: Mapping[str, Any]) -> Any:
        body["status"] = {**body["status"], **status}
        return body

    kube.create = create  # type: ignore[method-assign]
    kube.patch_service_status = patch  # type: ignore[method-assign]
    for seconds in (0, 10, 60):
        reconciler = InferenceServiceReconciler(
            kube=kube,  # type: ignore[arg-type]
            nodes={"n0": [GPU_NODE]},
            services={KEY: [service_entry(body)]},
            pods={},
            trainjobs={},
            claims={("ns", "weights"): [{}]},
            autoscalers={},
            wake_scheduler=lambda: None,
            clock=lambda seconds=seconds: NOW + seconds,  # type: ignore[misc]
        )
        with pytest.raises(CreateRefused):
            asyncio.run(reconciler.reconcile(KEY))
        if seconds < 60:
            (group,) = body["status"]["groups"]
            assert group["createRefused"]["reason"] == "NameConflict"
            assert kube.events.count("NameConflict") == 1  # told once, not at every retry
    assert created == []
    (group,) = body["status"]["groups"]
    assert not group.get("nodes")  # released: queued again, its GPUs for the next in line


def _reconciler(
    kube: RefusingKube, body: dict[str, Any], claims: dict[Any, Any]
) -> InferenceServiceReconciler:
    """A reconciler of ``body`` alone, on no node, at ``NOW``."""
    return InferenceServiceReconciler(
        kube=kube,  # type: ignore[arg-type]
        nodes={},
        services={KEY: [service_entry(body)]},
        pods={},
        trainjobs={},
        claims=claims,
        autoscalers={},
        wake_scheduler=lambda: None,
        clock=lambda: NOW,
    )


def test_a_refused_network_no_group_waits_for_is_told_once() -> None:
    """Scaled to zero (or its groups queued for GPUs): no group carries the refusal, which was told in
    a new Warning event at every retry, one per 10 s for as long as the name was taken."""
    body = _service(0)
    kube = RefusingKube()

    async def patch(namespace: str, name: str, version: str | None, status: Mapping[str, Any]) -> Any:
        body["status"] = {**(body.get("status") or {}), **status}
        return body

    kube.patch_service_status = patch  # type: ignore[method-assign]
    reconciler = _reconciler(kube, body, claims={("ns", "weights"): [{}]})
    for _ in range(5):  # the work queue's retries
        reconciler.services[KEY] = [service_entry(body)]
        with pytest.raises(CreateRefused):
            asyncio.run(reconciler.reconcile(KEY))
    assert kube.events.count("NameConflict") == 1
    # Deleted and created again under its name: another service, told again.
    body["metadata"] = {**body["metadata"], "uid": "uid-again"}
    reconciler.services[KEY] = [service_entry(body)]
    with pytest.raises(CreateRefused):
        asyncio.run(reconciler.reconcile(KEY))
    assert kube.events.count("NameConflict") == 2


def test_a_running_service_whose_spec_turns_invalid_is_not_shown_ready() -> None:
    """Edited to what largo cannot run (``cpu: 10E``, which the schema lets through): Ready=False with
    InvalidSpec, and the phase agrees (Degraded while the replicas of the spec before still serve)."""
    body = _service(2)
    body["spec"]["resourcesPerNode"] = {"cpu": "10E"}
    body["status"] = {"phase": "Ready", "readyReplicas": 2, "ready": "2/2"}
    kube = AcceptingKube()
    written: list[Mapping[str, Any]] = []

    async def patch(namespace: str, name: str, version: str | None, status: Mapping[str, Any]) -> Any:
        written.append(status)
        return body

    kube.patch_service_status = patch  # type: ignore[method-assign]
    reconciler = _reconciler(kube, body, claims={})
    asyncio.run(reconciler.reconcile(KEY))
    ((patch_written),) = written
    assert patch_written["phase"] == "Degraded"
    assert patch_written["reason"] == "InvalidSpec"
    assert kube.events == ["InvalidSpec"]
