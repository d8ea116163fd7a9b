"""One InferenceService cycle, decided purely: the model's source, the replicas wanted, and the plan.

The plan tests simulate a service over several cycles as the controller and the gang scheduler would
run it: the plan's ``create`` becomes running and ready member pods, its ``delete`` makes pods
terminating (gone the cycle after), and the scheduler admits each queued group whole onto nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from largo.api.v1alpha1 import (
    InferenceService,
    InferenceServiceSpec,
    ServiceReason,
    check_service_status,
)
from largo.manifests.inferenceservice import ModelMount
from largo.manifests.names import member_pod_name
from largo.policy.conditions import condition_status, timestamp
from largo.policy.inferenceservice import (
    RESTART_BACKOFF_CAP,
    CreateMember,
    MemberPod,
    ModelResolution,
    ServicePlan,
    ServiceView,
    desired_replicas,
    group_creation_refused,
    group_requests_pending,
    member_pod,
    plan,
    resolve_model,
    rollout_under_way,
    served_model,
)
from largo.policy.pods import unschedulable_as_seen

NOW = 1_800_000_000.0
NONE: frozenset[str] = frozenset()
NAME = "llama"
SELECTOR = "largo.dev/inferenceservice=llama,largo.dev/member=0"
URL = "http://llama.ml.svc"
REV_A, REV_B = "rev-a", "rev-b"
MOUNT = ModelMount(claim_name="weights")
RESOLVED = ModelResolution(MOUNT, ServiceReason.MODEL_RESOLVED, "serving claim weights")


def spec_of(**spec: Any) -> InferenceServiceSpec:
    body = {"model": {"claimName": "weights"}, **spec}
    return InferenceService.from_body({"metadata": {"name": NAME, "namespace": "ml"}, "spec": body}).spec


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    (found,) = [c for c in status["conditions"] if c["type"] == type_]
    result: dict[str, Any] = found
    return result


def group_of(status: dict[str, Any], replica: int) -> dict[str, Any]:
    (found,) = [g for g in status["groups"] if g["replica"] == replica]
    result: dict[str, Any] = found
    return result


def running(replica: int, member: int, node: str, attempt: int = 0, revision: str = REV_A) -> MemberPod:
    return MemberPod(
        name=member_pod_name(NAME, replica, member),
        replica=replica,
        member=member,
        attempt=attempt,
        revision=revision,
        phase="Running",
        ready=True,
        node_name=node,
        terminating=False,
    )


def admitted(replica: int, nodes: list[str], revision: str = REV_A, **extra: Any) -> dict[str, Any]:
    return {
        "replica": replica,
        "revision": revision,
        "attempt": 0,
        "nodes": nodes,
        "queuedAt": timestamp(NOW - 100),
        "admittedAt": timestamp(NOW - 90),
        "ready": True,
        "restarts": 0,
        **extra,
    }


# --- the simulation --------------------------------------------------------------------------------


@dataclass
class Sim:
    """A service, its pods and its status, advanced one cycle at a time."""

    spec: InferenceServiceSpec
    revision: str | None = REV_A
    resolution: ModelResolution = RESOLVED
    status: dict[str, Any] = field(default_factory=dict)
    pods: dict[str, MemberPod] = field(default_factory=dict)
    now: float = NOW
    generation: int = 1
    lost: frozenset[str] = NONE
    plans: list[ServicePlan] = field(default_factory=list)
    admissions: int = 0

    def plan(self) -> ServicePlan:
        view = ServiceView(NAME, "ml", self.spec, self.generation, self.status, self.revision)
        return plan(
            view, self.resolution, list(self.pods.values()), self.lost, self.now, selector=SELECTOR, url=URL
        )

    def apply(self, decision: ServicePlan) -> None:
        """What the controller does with a plan, and what the cluster then shows."""
        check_service_status(decision.status)
        self.plans.append(decision)
        # Pods deleted at the cycle before are gone; those deleted now are terminating.
        self.pods = {n: p for n, p in self.pods.items() if not p.terminating}
        for name in decision.delete:
            if name in self.pods:
                self.pods[name] = replace(self.pods[name], terminating=True, ready=False)
        revision = self.revision
        assert decision.create == [] or (decision.model is not None and revision is not None)
        for create in decision.create:
            name = member_pod_name(NAME, create.replica, create.member)
            assert name not in self.pods, f"{name} created while it still exists"
            self.pods[name] = running(
                create.replica, create.member, create.node, create.attempt, str(revision)
            )
        self.status = decision.status

    def admit(self) -> None:
        """The gang scheduler: every queued group past its back-off gets nodes, all at once."""
        for group in group_requests_pending(self.status, self.now):
            self.admissions += 1
            members = self.spec.nodes_per_replica
            group_nodes = [f"n{self.admissions}-{m}" for m in range(members)]
            assert isinstance(group, dict)  # the very dict in self.status, as the scheduler patches it
            group.update(nodes=group_nodes, admittedAt=timestamp(self.now))

    def cycle(self) -> ServicePlan:
        decision = self.plan()
        self.apply(decision)
        self.admit()
        self.now += 5
        return decision

    def settle(self, cycles: int = 10) -> None:
        for _ in range(cycles):
            self.cycle()


def ready_service(replicas: int = 2, nodes: int = 2, **spec: Any) -> Sim:
    sim = Sim(spec_of(replicas=replicas, nodesPerReplica=nodes, **spec))
    sim.settle()
    assert sim.status["ready"] == f"{replicas}/{replicas}"
    assert len(sim.pods) == replicas * nodes
    return sim


# --- resolve_model ---------------------------------------------------------------------------------

JOB = "pretrain"


def from_job(follow: bool = False) -> InferenceServiceSpec:
    return spec_of(model={"fromTrainJob": {"name": JOB, "follow": follow}})


def trainjob(
    step: int | None = None,
    phase: str = "Running",
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if checkpoint is None:
        checkpoint = {"claimName": "ckpt", "subPath": "runs/a"}
    status: dict[str, Any] = {"phase": phase}
    if step is not None:
        status["progress"] = {"step": step + 7, "checkpointStep": step}
    return {"metadata": {"name": JOB}, "spec": {"checkpoint": checkpoint}, "status": status}


SERVED_500 = {"claimName": "ckpt", "path": "runs/a", "trainJob": JOB, "checkpointStep": 500}
AT_500 = ModelMount(claim_name="ckpt", sub_path="runs/a", step=500, train_job=JOB)
AT_800 = ModelMount(claim_name="ckpt", sub_path="runs/a", step=800, train_job=JOB)


@pytest.mark.parametrize(
    ("follow", "served", "job", "mount", "reason", "words"),
    [
        (False, None, None, None, ServiceReason.TRAIN_JOB_NOT_FOUND, ["pretrain", "not found"]),
        (
            False,
            None,
            {"metadata": {"name": JOB}, "spec": {}, "status": {"progress": {"checkpointStep": 5}}},
            None,
            ServiceReason.TRAIN_JOB_WITHOUT_CHECKPOINT,
            ["spec.checkpoint"],
        ),
        (False, None, trainjob(None, phase="Failed"), None, ServiceReason.TRAIN_JOB_FAILED, ["failed"]),
        (False, None, trainjob(None), None, ServiceReason.WAITING_FOR_CHECKPOINT, ["waiting", "pretrain"]),
        (False, None, trainjob(None, phase="Queued"), None, ServiceReason.WAITING_FOR_CHECKPOINT, []),
        (False, None, trainjob(500), AT_500, ServiceReason.MODEL_RESOLVED, ["pretrain@step-500"]),
        # A failed job with a complete checkpoint still has something to serve.
        (False, None, trainjob(500, phase="Failed"), AT_500, ServiceReason.MODEL_RESOLVED, ["step-500"]),
        (
            False,
            None,
            trainjob(300, checkpoint={"claimName": "ckpt"}),
            ModelMount(claim_name="ckpt", step=300, train_job=JOB),
            ServiceReason.MODEL_RESOLVED,
            [],
        ),
        (False, SERVED_500, trainjob(800), AT_500, ServiceReason.MODEL_RESOLVED, ["step-500", "pinned"]),
        (
            True,
            SERVED_500,
            trainjob(800),
            AT_800,
            ServiceReason.NEWER_CHECKPOINT,
            ["step-800", "was step 500"],
        ),
        (True, SERVED_500, trainjob(500), AT_500, ServiceReason.MODEL_RESOLVED, ["step-500"]),
        (False, SERVED_500, None, AT_500, ServiceReason.TRAIN_JOB_NOT_FOUND, ["gone", "step-500"]),
        (True, SERVED_500, None, AT_500, ServiceReason.TRAIN_JOB_NOT_FOUND, ["gone", "step-500"]),
        # What was served came from another job (the spec changed): nothing is pinned.
        (False, {**SERVED_500, "trainJob": "older"}, trainjob(800), AT_800, ServiceReason.MODEL_RESOLVED, []),
        (False, {**SERVED_500, "trainJob": "older"}, None, None, ServiceReason.TRAIN_JOB_NOT_FOUND, []),
        # The job went back to an earlier checkpoint: followed, and said (a Warning event, below).
        (
            True,
            SERVED_500,
            trainjob(300),
            replace(AT_500, step=300),
            ServiceReason.OLDER_CHECKPOINT,
            ["rolling back", "step-300", "was step 500"],
        ),
        # A restarted or resumed job reports no step until its next checkpoint: what is served stays.
        (False, SERVED_500, trainjob(None), AT_500, ServiceReason.MODEL_RESOLVED, ["step-500", "no newer"]),
        (True, SERVED_500, trainjob(None), AT_500, ServiceReason.MODEL_RESOLVED, ["step-500", "no newer"]),
        (True, SERVED_500, trainjob(None, phase="Failed"), AT_500, ServiceReason.TRAIN_JOB_FAILED, ["still"]),
        (
            True,
            SERVED_500,
            {"metadata": {"name": JOB}, "spec": {}, "status": {}},
            AT_500,
            ServiceReason.TRAIN_JOB_WITHOUT_CHECKPOINT,
            ["still serving", "step-500"],
        ),
    ],
    ids=[
        "job-missing",
        "job-without-checkpoint",
        "failed-without-checkpoint",
        "waiting-running",
        "waiting-queued",
        "checkpoint",
        "failed-with-checkpoint",
        "checkpoint-without-sub-path",
        "pinned-without-follow",
        "newer-with-follow",
        "same-step-with-follow",
        "job-gone-pinned",
        "job-gone-pinned-follow",
        "served-from-another-job",
        "served-from-another-job-gone",
        "followed-job-went-back",
        "pinned-job-restarted",
        "pinned-job-restarted-follow",
        "pinned-job-failed-since",
        "pinned-job-checkpoint-removed",
    ],
)
def test_resolve_model_from_a_trainjob(
    follow: bool,
    served: dict[str, Any] | None,
    job: dict[str, Any] | None,
    mount: ModelMount | None,
    reason: ServiceReason,
    words: list[str],
) -> None:
    resolution = resolve_model(from_job(follow), served, job)
    assert resolution.mount == mount
    assert resolution.reason == reason
    for word in words:
        assert word in resolution.message


@pytest.mark.parametrize(
    ("model", "mount"),
    [
        ({"claimName": "weights"}, ModelMount(claim_name="weights")),
        ({"claimName": "weights", "path": "llama/8b"}, ModelMount(claim_name="weights", sub_path="llama/8b")),
    ],
)
def test_resolve_model_from_a_claim(model: dict[str, Any], mount: ModelMount) -> None:
    # Whatever was served before, or whichever job exists, a claim is a claim.
    resolution = resolve_model(spec_of(model=model), SERVED_500, trainjob(900))
    assert resolution.mount == mount
    assert resolution.reason == ServiceReason.MODEL_RESOLVED
    assert mount.summary() in resolution.message


@pytest.mark.parametrize("sub_path", [None, "runs/a"])
def test_a_served_checkpoint_read_back_from_status_is_the_same_mount(sub_path: str | None) -> None:
    """Without follow the status pins the model: reading it back must give the very mount (and so the
    same revision), or every cycle would start a rollout."""
    checkpoint = {"claimName": "ckpt", **({"subPath": sub_path} if sub_path else {})}
    first = resolve_model(from_job(), None, trainjob(500, checkpoint=checkpoint)).mount
    assert first is not None
    status_model = served_model(first)
    later = resolve_model(from_job(), status_model, trainjob(900, checkpoint=checkpoint))
    assert later.mount == first
    assert status_model["checkpointStep"] == 500
    assert status_model["summary"] == "pretrain@step-500"


# --- desired_replicas --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected", "words"),
    [
        ({"replicas": 3}, (3, False), ["no autoscaling"]),
        ({"replicas": 0}, (0, False), []),
        ({"replicas": 2, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}}, (2, False), []),
        (
            {"replicas": 9, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
            (4, True),
            ["spec.replicas 9", "[1, 4]", "maxReplicas 4"],
        ),
        (
            {"replicas": 1, "autoscaling": {"minReplicas": 2, "maxReplicas": 4}},
            (2, True),
            ["spec.replicas 1", "[2, 4]", "minReplicas 2"],
        ),
        (
            {"replicas": 0, "autoscaling": {"minReplicas": 2, "maxReplicas": 4}},
            (2, True),
            ["minReplicas 2"],
        ),
        (
            {"replicas": 0, "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "scaleToZero": True}},
            (0, False),
            [],
        ),
        (
            {"replicas": 1, "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "scaleToZero": True}},
            (2, True),
            ["minReplicas 2"],
        ),
    ],
    ids=[
        "no-autoscaling",
        "no-autoscaling-zero",
        "within",
        "above-max",
        "below-min",
        "zero-without-scale-to-zero",
        "scale-to-zero",
        "scale-to-zero-only-at-zero",
    ],
)
def test_desired_replicas(spec: dict[str, Any], expected: tuple[int, bool], words: list[str]) -> None:
    desired = desired_replicas(spec_of(**spec))
    assert (desired.replicas, desired.limited) == expected
    for word in words:
        assert word in desired.message


# --- member_pod --------------------------------------------------------------------------------------


def pod_body(labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": "llama-r2-node-1", "labels": labels, **extra.pop("metadata", {})}, **extra}


LABELS = {
    "largo.dev/inferenceservice": "llama",
    "largo.dev/replica": "2",
    "largo.dev/member": "1",
    "largo.dev/attempt": "3",
    "largo.dev/revision": "abc",
}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            pod_body(
                LABELS,
                spec={"nodeName": "gpu-4"},
                status={"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
            ),
            MemberPod("llama-r2-node-1", 2, 1, 3, "abc", "Running", True, "gpu-4", False),
        ),
        (
            pod_body(
                LABELS,
                status={
                    "phase": "Running",
                    "conditions": [
                        {"type": "ContainersReady", "status": "True"},
                        {"type": "Ready", "status": "False"},
                    ],
                },
            ),
            MemberPod("llama-r2-node-1", 2, 1, 3, "abc", "Running", False, None, False),
        ),
        (
            pod_body(LABELS, metadata={"deletionTimestamp": "2027-01-01T00:00:00Z"}),
            MemberPod("llama-r2-node-1", 2, 1, 3, "abc", "Pending", False, None, True),
        ),
        (
            pod_body(
                {k: v for k, v in LABELS.items() if k != "largo.dev/revision"}, status={"phase": "Failed"}
            ),
            MemberPod("llama-r2-node-1", 2, 1, 3, "", "Failed", False, None, False),
        ),
        (pod_body({k: v for k, v in LABELS.items() if k != "largo.dev/attempt"}), None),
        (pod_body({k: v for k, v in LABELS.items() if k != "largo.dev/replica"}), None),
        (pod_body({**LABELS, "largo.dev/member": "leader"}), None),
        ({"metadata": {"name": "x"}}, None),
        ({}, None),
    ],
    ids=[
        "running-ready",
        "running-not-ready",
        "terminating",
        "failed-no-revision",
        "no-attempt",
        "no-replica",
        "bad-member",
        "no-labels",
        "empty",
    ],
)
def test_member_pod(body: dict[str, Any], expected: MemberPod | None) -> None:
    assert member_pod(body) == expected


# --- plan: a new service -------------------------------------------------------------------------------


def test_new_service_queues_replicas_groups_and_wakes_the_scheduler() -> None:
    sim = Sim(spec_of(replicas=2, nodesPerReplica=2))
    decision = sim.plan()
    assert decision.create == []
    assert decision.delete == []
    assert decision.wake_scheduler is True
    assert decision.model == MOUNT
    status = decision.status
    assert [(g["replica"], g["revision"], g["nodes"], g["attempt"]) for g in status["groups"]] == [
        (0, REV_A, [], 0),
        (1, REV_A, [], 0),
    ]
    assert all(g["queuedAt"] == timestamp(NOW) and g["ready"] is False for g in status["groups"])
    assert status["phase"] == "Pending"
    assert status["ready"] == "0/2"
    assert (status["replicas"], status["desiredReplicas"], status["readyReplicas"]) == (2, 2, 0)
    assert status["updatedReplicas"] == 2
    assert status["revision"] == REV_A
    assert status["selector"] == SELECTOR
    assert status["url"] == URL
    assert status["observedGeneration"] == 1
    assert status["model"] == {"claimName": "weights", "summary": "weights"}
    assert condition(status, "ModelReady")["status"] == "True"
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "Ready")["reason"] == ServiceReason.REPLICAS_NOT_READY
    check_service_status(status)


def test_admitted_group_gets_its_members_created_on_its_nodes() -> None:
    sim = Sim(spec_of(replicas=2, nodesPerReplica=2))
    sim.apply(sim.plan())
    # The scheduler admits group 1 only.
    group_of(sim.status, 1).update(nodes=["gpu-c", "gpu-d"], admittedAt=timestamp(NOW))
    decision = sim.plan()
    assert decision.create == [CreateMember(1, 0, "gpu-c", 0), CreateMember(1, 1, "gpu-d", 0)]
    # Group 0 still waits for the scheduler.
    assert decision.wake_scheduler is True
    assert decision.status["ready"] == "0/2"


def test_a_member_that_cannot_start_is_named_in_the_ready_message() -> None:
    """A wrong image leaves the member waiting for good: the Ready condition's message says which pod
    and the kubelet's reason, not only 0/1 ready."""
    waiting = {"reason": "ErrImagePull", "message": 'pull access denied for "no/such"'}
    first = {"largo.dev/replica": "0", "largo.dev/member": "0", "largo.dev/attempt": "0"}
    body = pod_body(
        {**LABELS, **first, "largo.dev/revision": REV_A},
        spec={"nodeName": "gpu-a"},
        status={"phase": "Pending", "containerStatuses": [{"name": "server", "state": {"waiting": waiting}}]},
    )
    stuck = member_pod(body)
    assert stuck is not None
    assert stuck.cannot_start == 'ErrImagePull: pull access denied for "no/such"'
    status = {"groups": [admitted(0, ["gpu-a"], ready=False)], "desiredReplicas": 1}
    view = ServiceView(NAME, "ml", spec_of(replicas=1, nodesPerReplica=1), 1, status, REV_A)
    decision = plan(view, RESOLVED, [stuck], NONE, NOW, SELECTOR, URL)
    ready = condition(decision.status, "Ready")
    assert ready["status"] == "False"
    assert ready["message"] == (
        f'0/1 replicas ready; pod {stuck.name} cannot start: ErrImagePull: pull access denied for "no/such"'
    )


