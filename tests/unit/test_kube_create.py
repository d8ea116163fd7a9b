"""Creating a child: what the API server refuses is raised with its own message; an object of the same
name is adopted only when this job already controls it. A fake core API stands in for the server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client import ApiException
from largo.controllers.kube import (
    ANNOTATION_APPLIED,
    MESSAGE_LIMIT,
    CreateRefused,
    Kube,
    created_fields_absorbed,
    holds,
    stamped,
)
from largo.controllers.leader import LeaderGate, NotLeader
from largo.controllers.workqueue import Retry

OURS = "uid-of-the-job"


def _refusal(status: int, message: str) -> ApiException:
    error = ApiException(status=status, reason="Forbidden" if status == 403 else "Conflict")
    error.body = json.dumps({"kind": "Status", "message": message})
    return error


class FakeCore:
    def __init__(self, refusal: ApiException | None, existing_controller: str | None = None) -> None:
        self.refusal = refusal
        self.existing_controller = existing_controller
        self.existing_labels: dict[str, str] = {}
        self.absent = False
        self.existing: client.V1Service | None = None  # what a read returns, if set
        self.apply_refusal: ApiException | None = None
        self.calls: list[str] = []
        self.timeouts: list[tuple[float, float]] = []

    def create_namespaced_service(
        self, namespace: str, body: Any, field_manager: str, _request_timeout: tuple[float, float]
    ) -> None:
        self.calls.append(field_manager)
        self.timeouts.append(_request_timeout)
        if self.refusal is not None:
            raise self.refusal

    def read_namespaced_service(self, name: str, namespace: str, **options: Any) -> Any:
        self.calls.append("read")
        self.timeouts.append(options["_request_timeout"])  # every call bounded: none may hang a worker
        if self.absent:
            raise _refusal(404, f'services "{name}" not found')
        if self.existing is not None:
            return self.existing
        refs = []
        if self.existing_controller is not None:
            refs = [
                client.V1OwnerReference(
                    api_version="v1", kind="Job", name="j", uid=self.existing_controller, controller=True
                )
            ]
        return client.V1Service(
            metadata=client.V1ObjectMeta(owner_references=refs, labels=self.existing_labels)
        )

    def patch_namespaced_service(self, name: str, namespace: str, body: Any, **options: Any) -> None:
        if options.get("_content_type") == "application/json-patch+json":
            self.calls.append("absorb")
            return
        self.calls.append(f"apply as {options['field_manager']}")
        if self.apply_refusal is not None:
            raise self.apply_refusal

    create_namespaced_pod = create_namespaced_service
    read_namespaced_pod = read_namespaced_service


def _kube(core: FakeCore) -> Kube:
    kube = Kube.__new__(Kube)
    kube.core = core  # type: ignore[assignment]
    kube.api = client.ApiClient()
    kube.gate = LeaderGate()
    kube.field_manager = "largo-operator"
    return kube


SERVICE = {
    "kind": "Service",
    "metadata": {"name": "j", "ownerReferences": [{"uid": OURS, "controller": True}]},
}


def test_a_refused_create_carries_the_api_message() -> None:
    quota = 'services "j" is forbidden: exceeded quota: q, requested: services=1, limited: services=0'
    with pytest.raises(CreateRefused) as raised:
        asyncio.run(_kube(FakeCore(_refusal(403, quota))).create("ns", SERVICE))
    assert raised.value.reason == "CreateRefused"
    assert raised.value.message == quota


def test_a_throttled_api_server_is_a_retry_and_a_failing_one_a_refusal() -> None:
    """A refusal that lasts releases the gang's GPUs: a 429 (throttling) must not count as one, a 500
    (a webhook that is down, for as long as it is down) must."""
    with pytest.raises(Retry) as raised:
        asyncio.run(_kube(FakeCore(_refusal(429, "slow down"))).create("ns", SERVICE))
    assert not isinstance(raised.value, CreateRefused)
    assert "slow down" in str(raised.value)
    assert raised.value.min_delay is None  # no Retry-After: the back-off decides
    # With Retry-After, the retry waits at least that long (a throttled create was tried again at once).
    throttled = _refusal(429, "slow down")
    throttled.headers = {"Retry-After": "7"}
    with pytest.raises(Retry) as raised:
        asyncio.run(_kube(FakeCore(throttled)).create("ns", SERVICE))
    assert raised.value.min_delay == 7.0
    webhook = 'Internal error occurred: failed calling webhook "policy.example.com": connection refused'
    for status in (500, 503):
        with pytest.raises(CreateRefused) as refused:
            asyncio.run(_kube(FakeCore(_refusal(status, webhook))).create("ns", SERVICE))
        assert refused.value.message == webhook


def test_a_long_refusal_message_is_cut_to_what_a_status_holds() -> None:
    webhook = "denied: " + "x" * 40_000
    with pytest.raises(CreateRefused) as raised:
        asyncio.run(_kube(FakeCore(_refusal(400, webhook))).create("ns", SERVICE))
    assert len(raised.value.message) == MESSAGE_LIMIT
    assert raised.value.message.startswith("denied: xxx")


def test_a_name_taken_by_a_foreign_object_is_a_conflict() -> None:
    for foreign in ("uid-of-someone-else", None):
        with pytest.raises(CreateRefused) as raised:
            asyncio.run(_kube(FakeCore(_refusal(409, "exists"), foreign)).create("ns", SERVICE))
        assert raised.value.reason == "NameConflict"
        assert "Service j already exists" in raised.value.message


def test_our_own_object_is_fine() -> None:
    asyncio.run(_kube(FakeCore(_refusal(409, "exists"), OURS)).create("ns", SERVICE))
    asyncio.run(_kube(FakeCore(None)).create("ns", SERVICE))


def test_kept_objects_are_applied_when_new_or_ours_but_never_taken_from_another_owner() -> None:
    """What an earlier version made (a router's Role, a Service) becomes what this one wants, applied
    from the start so that a field a later version drops is removed (a create's fields would stay owned
    by its manager); an object of that name that is not ours is refused, not adopted: our owner
    reference on it would have the garbage collector delete it with our object."""
    fresh = FakeCore(None)
    fresh.absent = True
    asyncio.run(_kube(fresh).keep("ns", SERVICE))
    assert fresh.calls == ["read", "apply as largo-operator"]  # created by the apply, never by a create
    ours = FakeCore(None, OURS)
    asyncio.run(_kube(ours).keep("ns", SERVICE))
    assert ours.calls == ["read", "apply as largo-operator"]
    for foreign in ("uid-of-someone-else", None):
        core = FakeCore(None, foreign)
        with pytest.raises(CreateRefused) as raised:
            asyncio.run(_kube(core).keep("ns", SERVICE))
        assert raised.value.reason == "NameConflict"
        assert core.calls == ["read"]  # no apply
    # A refused apply is a refused create: a TrainJob's gang is released when it lasts.
    quota = FakeCore(None)
    quota.absent = True
    quota.apply_refusal = _refusal(403, 'services "j" is forbidden: exceeded quota')
    with pytest.raises(CreateRefused) as refused:
        asyncio.run(_kube(quota).keep("ns", SERVICE))
    assert refused.value.reason == "CreateRefused"
    assert refused.value.message == 'services "j" is forbidden: exceeded quota'


def test_a_kept_object_that_holds_what_this_manifest_applied_is_not_applied_again() -> None:
    """A restarted operator reads each service's network: an object applied from the same manifest and
    unchanged since takes no write; one changed by hand, or wanted otherwise now, is applied."""
    manifest = {
        **SERVICE,
        "apiVersion": "v1",
        "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": "j"}},
    }
    wanted = stamped(manifest)
    assert stamped(manifest) == wanted  # the same digest for the same manifest
    digest = wanted["metadata"]["annotations"][ANNOTATION_APPLIED]
    owner = client.V1OwnerReference(api_version="v1", kind="Job", name="j", uid=OURS, controller=True)

    def live(port: int, applied: str | None = digest) -> client.V1Service:
        return client.V1Service(
            api_version="v1",
            kind="Service",
            metadata=client.V1ObjectMeta(
                name="j",
                owner_references=[owner],
                annotations={ANNOTATION_APPLIED: applied} if applied else None,
                resource_version="7",  # the server's own fields and defaults do not matter
            ),
            spec=client.V1ServiceSpec(
                ports=[client.V1ServicePort(name="http", port=port, protocol="TCP", target_port=80)],
                selector={"app": "j"},
                type="ClusterIP",
            ),
        )

    core = FakeCore(None, OURS)
    core.existing = live(80)
    asyncio.run(_kube(core).keep("ns", manifest))
    assert core.calls == ["read"]
    # Created by an earlier version, and as wanted now: its create's fields are taken over first, so
    # that a later manifest without one of them removes it.
    created = live(80)
    created.metadata.managed_fields = [
        client.V1ManagedFieldsEntry(
            manager="largo-operator-abc_12345678",
            operation="Update",
            api_version="v1",
            fields_type="FieldsV1",
            fields_v1={"f:metadata": {"f:ownerReferences": {f'k:{{"uid":"{OURS}"}}': {}}}},
        )
    ]
    core = FakeCore(None, OURS)
    core.existing = created
    asyncio.run(_kube(core).keep("ns", manifest))
    assert core.calls == ["read", "absorb", "apply as largo-operator"]
    for changed in (live(81), live(80, applied=None), live(80, applied="from-another-manifest")):
        core = FakeCore(None, OURS)
        core.existing = changed
        asyncio.run(_kube(core).keep("ns", manifest))
        assert core.calls == ["read", "apply as largo-operator"]


def test_holds_reads_fields_the_way_an_apply_sets_them() -> None:
    assert holds({"a": 1, "b": {"c": "x", "d": 2}}, {"b": {"c": "x"}})
    assert not holds({"b": {"c": "y"}}, {"b": {"c": "x"}})
    assert not holds({}, {"b": {}})
    assert holds({"a": 1}, {"b": None})  # an absent field stays absent
    assert not holds({"b": 1}, {"b": None})
    assert holds([{"name": "x", "extra": 1}], [{"name": "x"}])
    assert not holds([{"name": "x"}, {"name": "y"}], [{"name": "x"}])  # an item someone added
    assert not holds({"port": "80"}, {"port": 80})  # written in another form: applied, to be sure
    assert not holds({"on": 1}, {"on": True})


def test_the_fields_an_earlier_version_s_create_set_are_taken_into_the_apply_s() -> None:
    owner = {"f:ownerReferences": {f'k:{{"uid":"{OURS}"}}': {}}}
    create = {
        "manager": "largo-operator-abc_12345678",
        "operation": "Update",
        "apiVersion": "v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": owner, "f:spec": {"f:selector": {"f:app": {}, "f:tier": {}}}},
    }
    apply = {
        "manager": "largo-operator",
        "operation": "Apply",
        "apiVersion": "v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:ports": {}}},
    }
    user = {"manager": "kubectl-edit", "operation": "Update", "fieldsV1": {"f:metadata": {"f:labels": {}}}}
    status = {**create, "subresource": "status", "fieldsV1": {"f:status": {}}}
    live = {"metadata": {"managedFields": [create, user, status, apply]}}
    absorbed = created_fields_absorbed(live, OURS)
    assert absorbed is not None
    assert absorbed[:2] == [user, status]  # another manager's and a status writer's are left alone
    assert absorbed[2]["manager"] == "largo-operator"
    assert absorbed[2]["operation"] == "Apply"
    assert absorbed[2]["fieldsV1"] == {
        "f:metadata": owner,
        "f:spec": {"f:ports": {}, "f:selector": {"f:app": {}, "f:tier": {}}},
    }
    # Without an apply entry yet, one is made from the create's.
    (made,) = created_fields_absorbed({"metadata": {"managedFields": [create]}}, OURS) or []
    assert (made["manager"], made["operation"], made["fieldsV1"]) == (
        "largo-operator",
        "Apply",
        create["fieldsV1"],
    )
    # An apply under a replica's own name (versions that applied so) is taken over the same way.
    replica_apply = {**create, "operation": "Apply"}
    (merged,) = created_fields_absorbed({"metadata": {"managedFields": [replica_apply, apply]}}, OURS) or []
    assert merged["manager"] == "largo-operator"
    assert merged["fieldsV1"]["f:spec"] == {"f:ports": {}, "f:selector": {"f:app": {}, "f:tier": {}}}
    # Nothing of ours created by update, or another controller's: nothing to change.
    assert created_fields_absorbed({"metadata": {"managedFields": [user, apply]}}, OURS) is None
    assert created_fields_absorbed(live, "uid-of-someone-else") is None


def test_our_pod_of_an_earlier_attempt_is_not_taken_for_the_new_one() -> None:
    core = FakeCore(_refusal(409, "exists"), OURS)
    core.existing_labels = {"largo.dev/attempt": "0"}
    pod = {
        "kind": "Pod",
        "metadata": {**SERVICE["metadata"], "labels": {"largo.dev/attempt": "1"}},  # type: ignore[dict-item]
    }
    with pytest.raises(Retry, match="attempt 0 still exists"):
        asyncio.run(_kube(core).create("ns", pod))
    core.existing_labels = {"largo.dev/attempt": "1"}
    asyncio.run(_kube(core).create("ns", pod))


def test_a_replica_that_does_not_lead_sends_nothing() -> None:
    core = FakeCore(None)
    kube = _kube(core)
    clock = [100.0]
    kube.gate = LeaderGate(renew_deadline=6, clock=lambda: clock[0])
    with pytest.raises(NotLeader):
        asyncio.run(kube.create("ns", SERVICE))  # never elected
    kube.gate.renewed(98.0)
    asyncio.run(kube.create("ns", SERVICE))
    assert core.calls == ["largo-operator"]  # sent, and named by its field manager
    # It connects within 2 s of the check or not at all: never after another replica took the Lease.
    assert core.timeouts == [(2.0, 30.0)]
    clock[0] = 104.5  # no renewal for longer than the renew deadline: frozen, or cut off
    with pytest.raises(NotLeader):
        asyncio.run(kube.create("ns", SERVICE))
    kube.gate.renewed(104.0)
    kube.gate.lose()  # once lost, never again in this process
    with pytest.raises(NotLeader):
        asyncio.run(kube.create("ns", SERVICE))
    assert core.calls == ["largo-operator"]


class FakeApps:
    def __init__(self) -> None:
        self.managers: list[str] = []

    def patch_namespaced_deployment(self, name: str, namespace: str, body: Any, **options: Any) -> None:
        self.managers.append(options["field_manager"])


def test_applies_use_one_field_manager_whatever_the_replica_creates_with() -> None:
    """A field a later version stops setting is removed only if its manager applies again without it:
    a replica's own name (a process's) would leave it to no one."""
    apps, core = FakeApps(), FakeCore(None)
    kube = _kube(core)
    kube.apps = apps  # type: ignore[assignment]
    kube.field_manager = "largo-operator-7f9c_1a2b3c4d"  # this replica's, under leader election
    deployment = {"kind": "Deployment", "metadata": {"name": "chat-router", "namespace": "ns"}}
    asyncio.run(kube.apply("ns", deployment))
    asyncio.run(kube.create("ns", SERVICE))
    assert apps.managers == ["largo-operator"]
    assert core.calls == ["largo-operator-7f9c_1a2b3c4d"]  # creates and status writes say who wrote


def test_the_operator_s_client_never_retries_inside_urllib3(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib3 retries a connect three times by default, writes included: a write would then be sent
    up to four connect timeouts after the leader fence was checked, past the Lease's margin."""
    from kubernetes import config

    def not_in_a_cluster() -> None:
        raise config.ConfigException("not in a cluster")

    monkeypatch.setattr(config, "load_incluster_config", not_in_a_cluster)
    monkeypatch.setattr(config, "load_kube_config", lambda: None)
    kube = Kube.from_environment(LeaderGate())
    assert kube.api.configuration.retries is False
    retries = kube.api.rest_client.pool_manager.connection_pool_kw["retries"]
    assert getattr(retries, "total", retries) is False  # urllib3: no retry, the first error raises


