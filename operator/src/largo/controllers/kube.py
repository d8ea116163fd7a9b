"""The few Kubernetes API calls the controllers make, as async functions.

The official client is synchronous; each call runs in a worker thread so the kopf event loop stays free.
Creations tolerate AlreadyExists and deletions NotFound: every reconcile may repeat what a previous,
interrupted one did.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client import ApiException

from largo.api.v1alpha1 import GROUP, PLURAL, SERVICE_PLURAL, VERSION
from largo.controllers.leader import WRITE_CONNECT_SECONDS, LeaderGate, NotLeader
from largo.controllers.state import controller_uid
from largo.controllers.workqueue import Retry
from largo.manifests.names import LABEL_ATTEMPT

logger = logging.getLogger(__name__)

COMPONENT = "largo-operator"


# The kinds the controllers create: which client, and the kind's name in its method names.
_KINDS = {
    "Pod": ("core", "pod"),
    "Service": ("core", "service"),
    "ConfigMap": ("core", "config_map"),
    "ServiceAccount": ("core", "service_account"),
    "Deployment": ("apps", "deployment"),
    "PodDisruptionBudget": ("policy", "pod_disruption_budget"),
    "Role": ("rbac", "role"),
    "RoleBinding": ("rbac", "role_binding"),
}


class ConflictError(Retry):
    """The object changed since it was read: read again and decide again. Soon: a conflict says the
    view was behind, not that the API server refuses, so its back-off stays short."""

    max_delay = 1.0


class CreateRefused(Retry):
    """The API server refused to create a child (quota, admission, RBAC, a name taken by an object
    that is not ours). ``reason`` is CreateRefused or NameConflict; ``message`` is the API's own."""

    # Tried again soon enough that a gang held for refused pods is released close to its binding
    # timeout (the retry is what brings the reconcile that releases it).
    max_delay = 10.0

    def __init__(self, kind: str, name: str, reason: str, message: str) -> None:
        super().__init__(f"{kind} {name}: {message}")
        self.kind, self.name, self.reason, self.message = kind, name, reason, message


# A webhook's answer can be of any length; conditions, events and status fields cannot.
MESSAGE_LIMIT = 4096