def test_service_becomes_ready_once_every_member_runs_and_is_ready() -> None:
    sim = Sim(spec_of(replicas=2, nodesPerReplica=2))
    sim.settle()
    status = sim.status
    assert status["phase"] == "Ready"
    assert status["ready"] == "2/2"
    assert status["readyReplicas"] == 2
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", ServiceReason.ALL_REPLICAS_READY)
    assert condition(status, "Progressing")["status"] == "True"
    assert condition(status, "ScalingLimited")["status"] == "False"
    assert status["reason"] == ServiceReason.ALL_REPLICAS_READY
    assert sorted(sim.pods) == [
        "llama-r0-node-0",
        "llama-r0-node-1",
        "llama-r1-node-0",
        "llama-r1-node-1",
    ]
    # Each group's members sit on the nodes it was admitted to, member m on nodes[m].
    for group in status["groups"]:
        for member, node in enumerate(group["nodes"]):
            assert sim.pods[member_pod_name(NAME, group["replica"], member)].node_name == node
    # Nothing more to do, and no scheduler to wake.
    decision = sim.cycle()
    assert (decision.create, decision.delete, decision.wake_scheduler) == ([], [], False)


def test_one_member_not_ready_keeps_its_group_and_the_service_not_ready() -> None:
    sim = ready_service()
    sim.pods["llama-r1-node-1"] = replace(sim.pods["llama-r1-node-1"], ready=False)
    decision = sim.plan()
    assert decision.create == []
    assert decision.delete == []
    assert group_of(decision.status, 1)["ready"] is False
    assert group_of(decision.status, 0)["ready"] is True
    assert decision.status["phase"] == "Degraded"
    assert decision.status["ready"] == "1/2"


