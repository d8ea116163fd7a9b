"""The InferenceService reconciler's network (its Services, the router's account and Deployment) with
a fake API: written once, made again after a part is deleted, even while the writes are in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from largo.api.v1alpha1 import InferenceService
from largo.controllers.inferenceservice import InferenceServiceReconciler
from largo.controllers.kube import CreateRefused

KEY = ("ns", "chat")
BODY = {
    "metadata": {"name": "chat", "namespace": "ns", "uid": "uid-chat"},
    "spec": {"model": {"claimName": "w"}},
}


class FakeKube:
    """Records what is written; ``during_write`` runs in the middle of the first Service's create, as
    a watch event handled while the reconciler awaits the API."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.during_write: Callable[[], None] = lambda: None
        self.refuse = False

    async def create(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        if manifest["kind"] == "Service" and not any(w.startswith("Service/") for w in self.written):
            await asyncio.sleep(0)
            self.during_write()
            self.during_write = lambda: None
        if self.refuse and manifest["kind"] == "ServiceAccount":
            raise CreateRefused("ServiceAccount", manifest["metadata"]["name"], "CreateRefused", "quota")
        self.written.append(f"{manifest['kind']}/{manifest['metadata']['name']}")

    async def apply(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        self.written.append(f"{manifest['kind']}/{manifest['metadata']['name']}")

    async def keep(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        await self.create(namespace, manifest)

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        pass


def _reconciler(kube: FakeKube) -> InferenceServiceReconciler:
    return InferenceServiceReconciler(
        kube=kube,  # type: ignore[arg-type]
        nodes={},
        services={},
        pods={},
        trainjobs={},
        claims={},
        autoscalers={},
        wake_scheduler=lambda: None,
        clock=lambda: 0.0,
    )


def _make(reconciler: InferenceServiceReconciler) -> None:
    asyncio.run(reconciler.make_network(KEY, BODY, InferenceService.from_body(BODY)))


def test_the_network_is_written_once_and_again_after_a_part_is_deleted() -> None:
    kube = FakeKube()
    reconciler = _reconciler(kube)
    _make(reconciler)
    assert "Deployment/chat-router" in kube.written
    assert "Service/chat" in kube.written
    first = len(kube.written)
    _make(reconciler)
    assert len(kube.written) == first  # nothing changed: nothing written
    reconciler.forget_network(KEY)  # a part deleted by hand
    _make(reconciler)
    assert len(kube.written) == 2 * first


def test_a_part_deleted_while_the_network_is_being_written_is_made_again() -> None:
    kube = FakeKube()
    reconciler = _reconciler(kube)
    kube.during_write = lambda: reconciler.forget_network(KEY)
    _make(reconciler)
    first = len(kube.written)
    _make(reconciler)  # the deletion seen mid-write is not lost to the first pass's mark
    assert len(kube.written) == 2 * first
    _make(reconciler)
    assert len(kube.written) == 2 * first


def test_a_refused_write_leaves_the_network_to_be_made_again() -> None:
    kube = FakeKube()
    kube.refuse = True
    reconciler = _reconciler(kube)
    with pytest.raises(CreateRefused):
        _make(reconciler)
    kube.refuse = False
    _make(reconciler)
    assert "Deployment/chat-router" in kube.written


def test_the_role_binding_is_written_after_its_role_and_the_router_after_its_binding() -> None:
    """From an account without the bind verb, the API server refuses a RoleBinding whose Role is not
    there yet (it checks that the binder holds the Role's rules): written at once, they would be
    refused at every new service."""

    class BindingChecked(FakeKube):
        async def create(self, namespace: str, manifest: Mapping[str, Any]) -> None:
            name = manifest["metadata"]["name"]
            if manifest["kind"] == "RoleBinding" and f"Role/{name}" not in self.written:
                raise CreateRefused("RoleBinding", name, "CreateRefused", f'rolebindings "{name}" not found')
            await asyncio.sleep(0)  # a write takes its time
            await super().create(namespace, manifest)

    kube = BindingChecked()
    asyncio.run(_reconciler(kube).make_network(KEY, BODY, InferenceService.from_body(BODY)))
    written = kube.written
    assert written.index("Role/chat-router") < written.index("RoleBinding/chat-router")
    assert written.index("RoleBinding/chat-router") < written.index("Deployment/chat-router")