@pytest.mark.parametrize(
    "failure",
    [
        urllib3.exceptions.ReadTimeoutError(None, "/events", "Read timed out."),  # type: ignore[arg-type]
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError()),
        ConnectionRefusedError(111, "Connection refused"),
    ],
)
def test_an_event_the_connection_fails_to_post_is_logged_not_raised(failure: Exception) -> None:
    """The client retries nothing: a timeout or a dropped connection escaped the reconcile after its
    status write, the decision's other events were lost and its pod writes waited for the back-off."""

    class Failing(FakeCore):
        def create_namespaced_event(self, namespace: str, body: Any, **kwargs: Any) -> None:
            raise failure

    kube = _kube(Failing(None))
    counted: list[str] = []
    kube.on_event = lambda reason, type_: counted.append(reason)
    job = {"kind": "TrainJob", "metadata": {"name": "j", "namespace": "ns"}}
    asyncio.run(kube.event(job, "Warning", "PodFailed", "pod j-node-1 failed"))
    assert counted == ["PodFailed"]  # the decision was made: the alerts count it


def test_the_ttl_delete_takes_only_the_job_it_decided_on() -> None:
    """Decided on an index that lagged, a delete by name took a job created again under that name since
    (Kubernetes' TTL controller deletes with the uid as a precondition)."""

    class Custom:
        def __init__(self, status: int | None) -> None:
            self.status, self.calls = status, []  # type: ignore[var-annotated]

        def delete_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> None:
            self.calls.append((args, kwargs))
            if self.status is not None:
                raise ApiException(status=self.status, reason="Conflict")

    for status in (None, 404, 409):  # deleted; gone already; another job now holds the name
        kube = _kube(FakeCore(None))
        kube.custom = Custom(status)  # type: ignore[assignment]
        asyncio.run(kube.delete_trainjob("ns", "j", "uid-1"))
        ((args, kwargs),) = kube.custom.calls  # type: ignore[attr-defined]
        assert args[-1] == "j"
        assert kwargs["body"].preconditions.uid == "uid-1"
        assert kwargs["body"].propagation_policy == "Background"