# --- plan: restarts -------------------------------------------------------------------------------------


def restarted(decision: ServicePlan) -> list[str]:
    return [e.message for e in decision.events if e.reason == ServiceReason.GROUP_RESTARTED]


@pytest.mark.parametrize(
    ("break_it", "cause"),
    [
        (
            lambda sim: sim.pods.update(
                {"llama-r0-node-1": replace(sim.pods["llama-r0-node-1"], phase="Failed")}
            ),
            "member 1 (llama-r0-node-1) failed",
        ),
        (
            lambda sim: sim.pods.update(
                {"llama-r0-node-1": replace(sim.pods["llama-r0-node-1"], terminating=True, ready=False)}
            ),
            "member 1 (llama-r0-node-1) was deleted",
        ),
        (
            lambda sim: setattr(sim, "lost", frozenset({sim.pods["llama-r0-node-0"].node_name, "elsewhere"})),
            "lost",
        ),
        # Deleted and gone between two reconciles: never seen terminating.
        (lambda sim: sim.pods.pop("llama-r0-node-1"), "member 1 (llama-r0-node-1) is gone"),
    ],
    ids=["member-failed", "member-deleted", "node-lost", "member-vanished"],
)
def test_a_broken_group_restarts_whole_and_alone(break_it: Any, cause: str) -> None:
    sim = ready_service()
    other = dict(group_of(sim.status, 1))
    before = dict(group_of(sim.status, 0))
    break_it(sim)
    decision = sim.plan()

    group = group_of(decision.status, 0)
    assert group["attempt"] == before["attempt"] + 1 == 1
    assert group["nodes"] == []
    assert group["ready"] is False
    assert group["restarts"] == 1
    assert group["restartAfter"] == timestamp(sim.now + 1)
    assert group.get("admittedAt") is None
    # Both members of the group go (the broken one too, unless already terminating), none of the other.
    expected = {n for n, p in sim.pods.items() if n.startswith("llama-r0-") and not p.terminating}
    assert set(decision.delete) == expected
    assert decision.create == []
    assert group_of(decision.status, 1) == other
    (message,) = restarted(decision)
    assert message.startswith("replica 0 restarted whole (restart 1): ")
    assert cause in message
    (event,) = [e for e in decision.events if e.reason == ServiceReason.GROUP_RESTARTED]
    assert event.type == "Warning"
    assert decision.requeue_after == pytest.approx(1.0)
    assert decision.wake_scheduler is True
    assert decision.status["ready"] == "1/2"
    assert decision.status["phase"] == "Degraded"
    check_service_status(decision.status)


def test_a_member_not_created_yet_is_created_alone_and_a_restarted_group_forms_again() -> None:
    """Before every member has existed, a missing one is still to be created (its create was refused,
    or the pod index has not shown it yet): no restart for that. After a restart the new attempt's
    members are waited for the same way."""
    sim = ready_service()
    assert all(g["formed"] for g in sim.status["groups"])
    group = group_of(sim.status, 0)
    group["formed"] = False
    del sim.pods["llama-r0-node-1"]
    decision = sim.plan()
    assert restarted(decision) == []
    assert [(c.replica, c.member) for c in decision.create] == [(0, 1)]
    assert group_of(decision.status, 0)["formed"] is False

    sim = ready_service()
    del sim.pods["llama-r0-node-1"]
    restart = sim.cycle()
    assert len(restarted(restart)) == 1
    assert group_of(restart.status, 0)["formed"] is False
    sim.settle(3)
    assert group_of(sim.status, 0)["attempt"] == 1
    assert group_of(sim.status, 0)["formed"] is True
    assert sim.status["ready"] == "2/2"