def api_message(error: ApiException) -> str:
    """The Status message the API server sent, or the HTTP reason; at most ``MESSAGE_LIMIT`` characters."""
    try:
        message = json.loads(error.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    text = str(message or error.reason or error.status)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def transient(error: ApiException) -> bool:
    """The API server is throttling: try again, and do not count it as a refusal (which releases a
    gang's GPUs once it lasts). A 5xx is a refusal: a webhook that is down answers 500 for as long as
    it is down, and the GPUs held for pods that cannot be created must go back all the same."""
    return bool(error.status == 429)


def _unavailable(kind: str, name: str, error: ApiException) -> Retry:
    retry = Retry(f"{kind} {name}: the API server answered {error.status}: {api_message(error)}")
    retry.min_delay = retry_after(error)
    return retry


def retry_after(error: ApiException) -> float | None:
    """The seconds a throttling API server asks to wait (its Retry-After header), if it says."""
    value = (error.headers or {}).get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:  # an HTTP date: the back-off decides
        return None
    return seconds if 0 <= seconds <= 3600 else None


def _refuse_foreign(manifest: Mapping[str, Any], existing: Any) -> None:
    """Raises NameConflict when ``existing`` (a client model) is not controlled by what ``manifest``
    names as its controller."""
    ours = controller_uid(manifest["metadata"])
    references = existing.metadata.owner_references or []
    theirs = next((str(ref.uid) for ref in references if ref.controller), None)
    if ours is not None and theirs != ours:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        owner = f"controlled by uid {theirs}" if theirs else "not controlled by any object"
        raise CreateRefused(
            kind,
            name,
            "NameConflict",
            f"{kind} {name} already exists and is {owner}, not by the object it is created for",
        )


# On every kept object: a digest of the manifest last applied, so that an unchanged one is not applied
# again (an operator's start reads each service's network; applying it too doubled the calls).
ANNOTATION_APPLIED = "largo.dev/applied"


def stamped(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` with its digest in ``ANNOTATION_APPLIED`` (a digest of everything else)."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    metadata = dict(manifest["metadata"])
    metadata["annotations"] = {
        **(metadata.get("annotations") or {}),
        ANNOTATION_APPLIED: digest.hexdigest()[:20],
    }
    return {**manifest, "metadata": metadata}


def holds(live: Any, wanted: Any) -> bool:
    """Whether ``live`` (an object as the API server returns it) has every field ``wanted`` sets, with
    its value (fields the server defaults or others set do not matter; a None wanted is an absent
    field). Lists match item by item. A value the server writes in another form (a quantity, an
    int-or-string) does not match: the caller then applies, which costs a call and nothing else."""
    if isinstance(wanted, Mapping):
        return isinstance(live, Mapping) and all(
            live.get(key) is None if value is None else key in live and holds(live[key], value)
            for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(live, list)
            and len(live) == len(wanted)
            and all(holds(item, want) for item, want in zip(live, wanted, strict=True))
        )
    return bool(live == wanted and type(live) is type(wanted))


def _union(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """Two managedFields field sets (fieldsV1 tries) as one."""
    merged = dict(first)
    for key, value in second.items():
        merged[key] = _union(merged[key], value) if key in merged else value
    return merged


def created_fields_absorbed(live: Mapping[str, Any], controller: str) -> list[dict[str, Any]] | None:
    """``live``'s managedFields with the entries of the managers that created it by update (or applied
    it under a replica's own name), if any, merged into largo's apply entry (None when there are none:
    nothing to change). Versions of largo before applies created their objects: those fields stay owned
    by the create's manager (one per replica), so a field this version no longer sets would never be
    removed. Taken into the apply entry, the next apply without them removes them, as client-go's
    csaupgrade does for kubectl. The creating entries are told apart by what only a create of ours
    sets: the owner reference to ``controller`` (the uid)."""
    entries = list((live.get("metadata") or {}).get("managedFields") or [])
    ours = f'k:{{"uid":"{controller}"}}'

    def created_ours(entry: Mapping[str, Any]) -> bool:
        references = ((entry.get("fieldsV1") or {}).get("f:metadata") or {}).get("f:ownerReferences") or {}
        # A create's (an update), or an apply under a replica's own name (versions that applied so).
        by = entry.get("operation") == "Update" or entry.get("manager") != COMPONENT
        return by and not entry.get("subresource") and ours in references

    created = [entry for entry in entries if created_ours(entry)]
    if not created:
        return None
    applying = next(
        (e for e in entries if e.get("manager") == COMPONENT and e.get("operation") == "Apply"),
        {**created[0], "manager": COMPONENT, "operation": "Apply", "fieldsV1": {}},
    )
    fields: dict[str, Any] = dict(applying.get("fieldsV1") or {})
    for entry in created:
        fields = _union(fields, entry.get("fieldsV1") or {})
    kept = [entry for entry in entries if entry is not applying and not created_ours(entry)]
    return [*kept, {**applying, "fieldsV1": fields}]


# A write's read timeout (seconds); its connect timeout, WRITE_CONNECT_SECONDS, is the leader
# election's (a fenced write must connect before a standby may take over).
WRITE_READ_SECONDS = 30.0
# A page of a cluster-wide list, and how long it may take.
LIST_PAGE = 500
LIST_READ_SECONDS = 60.0


class Kube:
    def __init__(
        self, api_client: client.ApiClient, gate: LeaderGate | None = None, field_manager: str = COMPONENT
    ) -> None:
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)
        self.policy = client.PolicyV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.gate = gate or LeaderGate()
        # Named in every object's managedFields: which replica wrote what can be read back.
        self.field_manager = field_manager
        # Told of every event posted (reason, type): the operator's decisions, for its metrics.
        self.on_event: Callable[[str, str], None] = lambda reason, type_: None

    async def _write(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs one API write in a worker thread, checking the leader fence as it is sent. Its connection
        must open within ``WRITE_CONNECT_SECONDS`` of the check: a write held up connecting would
        otherwise land whenever it got through, perhaps after another replica took the Lease (the fence
        leaves the renew deadline, 6 s, against the Lease's 10)."""

        def fenced() -> Any:
            if not self.gate.leading():
                raise NotLeader("not the leader: write not sent")
            return call(*args, **kwargs, _request_timeout=(WRITE_CONNECT_SECONDS, WRITE_READ_SECONDS))

        return await asyncio.to_thread(fenced)

    async def list_identities(self) -> dict[str, set[str]]:
        """The UIDs of every pod, TrainJob and InferenceService, and the names of the nodes, as the API
        server has them now (``freshness``). Read in pages of LIST_PAGE as plain JSON, keeping only
        the identities: a large cluster's pods whole would take the operator's memory, and parsing
        them at once would hold the interpreter past the Lease's renew deadline."""

        def identities(call: Callable[..., Any], key: str, *args: str) -> set[str]:
            found: set[str] = set()
            token: str | None = None
            while True:
                response = call(
                    *args,
                    limit=LIST_PAGE,
                    _continue=token,
                    _preload_content=False,
                    _request_timeout=(WRITE_CONNECT_SECONDS, LIST_READ_SECONDS),
                )
                page = json.loads(response.data)
                found.update(item["metadata"][key] for item in page["items"])
                token = (page.get("metadata") or {}).get("continue")
                if not token:
                    return found

        def read() -> dict[str, set[str]]:
            custom = self.custom.list_cluster_custom_object
            return {
                "pods": identities(self.core.list_pod_for_all_namespaces, "uid"),
                "nodes": identities(self.core.list_node, "name"),
                "trainjobs": identities(custom, "uid", GROUP, VERSION, PLURAL),
                "inferenceservices": identities(custom, "uid", GROUP, VERSION, SERVICE_PLURAL),
            }

        return await asyncio.to_thread(read)

    @classmethod
    def from_environment(cls, gate: LeaderGate | None = None, field_manager: str = COMPONENT) -> Kube:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        configuration = client.Configuration.get_default_copy()
        # Enough connections for every reconcile worker and the scheduler at once.
        configuration.connection_pool_maxsize = 32
        # No retries inside urllib3 (its default retries a connect 3 times, for writes too): a write
        # would then be sent up to 4 connect timeouts after the fence was checked, past the Lease's
        # margin. The work queue retries, and checks the fence again.
        configuration.retries = False
        return cls(client.ApiClient(configuration), gate, field_manager)

    async def patch_trainjob_status(
        self, namespace: str, name: str, resource_version: str | None, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge-patches status; with ``resource_version``, only if nobody wrote the object since."""
        return await self._patch_status(PLURAL, namespace, name, resource_version, status)

    async def patch_service_status(
        self, namespace: str, name: str, resource_version: str | None, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The same for an InferenceService."""
        return await self._patch_status(SERVICE_PLURAL, namespace, name, resource_version, status)

    async def scale_service(
        self,
        namespace: str,
        name: str,
        resource_version: str | None,
        replicas: int,
        annotations: Mapping[str, str],
    ) -> dict[str, Any]:
        """Sets an InferenceService's spec.replicas (with ``annotations``) if nobody wrote it since."""
        body: dict[str, Any] = {
            "metadata": {
                "annotations": dict(annotations),
                **({"resourceVersion": resource_version} if resource_version else {}),
            },
            "spec": {"replicas": replicas},
        }
        patch: Callable[..., Any] = self.custom.patch_namespaced_custom_object
        try:
            result: dict[str, Any] = await self._write(
                patch, GROUP, VERSION, namespace, SERVICE_PLURAL, name, body, field_manager=self.field_manager
            )
        except ApiException as error:
            if error.status in (404, 409):
                raise ConflictError(f"{namespace}/{name}: {error.reason}") from error
            raise
        return result

    async def _patch_status(
        self, plural: str, namespace: str, name: str, resource_version: str | None, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        patch: Callable[..., Any] = self.custom.patch_namespaced_custom_object_status
        try:
            result: dict[str, Any] = await self._write(
                patch, GROUP, VERSION, namespace, plural, name, body, field_manager=self.field_manager
            )
        except ApiException as error:
            if error.status in (404, 409):
                raise ConflictError(f"{namespace}/{name}: {error.reason}") from error
            raise
        return result

    async def delete_trainjob(self, namespace: str, name: str, uid: str) -> None:
        """Deletes the TrainJob ``uid`` only, as Kubernetes' TTL controller does: one deleted and created
        again under its name since the decision (on an index that lagged) is another job, and stays."""
        options = client.V1DeleteOptions(
            propagation_policy="Background", preconditions=client.V1Preconditions(uid=uid)
        )
        try:
            await self._write(
                self.custom.delete_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body=options,
            )
        except ApiException as error:
            # 404: gone already; 409: its uid is another's (the precondition failed).
            if error.status not in (404, 409):
                raise

    async def create(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        """Creates ``manifest``; an existing object of the same name is fine only if the same controller
        owns it. Raises CreateRefused with the API's message for anything the API server refuses."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        group, suffix = _KINDS[kind]
        api = getattr(self, group)
        try:
            create = getattr(api, f"create_namespaced_{suffix}")
            await self._write(create, namespace, manifest, field_manager=self.field_manager)
            return
        except ApiException as error:
            if transient(error):
                raise _unavailable(kind, name, error) from error
            if error.status != 409:
                raise CreateRefused(kind, name, "CreateRefused", api_message(error)) from error
        read = getattr(api, f"read_namespaced_{suffix}")
        try:
            # Bounded as every other call: a half-open pooled connection would hold the worker (and its
            # job's key) until the kernel gives up on the socket.
            timeout = (WRITE_CONNECT_SECONDS, WRITE_READ_SECONDS)
            existing = await asyncio.to_thread(read, name, namespace, _request_timeout=timeout)
        except ApiException as error:
            if error.status == 404:  # gone between the create and the read: try the create again
                raise Retry(f"{kind} {name} went away while being created") from error
            if transient(error):
                raise _unavailable(kind, name, error) from error
            raise
        _refuse_foreign(manifest, existing)
        wanted = (manifest["metadata"].get("labels") or {}).get(LABEL_ATTEMPT)
        found = (existing.metadata.labels or {}).get(LABEL_ATTEMPT)
        if wanted != found:
            # Our own pod of an earlier attempt, still terminating: never mistake it for the new one.
            raise Retry(f"{kind} {name} of attempt {found} still exists; attempt {wanted} waits for it")

    async def keep(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        """Applies ``manifest`` server-side, creating it or bringing ours to what this version of largo
        wants (a Role's rules, a Service's ports, a router's spec). Applied from the start rather than
        created then applied: the fields a create sets stay owned by its manager, so one that a later spec
        or version drops would never be removed. An object of that name owned by another controller or by
        none is a NameConflict, never taken over: our owner reference on it would have the garbage
        collector delete it with our object. (One created by someone else between the read and the apply,
        milliseconds apart, would be taken over.) One that already holds what ``manifest`` sets, applied
        by this manifest (its digest, ``ANNOTATION_APPLIED``), is left as it is: no write. One that an
        earlier version created has its create's fields taken into the apply's first
        (``created_fields_absorbed``), so that the apply removes those this version drops."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        group, suffix = _KINDS[kind]
        wanted = stamped(manifest)
        read = getattr(getattr(self, group), f"read_namespaced_{suffix}")
        try:
            timeout = (WRITE_CONNECT_SECONDS, WRITE_READ_SECONDS)  # as the apply that follows
            existing = await asyncio.to_thread(read, name, namespace, _request_timeout=timeout)
        except ApiException as error:
            if transient(error):
                raise _unavailable(kind, name, error) from error
            if error.status != 404:
                raise CreateRefused(kind, name, "CreateRefused", api_message(error)) from error
        else:
            _refuse_foreign(manifest, existing)
            live = self.api.sanitize_for_serialization(existing)  # type: ignore[no-untyped-call]
            controller = controller_uid(manifest["metadata"])
            absorbed = created_fields_absorbed(live, controller) if controller else None
            if absorbed is not None:
                await self._absorb(kind, name, namespace, live, absorbed)
            elif holds(live, wanted):
                return  # this manifest was applied, and what it sets has not changed since
        await self.apply(namespace, wanted)

    async def _absorb(
        self, kind: str, name: str, namespace: str, live: Mapping[str, Any], fields: list[dict[str, Any]]
    ) -> None:
        """Replaces the managedFields of ``live`` with ``fields`` (``created_fields_absorbed``), if the
        object has not changed since it was read (else a ConflictError: read again). Another refusal
        (a webhook, a permission) lets the apply go ahead: the entries stay, the next start tries again."""
        group, suffix = _KINDS[kind]
        patch = getattr(getattr(self, group), f"patch_namespaced_{suffix}")
        version = (live.get("metadata") or {}).get("resourceVersion")
        # The resourceVersion written with it makes the API server refuse a stale one with a 409.
        body = [
            {"op": "replace", "path": "/metadata/resourceVersion", "value": version},
            {"op": "replace", "path": "/metadata/managedFields", "value": fields},
        ]
        try:
            await self._write(patch, name, namespace, body, _content_type="application/json-patch+json")
        except ApiException as error:
            if transient(error):
                raise _unavailable(kind, name, error) from error
            if error.status == 409:
                raise ConflictError(f"{kind} {name} changed while its fields were taken over") from error
            logger.info("%s %s: its creator's fields were not taken over: %s", kind, name, api_message(error))

    async def apply(self, namespace: str, manifest: Mapping[str, Any]) -> None:
        """Server-side apply of ``manifest`` as largo's field manager: created, or brought back to what
        largo wants for the fields it sets (a user's other fields stay). Raises CreateRefused with the
        API's message for anything the API server refuses.

        One manager name for every replica and version, not this replica's: a field that a later
        version no longer sets is removed only if the manager that applied it applies again without
        it, and a replica's name lives as long as its process."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        group, suffix = _KINDS[kind]
        patch = getattr(getattr(self, group), f"patch_namespaced_{suffix}")
        try:
            await self._write(
                patch,
                name,
                namespace,
                manifest,
                field_manager=COMPONENT,
                force=True,
                _content_type="application/apply-patch+yaml",
            )
        except ApiException as error:
            if transient(error):
                raise _unavailable(kind, name, error) from error
            # As a create's: the apply is how a kept object is created, and a refusal that lasts must
            # release a gang's GPUs as any refused create does (policy reads CreateRefused).
            raise CreateRefused(kind, name, "CreateRefused", api_message(error)) from error

    async def delete_pod(self, namespace: str, name: str, force: bool = False) -> None:
        try:
            await self._write(
                self.core.delete_namespaced_pod, name, namespace, grace_period_seconds=0 if force else None
            )
        except ApiException as error:
            if error.status != 404:
                raise

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Posts a core/v1 Event (what ``kubectl describe`` shows); a failure here is logged, not raised."""
        metadata = involved.get("metadata") or {}
        now = datetime.datetime.now(datetime.UTC)
        body = {
            "metadata": {
                "name": f"{metadata.get('name')}.{uuid.uuid4().hex[:12]}",
                "namespace": metadata.get("namespace"),
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": metadata.get("name"),
                "namespace": metadata.get("namespace"),
                "uid": metadata.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        create: Callable[..., Any] = self.core.create_namespaced_event
        try:
            await self._write(create, metadata.get("namespace"), body, field_manager=self.field_manager)
        except NotLeader:
            return
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
            # Refused, or the connection failed or timed out (the client does not retry): an event is
            # not worth the reconcile's back-off, nor the decision's other events and pod writes.
            why = error.reason if isinstance(error, ApiException) else repr(error)
            logger.warning("could not post event %s on %s: %s", reason, metadata.get("name"), why)
            self.on_event(reason, type_)  # the decision was made all the same: the alerts count it
            return
        self.on_event(reason, type_)
        log = logger.warning if type_ == "Warning" else logger.info
        log(
            "%s/%s %s: %s",
            metadata.get("namespace"),
            metadata.get("name"),
            reason,
            message,
            extra={"object": f"{metadata.get('namespace')}/{metadata.get('name')}", "reason": reason},
        )
