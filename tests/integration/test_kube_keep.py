"""Kept objects on a real API server: an InferenceService's network, applied once, is only read by a
restarted operator (the server's defaults and its own fields do not count as changes); a field changed
by hand is applied back."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from kubernetes import client
from largo.api.v1alpha1 import InferenceService
from largo.controllers.inferenceservice import InferenceServiceReconciler
from largo.controllers.kube import ConflictError, Kube

pytestmark = pytest.mark.integration


class CountingKube(Kube):
    """The operator's client, counting its applies."""

    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(api)
        self.applied: list[str] = []

    async def apply(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        self.applied.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
        await super().apply(namespace, manifest)


def _make_network(api: client.ApiClient, owner: Mapping[str, Any], service: InferenceService) -> list[str]:
    """What a freshly started operator applies for the service's network."""
    kube = CountingKube(api)
    reconciler = InferenceServiceReconciler(
        kube=kube,
        nodes={},
        services={},
        pods={},
        trainjobs={},
        claims={},
        autoscalers={},
        wake_scheduler=lambda: None,
        clock=lambda: 0.0,
    )
    key = (owner["metadata"]["namespace"], service.metadata.name)
    asyncio.run(reconciler.make_network(key, owner, service))
    return sorted(kube.applied)


def test_a_network_applied_before_is_only_read_until_something_changes(
    api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    # A stand-in owner (no InferenceService object, so the session's operator leaves this alone); the
    # garbage collector keeps children whose owner exists.
    holder = core.create_namespaced_config_map(namespace, {"metadata": {"name": "holder"}})
    owner = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "holder", "namespace": namespace, "uid": holder.metadata.uid},
    }
    body = {
        "metadata": {"name": "chat", "namespace": namespace, "uid": holder.metadata.uid},
        "spec": {"model": {"claimName": "weights"}, "router": {"nodeSelector": {"tier": "edge"}}},
    }
    service = InferenceService.from_body(body)
    first = _make_network(api, owner, service)
    # Three Services, the router's account, Role, binding, Deployment and PodDisruptionBudget.
    assert len(first) == 8, first
    assert _make_network(api, owner, service) == []  # a restart: read, nothing written

    # A field largo sets, changed by hand, is brought back; only that object is written.
    selector = core.read_namespaced_service("chat", namespace).spec.selector
    label = sorted(selector)[0]
    core.patch_namespaced_service("chat", namespace, {"spec": {"selector": {label: "someone-else"}}})
    assert _make_network(api, owner, service) == ["Service/chat"]
    assert core.read_namespaced_service("chat", namespace).spec.selector == selector
    # A field the spec drops is removed: the manifest changed, so it is applied.
    plain = InferenceService.from_body({**body, "spec": {"model": {"claimName": "weights"}}})
    assert _make_network(api, owner, plain) == ["Deployment/chat-router"]
    router = client.AppsV1Api(api).read_namespaced_deployment("chat-router", namespace)
    assert not router.spec.template.spec.node_selector
    assert _make_network(api, owner, plain) == []


def test_an_object_an_earlier_version_created_loses_a_field_this_one_drops(
    api: client.ApiClient, namespace: str
) -> None:
    """Versions before applies created these objects, owned by the create's manager (per replica): a
    field the manifest no longer sets stayed for ever. The create's fields are taken into the apply's
    (as kubectl's csaupgrade does), so the apply removes it; a user's own change stays."""
    core = client.CoreV1Api(api)
    holder = core.create_namespaced_config_map(namespace, {"metadata": {"name": "holder"}})
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "holder",
        "uid": holder.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    old = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "made-before", "ownerReferences": [reference], "labels": {"tier": "old"}},
        "spec": {"selector": {"app": "x", "tier": "old"}, "ports": [{"name": "http", "port": 80}]},
    }
    core.create_namespaced_service(namespace, old, field_manager="largo-operator-7d9f_1a2b3c4d")
    core.patch_namespaced_service(
        "made-before", namespace, {"metadata": {"annotations": {"team": "search"}}}, field_manager="someone"
    )
    wanted = {
        **old,
        "metadata": {"name": "made-before", "ownerReferences": [reference]},
        "spec": {"selector": {"app": "x"}, "ports": [{"name": "http", "port": 80}]},
    }
    asyncio.run(Kube(api).keep(namespace, wanted))
    now = core.read_namespaced_service("made-before", namespace)
    assert now.spec.selector == {"app": "x"}
    assert not (now.metadata.labels or {}).get("tier")
    assert now.metadata.annotations["team"] == "search"
    managers = {(entry.manager, entry.operation) for entry in now.metadata.managed_fields}
    assert ("largo-operator-7d9f_1a2b3c4d", "Update") not in managers
    assert ("largo-operator", "Apply") in managers


def test_taking_over_fields_of_an_object_that_changed_since_it_was_read_is_a_conflict(
    api: client.ApiClient, namespace: str
) -> None:
    """The managedFields are replaced only on the version read (a JSON patch's test of the
    resourceVersion): a write in between is a conflict, read again soon, never a lasting refusal."""
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "moving"}})
    read = api.sanitize_for_serialization(core.read_namespaced_config_map("moving", namespace))
    core.patch_namespaced_config_map("moving", namespace, {"data": {"k": "v"}})
    with pytest.raises(ConflictError):
        asyncio.run(
            Kube(api)._absorb(
                "ConfigMap", "moving", namespace, read, read["metadata"].get("managedFields") or []
            )
        )