def test_a_lost_node_names_the_node_in_the_event() -> None:
    sim = ready_service()
    node = sim.pods["llama-r1-node-1"].node_name
    assert node is not None
    sim.lost = frozenset({node})
    decision = sim.plan()
    (message,) = restarted(decision)
    assert message == f"replica 1 restarted whole (restart 1): node {node} lost"
    assert set(decision.delete) == {"llama-r1-node-0", "llama-r1-node-1"}
    assert group_of(decision.status, 0)["attempt"] == 0


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 1.0), (1, 2.0), (5, 32.0), (8, 256.0), (9, RESTART_BACKOFF_CAP), (10_000, RESTART_BACKOFF_CAP)],
)
def test_restart_back_off_doubles_with_failures_in_a_row_up_to_the_cap(failures: int, delay: float) -> None:
    """As CrashLoopBackOff: by the failures since the group last served, not its restarts in all (a
    group that served for days and fails once starts again at once), up to five minutes."""
    group = admitted(0, ["gpu-a"], restarts=failures + 7, failures=failures, attempt=2)
    status = {"groups": [group], "desiredReplicas": 1}
    pods = [replace(running(0, 0, "gpu-a", attempt=2), phase="Failed")]
    view = ServiceView(NAME, "ml", spec_of(replicas=1), 1, status, REV_A)
    decision = plan(view, RESOLVED, pods, NONE, NOW, SELECTOR, URL)
    after = group_of(decision.status, 0)
    assert (after["attempt"], after["restarts"], after["failures"]) == (3, failures + 8, failures + 1)
    assert after["restartAfter"] == timestamp(NOW + delay)
    assert decision.requeue_after == pytest.approx(delay)


def test_a_restarted_group_waits_its_back_off_then_comes_back() -> None:
    sim = ready_service()
    sim.pods["llama-r0-node-0"] = replace(sim.pods["llama-r0-node-0"], phase="Failed", ready=False)
    sim.apply(sim.plan())
    # Within the back-off the scheduler is not asked to admit it.
    assert [g["replica"] for g in group_requests_pending(sim.status, sim.now)] == []
    assert [g["replica"] for g in group_requests_pending(sim.status, sim.now + 1)] == [0]
    sim.now += 2
    sim.settle()
    group = group_of(sim.status, 0)
    assert (group["attempt"], group["restarts"], group["ready"]) == (1, 1, True)
    assert sim.pods["llama-r0-node-0"].attempt == 1
    assert sim.status["ready"] == "2/2"


def test_a_stale_pod_of_an_older_attempt_blocks_creation_until_gone() -> None:
    status = {"groups": [admitted(0, ["gpu-a", "gpu-b"], attempt=1, ready=False)], "desiredReplicas": 1}
    stale = running(0, 1, "gpu-x", attempt=0)
    view = ServiceView(NAME, "ml", spec_of(replicas=1, nodesPerReplica=2), 1, status, REV_A)

    decision = plan(view, RESOLVED, [stale], NONE, NOW, SELECTOR, URL)
    assert decision.create == []
    assert decision.delete == ["llama-r0-node-1"]
    assert restarted(decision) == []

    # Terminating: not deleted again, and still in the way.
    decision = plan(view, RESOLVED, [replace(stale, terminating=True)], NONE, NOW, SELECTOR, URL)
    assert decision.create == []
    assert decision.delete == []
    assert restarted(decision) == []

    decision = plan(view, RESOLVED, [], NONE, NOW, SELECTOR, URL)
    assert decision.create == [CreateMember(0, 0, "gpu-a", 1), CreateMember(0, 1, "gpu-b", 1)]


def test_a_member_that_exits_zero_restarts_its_group_too() -> None:
    """With restartPolicy Never a server that exits 0 leaves its pod Succeeded: the pipeline is as
    broken as after a failure, and the group must be restarted, not left not-ready for ever."""
    sim = ready_service()
    sim.pods["llama-r0-node-1"] = replace(sim.pods["llama-r0-node-1"], phase="Succeeded", ready=False)
    sim.settle()
    assert group_of(sim.status, 0)["attempt"] == 1
    assert sim.status["ready"] == "2/2"


# --- plan: rollouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "surge", "unavailable"),
    [(2, 1, 0), (2, 0, 1), (3, 1, 1), (3, 2, 0), (1, 1, 0), (4, 0, 2)],
)
def test_a_new_revision_rolls_group_by_group_within_the_bounds(
    replicas: int, surge: int, unavailable: int
) -> None:
    sim = ready_service(
        replicas=replicas, nodes=2, rollout={"maxSurge": surge, "maxUnavailable": unavailable}
    )
    sim.revision = REV_B
    ready_seen: list[int] = []
    retired_events = 0
    for _ in range(60):
        decision = sim.cycle()
        status = decision.status
        ready_seen.append(status["readyReplicas"])
        live = [g for g in status["groups"] if not g.get("retiring")]
        assert len(live) <= replicas + surge, status["groups"]
        retired_events += sum(1 for e in decision.events if e.reason == ServiceReason.GROUP_RETIRED)
        if (
            status["updatedReplicas"] == replicas
            and status["ready"] == f"{replicas}/{replicas}"
            and (len(status["groups"]) == replicas)
        ):
            break
    else:
        pytest.fail(f"rollout did not finish: {sim.status['groups']}")

    assert min(ready_seen) >= replicas - unavailable, ready_seen
    # It did go below full strength when allowed to, which shows the floor is what holds it.
    if surge == 0:
        assert min(ready_seen) == replicas - unavailable
    assert all(g["revision"] == REV_B and g["ready"] for g in sim.status["groups"])
    assert {p.revision for p in sim.pods.values() if not p.terminating} == {REV_B}
    assert retired_events == replicas
    assert sim.status["revision"] == REV_B
    assert sim.status["phase"] == "Ready"


@pytest.mark.parametrize("formed", [False, True], ids=["never-whole", "member-gone"])
def test_an_old_group_missing_a_member_makes_way_instead_of_being_completed(formed: bool) -> None:
    """Also one whose member went unseen after it was whole: restarted, it would queue again at the old
    revision (and could head the queue) only to be retired once admitted."""
    status = {
        "groups": [
            {**admitted(0, ["gpu-a", "gpu-b"]), "formed": formed},
            admitted(1, ["gpu-c", "gpu-d"], revision=REV_B),
        ],
        "desiredReplicas": 2,
    }
    pods = [
        running(0, 0, "gpu-a"),
        running(1, 0, "gpu-c", revision=REV_B),
        running(1, 1, "gpu-d", revision=REV_B),
    ]
    view = ServiceView(NAME, "ml", spec_of(replicas=2, nodesPerReplica=2), 1, status, REV_B)
    decision = plan(view, RESOLVED, pods, NONE, NOW, SELECTOR, URL)
    assert decision.create == []
    assert group_of(decision.status, 0)["retiring"] is True
    assert restarted(decision) == []
    assert "llama-r0-node-0" in decision.delete
    # A replacement at the new revision is queued, under a fresh replica id.
    fresh = [g for g in decision.status["groups"] if not g.get("retiring")]
    assert [(g["replica"], g["revision"], g["nodes"]) for g in fresh] == [
        (1, REV_B, ["gpu-c", "gpu-d"]),
        (2, REV_B, []),
    ]


def test_a_group_admitted_on_more_nodes_than_the_spec_now_asks_makes_way() -> None:
    """nodesPerReplica 2 -> 4 -> 2: a group the scheduler admitted on 4 nodes in between has the
    current revision again, but no member 2 or 3 can be built; it is replaced, not completed."""
    nodes = ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]
    status = {"groups": [admitted(0, nodes, ready=False)], "desiredReplicas": 1}
    view = ServiceView(NAME, "ml", spec_of(replicas=1, nodesPerReplica=2), 1, status, REV_A)
    decision = plan(view, RESOLVED, [running(0, 0, "gpu-a")], NONE, NOW, SELECTOR, URL)
    assert decision.create == []
    assert group_of(decision.status, 0)["retiring"] is True
    assert "llama-r0-node-0" in decision.delete
    fresh = [g for g in decision.status["groups"] if not g.get("retiring")]
    assert [(g["replica"], g["nodes"]) for g in fresh] == [(1, [])]


