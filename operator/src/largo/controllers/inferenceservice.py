"""One InferenceService reconcile: read the service, its pods and its model's source from the indexes,
let ``largo.policy.inferenceservice`` decide, apply the plan.

As for a TrainJob, the status is written first, guarded by the resourceVersion the decision was made on;
pods are created or deleted only once that write succeeded, so a stale decision never acts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from largo.api.v1alpha1 import (
    InferenceService,
    ServiceConditionType,
    ServicePhase,
    ServiceReason,
    check_service_status,
    sanitize_service_status,
)
from largo.controllers.autoscaler import ANNOTATION_SCALING
from largo.controllers.kube import ConflictError, CreateRefused, Kube
from largo.controllers.objects import newer, owned, status_patch
from largo.controllers.scheduler import KeyedIndex, node_lookup
from largo.controllers.state import JobKey, ServiceEntry
from largo.manifests import inferenceservice as build
from largo.manifests import names, router
from largo.policy.conditions import set_condition
from largo.policy.inferenceservice import (
    ModelResolution,
    ServicePlan,
    ServiceView,
    group_creation_refused,
    member_pod,
    plan,
    resolve_model,
    rollout_under_way,
)
from largo.policy.pods import unschedulable_as_seen
from largo.sched.types import node_health

logger = logging.getLogger(__name__)


@dataclass
class InferenceServiceReconciler:
    kube: Kube
    nodes: KeyedIndex
    # (namespace, name) -> ServiceEntry
    services: KeyedIndex
    # (namespace, service) -> its member pods' bodies
    pods: KeyedIndex
    # (namespace, name) -> the TrainJob's JobEntry (for fromTrainJob)
    trainjobs: KeyedIndex
    # (namespace, claim) -> present when the PersistentVolumeClaim exists
    claims: KeyedIndex
    # (namespace, service) -> names of HorizontalPodAutoscalers that target it
    autoscalers: KeyedIndex
    wake_scheduler: Callable[[], None]
    clock: Callable[[], float]
    default_image: str = build.DEFAULT_SERVER_IMAGE
    router_image: str = router.DEFAULT_ROUTER_IMAGE
    # How long a member may stay unschedulable on its pinned node before its group is placed again.
    binding_timeout: float = 30.0
    # How long a node may be not Ready before its members count as dead and their groups restart.
    node_lost_after: float = 60.0
    _hints: dict[JobKey, Mapping[str, Any]] = field(default_factory=dict)
    # When this operator first saw each service's pods unschedulable (``pods.unschedulable_as_seen``).
    _unschedulable: dict[JobKey, dict[str, float]] = field(default_factory=dict)
    # Services whose network (Services, router) this operator already made (by key, then uid): made
    # once, not every cycle; forgotten when a part is deleted, so that the next cycle makes it again.
    _networked: dict[JobKey, tuple[str, str]] = field(default_factory=dict)
    # The refusal last told of a service whose refusal no group could carry (no group waits for its
    # network: scaled to zero, its groups queued for GPUs): told once, not at every retry.
    _told_refusals: dict[JobKey, tuple[str, str, str]] = field(default_factory=dict)

    def forget_network(self, key: JobKey) -> None:
        """A part of the service's network was deleted: the next cycle creates what is missing."""
        self._networked.pop(key, None)

    def hint(self, key: JobKey, body: Mapping[str, Any]) -> None:
        self._hints[key] = body

    def _latest(self, key: JobKey) -> ServiceEntry | None:
        entries: list[ServiceEntry] = list(self.services.get(key) or [])
        return entries[-1] if entries else None

    async def reconcile(self, key: JobKey) -> float | None:
        entry = self._latest(key)
        if entry is None or (entry.body.get("metadata") or {}).get("deletionTimestamp"):
            self._hints.pop(key, None)
            self._unschedulable.pop(key, None)
            self._told_refusals.pop(key, None)
            self.wake_scheduler()
            return None
        # Our last write's result stays the view until the index shows it: a decision on an older
        # status could take the pods of a group it does not know yet for leftovers.
        body = entry.body
        hint = self._hints.get(key)
        if hint is not None:
            body = newer(hint, entry.body)
            if body is entry.body:
                del self._hints[key]
        if entry.service is None:
            await self._reject(body, entry.invalid or "invalid spec")
            return None
        decision = self.decide(key, body, entry.service)
        return await self._apply(body, entry.service, decision)

    def decide(self, key: JobKey, body: Mapping[str, Any], service: InferenceService) -> ServicePlan:
        namespace, name = key
        metadata = body.get("metadata") or {}
        status = _sanitized(body.get("status") or {})
        readable = len(status.get("groups") or []) == len((body.get("status") or {}).get("groups") or [])
        spec = service.spec
        resolution = self._resolve(namespace, service, status)
        revision = (
            build.revision(spec, resolution.mount, self.default_image)
            if resolution.mount is not None
            else None
        )
        uid = metadata.get("uid")
        owned = [
            pod
            for pod in self.pods.get(key) or []
            if any(ref.get("uid") == uid for ref in (pod["metadata"].get("ownerReferences") or []))
        ]
        now = self.clock()
        views = [view for view in map(member_pod, owned) if view is not None]
        members, self._unschedulable[key] = unschedulable_as_seen(
            views, self._unschedulable.get(key, {}), now
        )
        placed = {n for g in status.get("groups") or [] for n in g.get("nodes") or []}
        view = ServiceView(
            name=name,
            namespace=namespace,
            spec=spec,
            generation=metadata.get("generation"),
            status=status,
            revision=revision,
            scaling_note=_note((metadata.get("annotations") or {}).get(ANNOTATION_SCALING)),
            binding_timeout=self.binding_timeout,
            # Pods of a group whose entry cannot be read are not taken for leftovers.
            sweep_leftovers=readable,
        )
        used = placed | {m.node_name for m in members if m.node_name}
        nodes = node_health(used, node_lookup(self.nodes), now, self.node_lost_after)
        decision = plan(
            view,
            resolution,
            members,
            nodes.lost,
            now,
            selector=",".join(f"{k}={v}" for k, v in sorted(names.leader_selector(name).items())),
            url=names.service_url(name, namespace),
        )
        recheck = nodes.recheck_after(now)
        if recheck is not None:
            # A node that stays not Ready sends no event when its grace ends.
            before = decision.requeue_after
            decision.requeue_after = recheck if before is None else min(before, recheck)
        autoscalers = sorted(str(n) for n in self.autoscalers.get(key) or [])
        conflict = bool(autoscalers) and spec.autoscaling is not None
        conditions = set_condition(
            decision.status.get("conditions") or [],
            ServiceConditionType.SCALING_CONFLICT,
            conflict,
            ServiceReason.HORIZONTAL_POD_AUTOSCALER if conflict else ServiceReason.NO_CONFLICT,
            (
                f"HorizontalPodAutoscaler {', '.join(autoscalers)} targets this service, but "
                "spec.autoscaling is set and largo owns spec.replicas: remove one of them"
                if conflict
                else "no other autoscaler targets this service"
            ),
            self.clock(),
            metadata.get("generation"),
        )
        decision.status["conditions"] = conditions
        return decision

    def _resolve(
        self, namespace: str, service: InferenceService, status: Mapping[str, Any]
    ) -> ModelResolution:
        served = status.get("model")
        source = service.spec.model
        job_body: Mapping[str, Any] | None = None
        if source.from_train_job is not None:
            entries = list(self.trainjobs.get((namespace, source.from_train_job.name)) or [])
            job_body = entries[-1].body if entries else None
        deadline = service.spec.rollout.progress_deadline_seconds
        resolution = resolve_model(
            service.spec,
            served if isinstance(served, Mapping) else None,
            job_body,
            hold_newer=rollout_under_way(status, self.clock(), deadline),
        )
        mount = resolution.mount
        if mount is not None and not list(self.claims.get((namespace, mount.claim_name)) or []):
            return ModelResolution(
                None,
                ServiceReason.CLAIM_NOT_FOUND,
                f"PersistentVolumeClaim {mount.claim_name} (the model's) does not exist in {namespace}",
            )
        return resolution

    async def _apply(
        self, body: Mapping[str, Any], service: InferenceService, decision: ServicePlan
    ) -> float | None:
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        current = _sanitized(body.get("status") or {})
        dropped = current != dict(body.get("status") or {})
        written: Mapping[str, Any] = body
        if decision.status != current or dropped:
            check_service_status(decision.status)
            patch = status_patch(dict(body.get("status") or {}), decision.status)
            written = await self.kube.patch_service_status(
                namespace, name, metadata.get("resourceVersion"), patch
            )
            self._hints[(namespace, name)] = written
        if decision.wake_scheduler:
            self.wake_scheduler()
        # Deletes and events first: a refused create (quota, a webhook, a Service of that name that is
        # not ours) must not hold back the drain of retired groups, a scale to zero or the restart of
        # failed ones, whose pods would keep their GPUs.
        if decision.delete:
            await asyncio.gather(
                *(
                    self.kube.delete_pod(namespace, pod, pod in decision.force_delete)
                    for pod in dict.fromkeys(decision.delete)
                )
            )
        for event in decision.events:
            await self.kube.event(written, event.type, event.reason, event.message)
        # The network before the pods: a replica without its Services would be reachable by no one. Its
        # refusal (a Service of that name that is not ours) is recorded on the groups whose pods wait
        # for it, as a refusal of their pods is: their GPUs go back after the binding timeout.
        waiting = {c.replica: c.attempt for c in decision.create} if decision.model is not None else {}
        await self.make_network((namespace, name), written, service, waiting)
        if decision.create and decision.model is not None:
            model = decision.model
            pods = [
                build.build_pod(service, model, c.replica, c.member, c.node, c.attempt, self.default_image)
                for c in decision.create
            ]
            groups = {
                names.member_pod_name(name, create.replica, create.member): (create.replica, create.attempt)
                for create in decision.create
            }
            await self._create(written, pods, groups)
        return decision.requeue_after

    async def make_network(
        self,
        key: JobKey,
        owner: Mapping[str, Any],
        service: InferenceService,
        waiting: Mapping[int, int] | None = None,
    ) -> None:
        """The service's Services, the router's account and its Deployment, written once per (uid, router
        Deployment). Marked as made before the writes, not after: a part deleted while they are in flight
        clears the mark (``forget_network``) and the next cycle makes it again, where a mark set after them
        would overwrite that and leave the part missing. A failed write clears the mark too. A refusal is
        recorded on the ``waiting`` groups (replica -> attempt), whose pods are created after it."""
        deployment = router.build_router_deployment(service, self.router_image)
        made = (str(owner["metadata"].get("uid")), json.dumps(deployment, sort_keys=True))
        if self._networked.get(key) == made:
            return
        self._networked[key] = made
        account, role, binding = router.build_router_account(service)
        # In the order they need each other: the API server refuses a RoleBinding to a Role that does not
        # exist yet from an account without the bind verb (it checks the binder holds the Role's rules),
        # and a router started before its binding would be refused its first listing.
        stages = [
            [
                build.build_members_service(service),
                router.build_replicas_service(service),
                build.build_service(service),
                account,
                role,
            ],
            [binding],
            [deployment, router.build_router_budget(service)],
        ]
        try:
            for manifests in stages:
                # Kept, not only created: a change of spec.router reaches the running router, and what
                # an earlier version of largo made (the router's Role, a Service) is brought up to date.
                await self._create(owner, manifests, keep=True, blocked=waiting)
        except BaseException:
            if self._networked.get(key) == made:
                del self._networked[key]
            raise
        self._told_refusals.pop(key, None)

    async def _create(
        self,
        owner: Mapping[str, Any],
        manifests: list[dict[str, Any]],
        groups: Mapping[str, tuple[int, int]] | None = None,
        keep: bool = False,
        blocked: Mapping[int, int] | None = None,
    ) -> None:
        """Creates ``manifests`` at once (``keep``: applies them server-side instead, ``Kube.keep``); a
        refusal is told (and, for pods of ``groups``, pod name -> (replica, attempt), recorded on their
        groups; for anything else, on the ``blocked`` groups that wait for it), then raised for back-off."""
        namespace = owner["metadata"]["namespace"]
        write = self.kube.keep if keep else self.kube.create
        results = await asyncio.gather(
            *(write(namespace, owned(manifest, owner)) for manifest in manifests),
            return_exceptions=True,
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        refused = [failure for failure in failures if isinstance(failure, CreateRefused)]
        if refused:
            news = True
            refused_groups = dict(
                groups[failure.name] for failure in refused if groups and failure.name in groups
            )
            if not refused_groups and blocked:
                refused_groups = dict(blocked)
            if refused_groups:
                try:
                    news = await self._record_refusal(owner, refused_groups, refused[0])
                except ConflictError:
                    # Recorded by the next run, soon (a conflict's back-off is short).
                    logger.warning("%s/%s: %s", namespace, owner["metadata"]["name"], refused[0].message)
                    raise
            else:
                told = (str(owner["metadata"].get("uid")), refused[0].reason, refused[0].message)
                key = (namespace, owner["metadata"]["name"])
                news = self._told_refusals.get(key) != told
                self._told_refusals[key] = told
            if news:
                logger.warning("%s/%s: %s", namespace, owner["metadata"]["name"], refused[0].message)
                await self.kube.event(owner, "Warning", refused[0].reason, refused[0].message)
        if failures:
            raise (refused or failures)[0]

    async def _record_refusal(
        self, body: Mapping[str, Any], groups: Mapping[int, int], refused: CreateRefused
    ) -> bool:
        """Records on the groups when their pods began to be refused (their GPUs are given back after
        the binding timeout); whether the refusal is news."""
        metadata = body["metadata"]
        status = body.get("status") or {}
        updated, news = group_creation_refused(status, groups, refused.reason, refused.message, self.clock())
        if updated != list(status.get("groups") or []):
            check_service_status({**status, "groups": updated})
            written = await self.kube.patch_service_status(
                metadata["namespace"], metadata["name"], metadata.get("resourceVersion"), {"groups": updated}
            )
            self._hints[(metadata["namespace"], metadata["name"])] = written
        return news

    async def _reject(self, body: Mapping[str, Any], message: str) -> None:
        """A spec the schema let through but largo cannot run: say why, once, and wait for a fix."""
        metadata = body["metadata"]
        conditions = (body.get("status") or {}).get("conditions") or []
        if any(
            c.get("reason") == ServiceReason.INVALID_SPEC and c.get("message") == message for c in conditions
        ):
            return
        updated = set_condition(
            conditions,
            ServiceConditionType.READY,
            False,
            ServiceReason.INVALID_SPEC,
            message,
            self.clock(),
            metadata.get("generation"),
        )
        serving = int((body.get("status") or {}).get("readyReplicas") or 0) > 0
        patch = {
            "observedGeneration": metadata.get("generation"),
            "conditions": updated,
            # Its replicas of the spec before may still serve, but not as asked: never Ready beside
            # Ready=False.
            "phase": ServicePhase.DEGRADED if serving else ServicePhase.PENDING,
            "reason": ServiceReason.INVALID_SPEC.value,
            "message": message,
        }
        await self.kube.patch_service_status(
            metadata["namespace"], metadata["name"], metadata.get("resourceVersion"), patch
        )
        await self.kube.event(body, "Warning", ServiceReason.INVALID_SPEC, message)


def _sanitized(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status without what does not fit the schema, group by group: one malformed group entry
    (written by hand, or by a newer operator) must not make every group, and so every pod, look
    unknown."""
    groups = status.get("groups")
    clean, _ = sanitize_service_status({k: v for k, v in status.items() if k != "groups"})
    if isinstance(groups, list):
        kept = (sanitize_service_status({"groups": [group]}) for group in groups)
        clean["groups"] = [fitting["groups"][0] for fitting, dropped in kept if not dropped]
    return clean


def _note(raw: Any) -> Mapping[str, Any] | None:
    """The autoscaler's last note (a JSON object in an annotation); None when absent or not one."""
    if not isinstance(raw, str):
        return None
    try:
        note = json.loads(raw)
    except ValueError:
        return None
    return note if isinstance(note, dict) else None