def test_a_retiring_group_leaves_status_once_its_pods_are_gone() -> None:
    groups = [admitted(0, ["gpu-a"]), admitted(1, ["gpu-b"], retiring=True, ready=False)]
    status = {"groups": groups, "desiredReplicas": 1}
    view = ServiceView(NAME, "ml", spec_of(replicas=1), 1, status, REV_A)
    leader0 = running(0, 0, "gpu-a")
    leader1 = running(1, 0, "gpu-b")

    decision = plan(view, RESOLVED, [leader0, leader1], NONE, NOW, SELECTOR, URL)
    assert decision.delete == ["llama-r1-node-0"]
    assert [g["replica"] for g in decision.status["groups"]] == [0, 1]
    assert decision.status["replicas"] == 1

    decision = plan(view, RESOLVED, [leader0, replace(leader1, terminating=True)], NONE, NOW, SELECTOR, URL)
    assert decision.delete == []
    assert [g["replica"] for g in decision.status["groups"]] == [0, 1]

    decision = plan(view, RESOLVED, [leader0], NONE, NOW, SELECTOR, URL)
    assert [g["replica"] for g in decision.status["groups"]] == [0]
    assert decision.status["ready"] == "1/1"


# --- plan: scaling -----------------------------------------------------------------------------------------


def test_scale_down_records_the_decision_and_retires_one_group() -> None:
    sim = ready_service(replicas=2, nodes=1)
    sim.spec = spec_of(replicas=1, nodesPerReplica=1)
    sim.generation = 2
    at = sim.now
    decision = sim.cycle()
    assert decision.status["scaling"] == [
        {"time": timestamp(at), "from": 2, "to": 1, "reason": "spec.replicas set to 1"}
    ]
    (scaled,) = [e for e in decision.events if e.reason == ServiceReason.SCALED]
    assert scaled.type == "Normal"
    assert "2 -> 1" in scaled.message
    # The highest replica id goes.
    assert group_of(decision.status, 1)["retiring"] is True
    assert decision.delete == ["llama-r1-node-0"]
    assert decision.status["desiredReplicas"] == 1
    assert decision.status["ready"] == "1/1"
    sim.settle()
    assert [g["replica"] for g in sim.status["groups"]] == [0]
    assert sorted(sim.pods) == ["llama-r0-node-0"]
    # Recorded once, not at every cycle.
    assert len(sim.status["scaling"]) == 1


def test_scaling_decisions_keep_the_last_ten() -> None:
    old = [
        {"time": timestamp(NOW - 1000 + i), "from": i, "to": i + 1, "reason": f"decision {i}"}
        for i in range(10)
    ]
    sim = ready_service(replicas=2, nodes=1)
    sim.status["scaling"] = old
    sim.spec = spec_of(replicas=1, nodesPerReplica=1)
    decision = sim.plan()
    scaling = decision.status["scaling"]
    assert len(scaling) == 10
    assert scaling[:9] == old[1:]
    assert (scaling[-1]["from"], scaling[-1]["to"]) == (2, 1)
    check_service_status(decision.status)


def test_a_clamped_scale_says_why() -> None:
    autoscaling = {"minReplicas": 1, "maxReplicas": 3}
    sim = ready_service(replicas=2, nodes=1, autoscaling=autoscaling)
    sim.spec = spec_of(replicas=7, nodesPerReplica=1, autoscaling=autoscaling)
    decision = sim.plan()
    (entry,) = decision.status["scaling"]
    assert (entry["from"], entry["to"]) == (2, 3)
    assert "clamped to maxReplicas 3" in entry["reason"]
    limited = condition(decision.status, "ScalingLimited")
    assert (limited["status"], limited["reason"]) == ("True", ServiceReason.CLAMPED)


def test_scale_to_zero_retires_every_group() -> None:
    autoscaling = {"minReplicas": 1, "maxReplicas": 3, "scaleToZero": True}
    sim = ready_service(replicas=2, nodes=2, autoscaling=autoscaling)
    sim.spec = spec_of(replicas=0, nodesPerReplica=2, autoscaling=autoscaling)
    decision = sim.cycle()
    assert decision.status["phase"] == "ScaledToZero"
    assert all(g["retiring"] for g in decision.status["groups"])
    assert sorted(decision.delete) == sorted(sim.pods)
    assert decision.create == []
    ready = condition(decision.status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", ServiceReason.SCALED_TO_ZERO)
    assert decision.status["ready"] == "0/0"
    sim.settle()
    assert sim.status["groups"] == []
    assert sim.pods == {}
    assert sim.status["phase"] == "ScaledToZero"
    assert sim.plans[-1].wake_scheduler is False


def test_a_healthy_group_with_old_restarts_does_not_block_a_scale_up() -> None:
    """Restarts count over a group's whole life (node losses included); a group that has long been
    ready again is no stalled rollout, and a scale-up must still add groups."""
    status = {
        "groups": [admitted(0, ["gpu-a"], restarts=3, attempt=3), admitted(1, ["gpu-b"])],
        "desiredReplicas": 2,
    }
    pods = [running(0, 0, "gpu-a", attempt=3), running(1, 0, "gpu-b")]
    view = ServiceView(NAME, "ml", spec_of(replicas=3), 2, status, REV_A)
    decision = plan(view, RESOLVED, pods, NONE, NOW, SELECTOR, URL)
    assert len(decision.status["groups"]) == 3


# --- plan: no model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        (ServiceReason.WAITING_FOR_CHECKPOINT, "waiting for TrainJob pretrain to write its first checkpoint"),
        (ServiceReason.TRAIN_JOB_NOT_FOUND, "TrainJob pretrain not found"),
        (ServiceReason.CLAIM_NOT_FOUND, "PersistentVolumeClaim weights does not exist"),
    ],
)
def test_without_a_model_nothing_is_created(reason: ServiceReason, message: str) -> None:
    sim = Sim(spec_of(replicas=2), revision=None, resolution=ModelResolution(None, reason, message))
    for _ in range(3):
        decision = sim.cycle()
        assert decision.create == []
        assert decision.model is None
    status = sim.status
    assert status["groups"] == []
    assert "revision" not in status
    assert "model" not in status
    model_ready = condition(status, "ModelReady")
    assert (model_ready["status"], model_ready["reason"], model_ready["message"]) == (
        "False",
        reason,
        message,
    )
    progressing = condition(status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", reason)
    assert (status["reason"], status["message"]) == (reason, message)
    assert status["phase"] == "Pending"
    assert status["ready"] == "0/2"


def test_losing_the_model_keeps_the_last_served_one_in_status() -> None:
    sim = ready_service(replicas=1, nodes=1)
    served = sim.status["model"]
    sim.revision = None
    sim.resolution = ModelResolution(None, ServiceReason.CLAIM_NOT_FOUND, "claim weights is gone")
    decision = sim.plan()
    assert decision.status["model"] == served
    assert condition_status(decision.status["conditions"], "ModelReady") == "False"
    # The running group keeps serving.
    assert decision.delete == []
    assert decision.status["ready"] == "1/1"


def test_without_a_model_a_scale_down_still_frees_gpus() -> None:
    """No group can be built while the model is missing, but groups beyond spec.replicas still go
    (a scale to zero must free the GPUs), and a group that is left keeps serving."""
    sim = ready_service(replicas=3, nodes=1)
    sim.revision = None
    sim.resolution = ModelResolution(None, ServiceReason.CLAIM_NOT_FOUND, "claim weights is gone")
    sim.spec = spec_of(replicas=1, nodesPerReplica=1)
    decision = sim.cycle()
    retired = [g["replica"] for g in decision.status["groups"] if g.get("retiring")]
    assert retired == [1, 2]  # the highest replica ids first, all being ready
    assert decision.create == []
    assert decision.status["ready"] == "1/1"
    sim.spec = spec_of(replicas=0, nodesPerReplica=1)
    sim.settle(3)
    assert sim.status["groups"] == []
    assert sim.pods == {}
    assert sim.status["phase"] == "ScaledToZero"


def test_pods_on_a_lost_node_are_deleted_without_grace() -> None:
    sim = ready_service()
    node = sim.pods["llama-r1-node-1"].node_name
    assert node is not None
    sim.lost = frozenset({node})
    decision = sim.plan()
    on_lost = {name for name, pod in sim.pods.items() if pod.node_name == node}
    assert decision.force_delete == on_lost
    assert on_lost <= set(decision.delete)
    # Other pods of the restarted group go with their grace period.
    assert "llama-r1-node-0" not in decision.force_delete or sim.pods["llama-r1-node-0"].node_name == node


def test_a_member_that_cannot_bind_for_the_binding_timeout_restarts_its_group() -> None:
    sim = ready_service(replicas=1)
    stuck = replace(
        sim.pods["llama-r0-node-1"],
        phase="Pending",
        ready=False,
        node_name=None,
        unschedulable_since=NOW - 100,
        unschedulable_message="0/3 nodes are available: 1 Insufficient nvidia.com/gpu",
    )
    sim.pods["llama-r0-node-1"] = stuck
    sim.now = NOW + 50  # 150 s unschedulable, past the default 30 s
    (message,) = restarted(sim.plan())
    assert "member 1 (llama-r0-node-1) could not be bound" in message
    assert "Insufficient nvidia.com/gpu" in message
    sim.pods["llama-r0-node-1"] = replace(stuck, unschedulable_since=sim.now - 5)
    waiting = sim.plan()
    assert restarted(waiting) == []  # not yet
    assert waiting.requeue_after == pytest.approx(25)  # no event comes when the timeout ends


def test_a_group_whose_pods_are_refused_gives_its_gpus_back_after_the_binding_timeout() -> None:
    """A quota that refuses a scaled-up group's pods must not keep its GPUs reserved for good: after
    the binding timeout the group is restarted (queued again after its backoff, without nodes)."""
    sim = Sim(spec_of(replicas=1, nodesPerReplica=2))
    sim.cycle()  # the group is queued, then admitted by the scheduler
    decision = sim.plan()
    assert [c.member for c in decision.create] == [0, 1]
    message = 'pods "llama-r0-node-0" is forbidden: exceeded quota: gpus'
    groups, news = group_creation_refused(sim.status, {0: 0}, "CreateRefused", message, sim.now)
    assert news
    refusal = groups[0]["createRefused"]
    assert refusal == {
        "attempt": 0,
        "since": timestamp(sim.now),
        "reason": "CreateRefused",
        "message": message,
    }
    recorded = {**sim.status, "groups": groups}
    again, news = group_creation_refused(recorded, {0: 0}, "CreateRefused", message, sim.now + 5)
    assert not news  # the same refusal is told once
    assert again[0]["createRefused"]["since"] == timestamp(sim.now)  # when the refusals began
    other_attempt, _ = group_creation_refused(sim.status, {0: 3}, "CreateRefused", message, sim.now)
    assert other_attempt == sim.status["groups"]
    sim.status = {**sim.status, "groups": again}
    check_service_status(sim.status)

    sim.now += 10
    waiting = sim.plan()
    assert restarted(waiting) == []
    assert waiting.requeue_after == pytest.approx(20)  # woken when the binding timeout is over
    assert group_of(waiting.status, 0)["nodes"]

    sim.now += 20
    released = sim.plan()
    (said,) = restarted(released)
    assert "its pods were refused for 30s: " + message in said
    group = group_of(released.status, 0)
    assert group["nodes"] == []  # the GPUs are free for others
    assert group["attempt"] == 1
    assert "createRefused" not in group
    assert released.create == []
    check_service_status(released.status)


def test_a_refusal_is_forgotten_once_every_member_exists() -> None:
    sim = ready_service(replicas=1)
    group = group_of(sim.status, 0)
    since = timestamp(NOW - 100)
    group["createRefused"] = {"attempt": 0, "since": since, "reason": "CreateRefused", "message": "m"}
    decision = sim.plan()
    assert restarted(decision) == []
    assert "createRefused" not in group_of(decision.status, 0)


def test_failures_outside_a_rollout_never_stop_scaling() -> None:
    sim = ready_service(replicas=1)
    group = group_of(sim.status, 0)
    group.update(ready=False, failures=5, restarts=5, nodes=[], attempt=5)
    sim.pods = {}
    sim.spec = spec_of(replicas=3, nodesPerReplica=2)
    decision = sim.plan()
    assert condition(decision.status, "Progressing")["reason"] != "RolloutStalled"
    assert len(decision.status["groups"]) == 3  # scaled up though group 0 keeps failing


def test_pods_of_a_group_entry_that_cannot_be_read_are_not_taken_for_leftovers() -> None:
    sim = ready_service(replicas=2)
    status = dict(sim.status)
    status["groups"] = [g for g in status["groups"] if g["replica"] == 0]  # entry 1 was unreadable
    view = ServiceView(NAME, "ml", sim.spec, 1, status, REV_A, sweep_leftovers=False)
    decision = plan(view, RESOLVED, list(sim.pods.values()), NONE, sim.now, selector=SELECTOR, url=URL)
    assert not any(name.startswith("llama-r1-") for name in decision.delete)
    swept = plan(
        replace(view, sweep_leftovers=True),
        RESOLVED,
        list(sim.pods.values()),
        NONE,
        sim.now,
        selector=SELECTOR,
        url=URL,
    )
    assert {name for name in swept.delete if name.startswith("llama-r1-")} == {
        "llama-r1-node-0",
        "llama-r1-node-1",
    }


def test_a_new_revision_that_never_becomes_ready_stalls_at_its_progress_deadline() -> None:
    """No restart happens (its pods run, their readiness never passes): the deadline says the rollout
    is stuck, once, and the old groups keep serving; the controller is woken when it passes."""
    sim = ready_service(replicas=2, nodes=1, rollout={"progressDeadlineSeconds": 60})
    sim.revision = REV_B
    warnings: list[str] = []
    requeues: list[float | None] = []
    for _ in range(30):  # 5 s a cycle: 150 s
        decision = sim.cycle()
        warnings += [e.reason for e in decision.events if e.type == "Warning"]
        requeues.append(decision.requeue_after)
        sim.pods = {n: replace(p, ready=False) if p.revision == REV_B else p for n, p in sim.pods.items()}
    progressing = condition(sim.status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert "progressDeadlineSeconds (60s)" in progressing["message"]
    assert warnings == ["ProgressDeadlineExceeded"]
    live = [g for g in sim.status["groups"] if not g.get("retiring")]
    assert sorted(g["revision"] for g in live) == [REV_A, REV_A, REV_B]  # one surge group, stuck
    assert sim.status["readyReplicas"] == 2
    assert any(r is not None and 0 < r <= 60 for r in requeues)  # looked at when the deadline passes
    # Scaled down while stalled (the autoscaler at night): an old group's GPUs are freed.
    sim.spec = spec_of(replicas=1, nodesPerReplica=1, rollout={"progressDeadlineSeconds": 60})
    decision = sim.cycle()
    live = [g for g in decision.status["groups"] if not g.get("retiring")]
    assert sorted(g["revision"] for g in live) == [REV_A, REV_B]
    assert "GroupRetired" in [e.reason for e in decision.events]
    assert condition(decision.status, "Progressing")["reason"] == "ProgressDeadlineExceeded"


@pytest.mark.parametrize("surge", [0, 1])
def test_a_rollout_whose_old_groups_all_went_first_still_stalls_at_its_deadline(surge: int) -> None:
    """maxUnavailable >= replicas lets the last old group go before its replacement is ready: the
    rollout is still under way until the new group serves, so its deadline holds (it stayed
    Progressing=True, WaitingForReady, for good)."""
    rollout = {"maxSurge": surge, "maxUnavailable": 1, "progressDeadlineSeconds": 60}
    sim = ready_service(replicas=1, nodes=1, rollout=rollout)
    sim.revision = REV_B
    reasons: list[str] = []
    for _ in range(60):  # 5 s a cycle: 300 s
        sim.cycle()
        reasons.append(condition(sim.status, "Progressing")["reason"])
        sim.pods = {n: replace(p, ready=False) if p.revision == REV_B else p for n, p in sim.pods.items()}
    assert not [g for g in sim.status["groups"] if g["revision"] == REV_A]  # every old group is gone
    assert "WaitingForReady" not in reasons  # a rollout under way says so until it completes
    progressing = condition(sim.status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")


def test_a_rollout_whose_old_groups_all_went_first_stalls_when_the_new_one_keeps_failing() -> None:
    sim = ready_service(replicas=1, nodes=1, rollout={"maxSurge": 0, "maxUnavailable": 1})
    sim.revision = REV_B
    for _ in range(200):  # 1,000 s: back-offs of 1, 2, 4, 8 ... s
        sim.cycle()
        new = {n: p for n, p in sim.pods.items() if p.revision == REV_B}
        failed = {n: replace(p, phase="Failed", ready=False) for n, p in new.items()}
        sim.pods = {**sim.pods, **failed}
    (group,) = [g for g in sim.status["groups"] if not g.get("retiring")]
    assert group["restarts"] >= 3
    progressing = condition(sim.status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "RolloutStalled")


def test_a_completed_rollout_is_over_for_the_deadline() -> None:
    """Once the new groups served, a slow group of a later scale-up is no rollout's."""
    rollout = {"maxSurge": 0, "maxUnavailable": 1, "progressDeadlineSeconds": 10}
    sim = ready_service(replicas=1, nodes=1, rollout=rollout)
    sim.revision = REV_B
    for _ in range(10):
        sim.cycle()
    assert condition(sim.status, "Progressing")["reason"] == "RolloutComplete"
    slow = {g["replica"] for g in sim.status["groups"]} ^ {0, 1}  # the replica id the scale-up takes
    sim.spec = spec_of(replicas=2, nodesPerReplica=1, rollout=rollout)
    for _ in range(6):  # 30 s, three deadlines
        sim.cycle()
        sim.pods = {n: replace(p, ready=p.replica not in slow) for n, p in sim.pods.items()}
    progressing = condition(sim.status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "WaitingForReady")


def test_a_slow_group_outside_a_rollout_never_stops_a_scale_up() -> None:
    """The deadline is a rollout's: a group that takes long to load while the service only scales
    (no old revision) holds nothing back."""
    sim = ready_service(replicas=1, nodes=1, rollout={"progressDeadlineSeconds": 10})
    sim.spec = spec_of(replicas=2, nodesPerReplica=1, rollout={"progressDeadlineSeconds": 10})
    for _ in range(6):
        sim.cycle()
        sim.pods = {n: replace(p, ready=not n.startswith("llama-r1")) for n, p in sim.pods.items()}
    sim.spec = spec_of(replicas=3, nodesPerReplica=1, rollout={"progressDeadlineSeconds": 10})
    decision = sim.cycle()
    assert condition(decision.status, "Progressing")["status"] == "True"
    assert len([g for g in decision.status["groups"] if not g.get("retiring")]) == 3


def test_a_followed_checkpoint_waits_for_the_rollout_before_it() -> None:
    """Checkpoints written faster than a model loads: each newer step used to retire the half-loaded
    groups of the one before, so none was ever served. A newer step now waits while the rollout to
    the current one goes well; the service moves on as each rollout completes."""
    follow = from_job(True)
    sim = ready_service(replicas=2, nodes=1)
    step, served_steps = 100, set()
    born = {(p.name, p.revision, p.attempt): -100 for p in sim.pods.values()}
    for cycle in range(120):  # 5 s a cycle; a checkpoint every 10 s, a load takes 20 s
        if cycle % 2 == 0:
            step += 100
        hold = rollout_under_way(sim.status, sim.now, 600)
        resolution = resolve_model(follow, sim.status.get("model"), trainjob(step), hold_newer=hold)
        assert resolution.mount is not None
        sim.resolution, sim.revision = resolution, f"rev-{resolution.mount.step}"
        sim.cycle()
        for pod in sim.pods.values():
            born.setdefault((pod.name, pod.revision, pod.attempt), cycle)
        sim.pods = {
            n: replace(p, ready=not p.terminating and cycle - born[(p.name, p.revision, p.attempt)] >= 4)
            for n, p in sim.pods.items()
        }
        live = [g for g in sim.status["groups"] if not g.get("retiring")]
        if all(g["ready"] and g["revision"] == sim.revision for g in live) and len(live) == 2:
            served_steps.add(resolution.mount.step)
    assert len(served_steps) >= 5  # each rollout completed, then the newest step was taken up


def test_a_rollout_under_way_holds_a_newer_checkpoint_unless_it_stalls_or_fails() -> None:
    rolling = {"type": "Progressing", "status": "True", "reason": "RollingOut"}
    old = {"replica": 0, "revision": REV_A, "nodes": ["a"], "ready": True}
    new = {"replica": 1, "revision": REV_B, "nodes": ["b"], "admittedAt": timestamp(NOW - 30)}
    status: dict[str, Any] = {"revision": REV_B, "conditions": [rolling], "groups": [old, new]}
    assert rollout_under_way(status, NOW, 600)
    stalled = {**rolling, "status": "False", "reason": "ProgressDeadlineExceeded"}
    assert not rollout_under_way({**status, "conditions": [stalled]}, NOW, 600)
    # A group of the revision rolled to has failed: a newer checkpoint may be the fix.
    assert not rollout_under_way({**status, "groups": [old, {**new, "failures": 1}]}, NOW, 600)
    # No old group left: only a group of it still loading, within the deadline, holds.
    loading = {**status, "groups": [new]}
    assert rollout_under_way(loading, NOW, 600)
    assert not rollout_under_way(loading, NOW, 20)
    # Waiting for GPUs (no nodes), or once served, or ready: nothing is loading.
    assert not rollout_under_way({**status, "groups": [{**new, "nodes": []}]}, NOW, 600)
    lost = {**new, "unreadySince": timestamp(NOW - 700)}  # ready once, not for longer than the deadline
    assert not rollout_under_way({**status, "groups": [old, lost]}, NOW, 600)
    # Old groups left while the new one still waits for GPUs: nothing moves, nothing is held.
    assert not rollout_under_way({**status, "groups": [old, {**new, "nodes": []}]}, NOW, 600)
    assert not rollout_under_way({**status, "groups": [{**new, "ready": True}]}, NOW, 600)
    held = resolve_model(from_job(True), SERVED_500, trainjob(800), hold_newer=True)
    assert held.mount == AT_500
    assert "a newer checkpoint is rolled out once this rollout is over" in held.message
    # Without follow, nothing newer is taken anyway.
    assert resolve_model(from_job(False), SERVED_500, trainjob(800), hold_newer=False).mount == AT_500


def test_a_followed_checkpoint_is_not_held_by_a_scale_up_waiting_for_gpus() -> None:
    """A held step used to wait for any Progressing=True (ScalingUp included): a group queued for
    GPUs held every newer checkpoint for as long as the cluster was full."""
    sim = ready_service(replicas=1, nodes=1)
    sim.spec = spec_of(replicas=2, nodesPerReplica=1)
    sim.apply(sim.plan())  # the new group queues; the scheduler never admits it (no capacity)
    assert condition(sim.status, "Progressing")["reason"] == "ScalingUp"
    assert not rollout_under_way(sim.status, sim.now, 600)


def test_a_rollback_to_an_older_checkpoint_is_said_in_a_warning() -> None:
    sim = ready_service(replicas=1, nodes=1)
    back = resolve_model(from_job(True), SERVED_500, trainjob(300))
    sim.resolution, sim.revision = back, REV_B
    decision = sim.plan()
    assert [(e.type, e.reason) for e in decision.events if e.reason == back.reason] == [
        ("Warning", ServiceReason.OLDER_CHECKPOINT)
    ]


def test_a_new_group_that_served_then_blinked_does_not_trip_the_progress_deadline() -> None:
    """The deadline counts from the admission for a group never ready, and from its last readiness for
    one that was: a blink later is no stall (it stalled the rollout with a Warning), but a readiness
    lost for good is (a server that crash-loops under load stays Running: nothing restarts it)."""
    sim = ready_service(replicas=2, nodes=1, rollout={"progressDeadlineSeconds": 60, "minReadySeconds": 3600})
    sim.revision = REV_B
    for _ in range(4):  # the surge group is admitted and ready; minReadySeconds keeps the rollout going
        sim.cycle()
    new = [g for g in sim.status["groups"] if g["revision"] == REV_B]
    assert len(new) == 1
    assert new[0]["ready"]
    sim.now += 120  # past the deadline since its admission
    sim.pods = {n: replace(p, ready=p.revision != REV_B) for n, p in sim.pods.items()}
    decision = sim.cycle()
    assert condition(decision.status, "Progressing")["status"] == "True"
    assert not [e for e in decision.events if e.reason == "ProgressDeadlineExceeded"]
    for _ in range(15):  # 75 s more without readiness
        sim.pods = {n: replace(p, ready=p.revision != REV_B) for n, p in sim.pods.items()}
        sim.cycle()
    progressing = condition(sim.status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert not rollout_under_way(sim.status, sim.now, 60)


def test_an_unschedulable_pod_s_wait_counts_from_the_operator_s_first_sight() -> None:
    stuck = replace(
        ready_service(replicas=1).pods["llama-r0-node-1"],
        unschedulable_since=NOW - 120,
        node_name=None,
        uid="uid-1",
    )
    running = replace(stuck, name="llama-r0-node-0", unschedulable_since=None, uid="uid-0")
    seen_views, seen = unschedulable_as_seen([running, stuck], {}, NOW)
    assert seen == {"uid-1": NOW}  # first seen now, though the scheduler says 2 min ago
    assert [view.unschedulable_since for view in seen_views] == [None, NOW]
    later, seen = unschedulable_as_seen([running, stuck], seen, NOW + 10)
    assert later[1].unschedulable_since == NOW
    assert seen == {"uid-1": NOW}
    # A later transition than the first sight (the pod waits again) is kept as reported.
    again = replace(stuck, unschedulable_since=NOW + 20)
    assert unschedulable_as_seen([again], seen, NOW + 25)[0][0].unschedulable_since == NOW + 20
    # The next attempt's pod has the same name, not the same uid: its wait is its own.
    successor = replace(stuck, uid="uid-1-next")
    assert unschedulable_as_seen([successor], seen, NOW + 40)[0][0].unschedulable_since == NOW + 40
    # Bound: forgotten, so that a new wait is counted afresh.
    bound = replace(stuck, unschedulable_since=None)
    assert unschedulable_as_seen([bound], seen, NOW + 30) == ([bound], {})


def test_a_change_is_credited_to_the_autoscaler_s_note_once_and_only_soon_after_it() -> None:
    """An hour-old note whose number a later change (new bounds here) matches is not that change's
    reason: the record and the Scaled event repeated a load decision from long before."""
    low = {"minReplicas": 1, "maxReplicas": 2}
    sim = ready_service(replicas=2, nodes=1, autoscaling=low)
    sim.spec = spec_of(replicas=3, nodesPerReplica=1, autoscaling=low)  # served clamped at 2
    sim.settle(2)
    assert sim.status["desiredReplicas"] == 2
    spec = spec_of(replicas=3, nodesPerReplica=1, autoscaling={"minReplicas": 1, "maxReplicas": 6})
    note = {"to": 3, "reason": "load 6.0 / target 2 per replica = 3", "metricValue": 6.0}

    def record(written: float) -> dict[str, Any]:
        noted = {**note, "time": timestamp(written)}
        view = ServiceView(NAME, "ml", spec, 3, sim.status, REV_A, scaling_note=noted)
        pods = list(sim.pods.values())
        decision = plan(view, RESOLVED, pods, frozenset(), sim.now, selector=SELECTOR, url=URL)
        entry: dict[str, Any] = decision.status["scaling"][-1]
        assert (entry["from"], entry["to"]) == (2, 3)
        return entry

    old = record(sim.now - 3600)
    assert "metricValue" not in old
    assert "load 6.0" not in old["reason"]
    fresh = record(sim.now - 2)
    assert (fresh["reason"], fresh["metricValue"]) == (note["reason"], 6.0)


def test_a_scale_down_keeps_a_group_that_serves_though_not_yet_for_min_ready_seconds() -> None:
    """minReadySeconds made a group ready for 10 s count as not ready: scaled from 3 to 2, it was
    retired (the highest id among the "not ready") and the one still loading kept, and the service
    served from one group for as long as that one took to load."""
    spec = spec_of(
        replicas=2, nodesPerReplica=2, rollout={"maxSurge": 1, "maxUnavailable": 0, "minReadySeconds": 60}
    )
    groups = [
        admitted(0, ["a0", "a1"], formed=True, readySince=timestamp(NOW - 3600)),
        admitted(1, ["b0", "b1"], ready=False, formed=True),  # still loading
        admitted(2, ["c0", "c1"], formed=True, readySince=timestamp(NOW - 10)),  # serving for 10 s
    ]
    pods = [
        running(0, 0, "a0"),
        running(0, 1, "a1"),
        replace(running(1, 0, "b0"), ready=False),
        running(1, 1, "b1"),
        running(2, 0, "c0"),
        running(2, 1, "c1"),
    ]
    status = {"groups": groups, "desiredReplicas": 3, "revision": REV_A}
    view = ServiceView(NAME, "ml", spec, 2, status, REV_A)
    decision = plan(view, RESOLVED, pods, NONE, NOW, SELECTOR, URL)
    assert [g["replica"] for g in decision.status["groups"] if g.get("retiring")] == [1]
    assert decision.status["readyReplicas"] == 2


def test_an_old_group_that_fails_during_a_rollout_is_said_retired_not_restarted() -> None:
    """The rollout retires a failed group of the revision it replaces in the cycle it fails: it was told
    as restarted (a Warning) and retired (a Normal) at once, and never restarted."""
    groups = [
        admitted(0, ["a0", "a1"], formed=True, readySince=timestamp(NOW - 600)),
        admitted(1, ["b0", "b1"], formed=True, readySince=timestamp(NOW - 600)),
        admitted(2, ["c0", "c1"], revision=REV_B, ready=False, formed=True),
    ]
    pods = [
        running(0, 0, "a0"),
        replace(running(0, 1, "a1"), phase="Failed", ready=False),
        running(1, 0, "b0"),
        running(1, 1, "b1"),
        replace(running(2, 0, "c0", revision=REV_B), ready=False),
        running(2, 1, "c1", revision=REV_B),
    ]
    status = {"groups": groups, "desiredReplicas": 2, "revision": REV_B}
    view = ServiceView(NAME, "ml", spec_of(replicas=2, nodesPerReplica=2), 2, status, REV_B)
    decision = plan(view, RESOLVED, pods, NONE, NOW, SELECTOR, URL)
    assert group_of(decision.status, 0)["retiring"]
    told = [(e.type, e.reason, e.message) for e in decision.events if "replica 0" in e.message]
    assert told == [
        ("Normal", ServiceReason.GROUP_RETIRED, "replica 0 retired: member 1 (llama-r0-node-1) failed")
    ]


def test_an_old_group_missing_a_member_is_retired_and_said_so() -> None:
    """A group of an earlier spec whose member is gone is not rebuilt: it was retired without a word."""
    groups = [
        {**admitted(0, ["gpu-a", "gpu-b"]), "formed": True},
        admitted(1, ["gpu-c", "gpu-d"], revision=REV_B),
    ]
    pods = [
        running(0, 0, "gpu-a"),
        running(1, 0, "gpu-c", revision=REV_B),
        running(1, 1, "gpu-d", revision=REV_B),
    ]
    status = {"groups": groups, "desiredReplicas": 2, "revision": REV_B}
    view = ServiceView(NAME, "ml", spec_of(replicas=2, nodesPerReplica=2), 1, status, REV_B)
    decision = plan(view, RESOLVED, pods, NONE, NOW, SELECTOR, URL)
    assert group_of(decision.status, 0)["retiring"]
    assert decision.delete == ["llama-r0-node-0"]
    retired = [e.message for e in decision.events if e.reason == ServiceReason.GROUP_RETIRED]
    assert retired == [
        "replica 0 retired: llama-r0-node-1 is gone and a group of an earlier spec is not rebuilt"
    ]
