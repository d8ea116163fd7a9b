"""TrainJob end to end on the local cluster: the operator as a process, real API server, scheduler,
controller-manager and kwok GPU nodes. Pods finish on cue through largo's kwok stage (an annotation)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from largo.dev.cluster import KWOK_NODE_ANNOTATION, LocalCluster, NodePool, wait_for
from prometheus_client.parser import text_string_to_metric_families
from trainjobs import GROUP, PLURAL, TIMEOUT, VERSION, Jobs, bound_claim, overbooked, refuse_pods

pytestmark = pytest.mark.integration


@pytest.fixture
def jobs(api: client.ApiClient, namespace: str, operator: Any) -> Jobs:
    return Jobs(api, namespace, operator)


def _env(pod: Any) -> dict[str, str]:
    return {item.name: item.value for item in pod.spec.containers[0].env or []}


def test_two_node_job_is_wired_runs_and_succeeds(
    jobs: Jobs, gpu_pool: NodePool, cluster: LocalCluster, tmp_path: Path
) -> None:
    jobs.create("llm", gpu_pool, env=[{"name": "NCCL_DEBUG", "value": "INFO"}])
    status = jobs.wait_phase("llm", "Running")
    assert status["nodes"] == "2/2"
    assert status["gpus"] == 16
    # `kubectl get largo` lists largo's kinds by category, each with its printer columns. A fresh discovery
    # cache: kubectl keeps one per server, possibly from before the CRD existed.
    table = cluster.kubectl(
        "--cache-dir", str(tmp_path), "get", "largo", "-n", jobs.namespace
    ).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "NODES", "GPUS", "RESTARTS", "PROGRESS", "AGE"]
    # The category spans TrainJobs and InferenceServices: kubectl names each row's kind.
    assert table[1].split()[:5] == ["trainjob.largo.dev/llm", "Running", "2/2", "16", "0"]
    assert sorted(status["placement"]["nodes"]) == sorted(gpu_pool.node_names())

    pods = jobs.pods("llm")
    assert [pod.metadata.name for pod in pods] == ["llm-node-0", "llm-node-1"]
    assert sorted(pod.spec.node_name for pod in pods) == sorted(gpu_pool.node_names())
    master = f"llm-node-0.llm.{jobs.namespace}.svc"
    for rank, pod in enumerate(pods):
        env = _env(pod)
        assert pod.spec.hostname == f"llm-node-{rank}"
        assert pod.spec.subdomain == "llm"
        assert env["PET_NNODES"] == "2"
        assert env["PET_NPROC_PER_NODE"] == "8"
        assert env["PET_NODE_RANK"] == str(rank)
        assert env["PET_MASTER_ADDR"] == master
        assert env["PET_MASTER_PORT"] == "29500"
        assert env["LARGO_BACKEND"] == "nccl"
        assert env["NCCL_DEBUG"] == "INFO"  # a user's value wins over largo's default
        assert "WORLD_SIZE" not in env
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "8"
        assert pod.metadata.owner_references[0].kind == "TrainJob"
    service = jobs.core.read_namespaced_service("llm", jobs.namespace)
    assert service.spec.cluster_ip == "None"
    assert service.spec.publish_not_ready_addresses is True

    jobs.exit("llm", 0)
    status = jobs.wait_phase("llm", "Succeeded")
    assert status["completionTime"]
    assert jobs.condition("llm", "Complete")["status"] == "True"
    reasons = jobs.wait_event("llm", "Succeeded")
    for expected in ("Admitted", "PodsRunning"):
        assert expected in reasons


def test_second_gang_waits_with_a_reason_and_runs_when_capacity_frees(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("first", gpu_pool, gpus=6)
    jobs.wait_phase("first", "Running")
    jobs.create("second", gpu_pool, gpus=6)
    status = jobs.wait("second", lambda s: bool(s.get("queue")), "queue status")
    jobs.wait_event("second", "Queued")
    assert status["phase"] == "Queued"
    assert status["queue"]["reason"] == "InsufficientCapacity"
    assert status["queue"]["position"] == 1
    assert "nvidia.com/gpu" in status["queue"]["message"]
    assert jobs.condition("second", "Admitted")["reason"] == "InsufficientCapacity"
    assert jobs.pods("second") == []

    jobs.exit("first", 0)
    jobs.wait_phase("first", "Succeeded")
    jobs.wait_phase("second", "Running")
    assert "queue" not in jobs.status("second")


def test_two_jobs_never_write_one_checkpoint_directory_at_once(jobs: Jobs, gpu_pool: NodePool) -> None:
    volume = bound_claim(jobs.core, jobs.namespace, "ckpt", "ReadWriteMany", hostPath={"path": "/ckpt"})
    try:
        shared = {"claimName": "ckpt"}
        jobs.create("sweep-1", gpu_pool, num_nodes=1, gpus=2, checkpoint=shared)
        jobs.wait_phase("sweep-1", "Running")
        jobs.create("sweep-2", gpu_pool, num_nodes=1, gpus=2, checkpoint=shared)
        jobs.create("own-dir", gpu_pool, num_nodes=1, gpus=2, checkpoint={**shared, "subPath": "own"})
        # There is room for both: the one with a directory of its own runs, the other waits for sweep-1.
        jobs.wait_phase("own-dir", "Running")
        assert jobs.status("own-dir")["checkpointDirectory"] == "ckpt/own"
        assert jobs.status("sweep-1")["checkpointDirectory"] == "ckpt"
        status = jobs.wait(
            "sweep-2", lambda s: (s.get("queue") or {}).get("reason") == "CheckpointInUse", "to wait"
        )
        assert status["phase"] == "Queued"
        assert f"(claim ckpt) is in use by {jobs.namespace}/sweep-1" in status["queue"]["message"]
        assert jobs.condition("sweep-2", "Admitted")["reason"] == "CheckpointInUse"
        jobs.wait_event("sweep-2", "CheckpointInUse")
        assert jobs.pods("sweep-2") == []

        jobs.exit("sweep-1", 0)
        jobs.wait_phase("sweep-1", "Succeeded")
        jobs.wait_phase("sweep-2", "Running")
    finally:
        jobs.core.delete_persistent_volume(volume)


def test_higher_priority_job_queued_later_is_admitted_first(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("busy", gpu_pool)
    jobs.wait_phase("busy", "Running")
    jobs.create("low", gpu_pool)
    jobs.wait("low", lambda s: bool(s.get("queue")), "queued")
    jobs.create("high", gpu_pool, scheduling={"priority": 100})
    jobs.wait("high", lambda s: s.get("queue", {}).get("position") == 1, "first in the queue")
    jobs.wait("low", lambda s: s.get("queue", {}).get("position") == 2, "second in the queue")

    jobs.exit("busy", 0)
    jobs.wait_phase("high", "Running")
    assert jobs.status("low")["phase"] == "Queued"
    assert jobs.pods("low") == []


def test_a_gang_that_can_never_fit_says_so(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("huge", gpu_pool, num_nodes=3)
    status = jobs.wait(
        "huge",
        lambda s: s.get("queue", {}).get("reason") == "Unschedulable",
        "Unschedulable",
    )
    assert "room for 2 of 3 pods" in status["queue"]["message"]
    assert "position" not in status["queue"]  # it has no place in the order: it blocks nobody
    jobs.wait_event("huge", "Unschedulable")
    # It blocks nobody: a job that fits runs.
    jobs.create("small", gpu_pool, num_nodes=1)
    jobs.wait_phase("small", "Running")


def test_failed_pod_restarts_the_whole_gang_until_the_backoff_limit(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("flaky", gpu_pool, failurePolicy={"backoffLimit": 1})
    jobs.wait_phase("flaky", "Running")
    first = {pod.metadata.uid for pod in jobs.pods("flaky")}
    jobs.exit("flaky", 1, rank=1)
    status = jobs.wait(
        "flaky",
        lambda s: s.get("restarts") == 1 and s.get("phase") == "Running",
        "restarted",
    )
    second = jobs.pods("flaky")
    assert {pod.metadata.uid for pod in second}.isdisjoint(first)
    assert [pod.metadata.labels["largo.dev/attempt"] for pod in second] == ["1", "1"]
    assert status["attempt"] == 1

    jobs.exit("flaky", 1, rank=0)
    jobs.wait_phase("flaky", "Failed")
    failed = jobs.condition("flaky", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "exit code 1" in failed["message"]
    wait_for(
        lambda: (
            not jobs.live_pods("flaky")
            or all(p.status.phase in ("Succeeded", "Failed") for p in jobs.live_pods("flaky"))
        ),
        TIMEOUT,
        "gang stopped",
    )


def test_permanent_exit_code_fails_at_once(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create(
        "bad-config",
        gpu_pool,
        failurePolicy={"backoffLimit": 5, "permanentExitCodes": [42]},
    )
    jobs.wait_phase("bad-config", "Running")
    jobs.exit("bad-config", 42, rank=0)
    status = jobs.wait_phase("bad-config", "Failed")
    assert status["restarts"] == 0
    assert jobs.condition("bad-config", "Failed")["reason"] == "PermanentExitCode"


def test_lost_node_restarts_the_gang_on_other_nodes(
    jobs: Jobs, make_pool: Callable[..., NodePool], cluster: LocalCluster
) -> None:
    pool = make_pool(count=3)
    jobs.create("survivor", pool)
    status = jobs.wait_phase("survivor", "Running")
    lost = status["placement"]["nodes"][1]
    client.CoreV1Api(jobs.core.api_client).delete_node(lost)
    status = jobs.wait(
        "survivor",
        lambda s: s.get("restarts") == 1 and s.get("phase") == "Running",
        "running again",
    )
    assert lost not in status["placement"]["nodes"]
    jobs.wait_event("survivor", "NodeLost", "PodDeleted")


def test_a_node_not_ready_restarts_the_gang_after_its_grace(
    jobs: Jobs, make_pool: Callable[..., NodePool], cluster: LocalCluster
) -> None:
    """A node whose kubelet stops reporting: the gang is told (NodeNotReady) and keeps its pods for
    LARGO_NODE_LOST_SECONDS (3 s here), then restarts on other nodes, its pods there removed."""
    pool = make_pool(count=3)
    jobs.create("patient", pool)
    status = jobs.wait_phase("patient", "Running")
    down = status["placement"]["nodes"][1]
    nodes = client.CoreV1Api(jobs.core.api_client)
    # kwok would make it Ready again: it stops managing the node, as a kubelet that stopped.
    nodes.patch_node(down, {"metadata": {"annotations": {KWOK_NODE_ANNOTATION: None}}})
    since = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    ready = {"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "kubelet stopped"}
    stamp = since.strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {**ready, "lastTransitionTime": stamp, "lastHeartbeatTime": stamp}
    nodes.patch_node_status(down, {"status": {"conditions": [condition]}})
    try:
        jobs.wait_event("patient", "NodeNotReady")
        status = jobs.wait(
            "patient",
            lambda s: s.get("restarts") == 1 and s.get("phase") == "Running",
            "running again",
        )
        assert down not in status["placement"]["nodes"]
        jobs.wait_event("patient", "NodeLost")
        # Not before the grace: the restart came at least 3 s after the node stopped being Ready.
        events = jobs.core.list_namespaced_event(
            jobs.namespace, field_selector="involvedObject.name=patient,reason=NodeLost"
        ).items
        assert events
        assert all(event.first_timestamp >= since + datetime.timedelta(seconds=3) for event in events)
    finally:
        nodes.delete_node(down)


def test_suspend_releases_gpus_and_resume_requeues(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("pausable", gpu_pool)
    jobs.wait_phase("pausable", "Running")
    jobs.patch_spec("pausable", {"suspend": True})
    jobs.wait_phase("pausable", "Suspended")
    wait_for(lambda: not jobs.pods("pausable"), TIMEOUT, "pods deleted")
    # The released GPUs are really free: another full-size gang is admitted.
    jobs.create("meanwhile", gpu_pool)
    jobs.wait_phase("meanwhile", "Running")
    jobs.exit("meanwhile", 0)
    jobs.wait_phase("meanwhile", "Succeeded")
    jobs.patch_spec("pausable", {"suspend": False})
    jobs.wait_phase("pausable", "Running")
    assert jobs.condition("pausable", "Suspended")["status"] == "False"


def test_active_deadline_fails_the_job(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("slow", gpu_pool, activeDeadlineSeconds=2)
    jobs.wait_phase("slow", "Failed")
    assert jobs.condition("slow", "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: not jobs.live_pods("slow"), TIMEOUT, "pods deleted")


def test_ttl_deletes_a_finished_job(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("short-lived", gpu_pool, ttlSecondsAfterFinished=1)
    jobs.wait_phase("short-lived", "Running")
    jobs.exit("short-lived", 0)

    def gone() -> bool:
        try:
            jobs.get("short-lived")
        except ApiException as error:
            return error.status == 404
        return False

    wait_for(gone, TIMEOUT, "TrainJob deleted by TTL", jobs.operator.assert_alive)


def test_deleting_a_job_removes_everything_it_created(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("doomed", gpu_pool)
    jobs.wait_phase("doomed", "Running")
    jobs.custom.delete_namespaced_custom_object(GROUP, VERSION, jobs.namespace, PLURAL, "doomed")
    wait_for(lambda: not jobs.pods("doomed"), TIMEOUT, "pods collected")

    def service_gone() -> bool:
        try:
            jobs.core.read_namespaced_service("doomed", jobs.namespace)
        except ApiException as error:
            return error.status == 404
        return False

    wait_for(service_gone, TIMEOUT, "service collected")


INVALID = [
    ({"numNodes": 0}, "numNodes"),
    ({"resourcesPerNode": {"nvidia.com/gpu": "0.5"}}, "nvidia.com/gpu"),
    ({"backend": "mpi"}, "backend"),
    ({"procsPerNode": "many"}, "procsPerNode"),
    ({"env": [{"name": "WORLD_SIZE", "value": "4"}]}, "reserved"),
    ({"env": [{"name": "PET_NNODES", "value": "4"}]}, "reserved"),
    (
        {"failurePolicy": {"permanentExitCodes": [3], "retryableExitCodes": [3]}},
        "ExitCodes",
    ),
    ({"procsPerNode": 2, "parallelism": {"tensor": 4}}, "tensor x pipeline must divide"),
    ({"resourcesPerNode": {"nvidia.com/gpu": "2"}, "parallelism": {"pipeline": 3}}, "tensor x pipeline"),
    ({"parallelism": {"tensor": 0}}, "parallelism.tensor"),
    ({"resourcesPerNode": {"memory": "-1Gi"}}, "spec.resourcesPerNode.memory"),
    ({"checkpoint": {"claimName": "c", "subPath": "runs/../../other-team"}}, "must not contain '..'"),
    ({"podTemplate": {"labels": {"largo.dev/exclusive-node": "true"}}}, "largo's own keys"),
    ({"podTemplate": {"annotations": {"largo.dev/placement-node": "n0"}}}, "largo's own keys"),
]


@pytest.mark.parametrize(("spec", "needle"), INVALID, ids=[needle for _, needle in INVALID])
def test_invalid_spec_is_refused_by_the_api_server(
    api: client.ApiClient, namespace: str, crds: None, spec: dict[str, Any], needle: str
) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": f"bad-{uuid.uuid4().hex[:6]}"},
        "spec": {"image": "trainer:test", "numNodes": 1, **spec},
    }
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    assert refused.value.status == 422
    assert needle in refused.value.body


def test_a_parallelism_that_divides_the_processes_is_accepted_and_a_refusal_names_the_field(
    api: client.ApiClient, namespace: str, crds: None
) -> None:
    objects = client.CustomObjectsApi(api)

    def body(name: str, parallelism: dict[str, int]) -> dict[str, Any]:
        spec = {"image": "trainer:test", "numNodes": 2, "resourcesPerNode": {"nvidia.com/gpu": 4}}
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainJob",
            "metadata": {"name": name},
            "spec": {**spec, "parallelism": parallelism},
        }

    # 'auto' processes per node: one per GPU, 8 in all.
    created = objects.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body("split", {"tensor": 4, "pipeline": 2})
    )
    assert created["spec"]["parallelism"] == {"tensor": 4, "pipeline": 2}
    with pytest.raises(ApiException) as refused:
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body("odd", {"tensor": 3}))
    causes = json.loads(refused.value.body)["details"]["causes"]
    assert [cause["field"] for cause in causes] == ["spec.parallelism"]
    with pytest.raises(ApiException) as changed:
        objects.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "split",
            {"spec": {"parallelism": {"tensor": 2, "pipeline": 2}}},
        )
    assert "spec.parallelism is immutable" in changed.value.body


def test_name_too_long_for_dns_is_refused(api: client.ApiClient, namespace: str, crds: None) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": "x" * 51},
        "spec": {"image": "trainer:test", "numNodes": 1},
    }
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    assert refused.value.status == 422
    causes = json.loads(refused.value.body)["details"]["causes"]
    assert [cause["field"] for cause in causes] == ["metadata.name"]  # the field, not <nil>
    assert "at most 50 characters" in causes[0]["message"]


def test_immutable_fields_cannot_change(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("fixed", gpu_pool, num_nodes=1)
    with pytest.raises(ApiException) as refused:
        jobs.patch_spec("fixed", {"numNodes": 2})
    assert refused.value.status == 422
    assert "numNodes" in refused.value.body
    with pytest.raises(ApiException) as refused_image:
        jobs.patch_spec("fixed", {"image": "other:tag"})
    assert "image" in refused_image.value.body


def test_operator_killed_while_admitting_never_overbooks_a_node(
    jobs: Jobs, make_pool: Callable[..., NodePool]
) -> None:
    pool = make_pool(count=4)  # 32 GPUs: eight 4-GPU jobs at a time
    names = [f"burst-{index}" for index in range(20)]
    for name in names:
        jobs.create(name, pool, num_nodes=1, gpus=4)
    wait_for(
        lambda: (
            any(jobs.status(name).get("phase") == "Starting" for name in names)
            or any(jobs.status(name).get("phase") == "Running" for name in names)
        ),
        TIMEOUT,
        "admissions under way",
    )
    jobs.operator.kill()
    jobs.operator.start()

    finished: set[str] = set()
    samples: list[dict[str, int]] = []

    def progress() -> bool:
        samples.append(overbooked(jobs, names, gpus_per_job=4, gpus_per_node=8))
        for name in names:
            if name in finished:
                continue
            status = jobs.status(name)
            if status.get("phase") == "Succeeded":
                finished.add(name)
            elif status.get("phase") == "Running":
                jobs.exit(name, 0)
        return len(finished) == len(names)

    wait_for(progress, 240, "all 20 jobs Succeeded", jobs.operator.assert_alive)
    assert len(samples) > 1
    assert [sample for sample in samples if sample] == []
    for name in names:
        status = jobs.status(name)
        # Admitted once: no second attempt, no restart.
        assert (status["restarts"], status["attempt"]) == (0, 0), (name, status)


def test_a_refused_pod_create_is_told_and_the_job_runs_once_allowed(
    jobs: Jobs, gpu_pool: NodePool, cluster: LocalCluster
) -> None:
    refuse_pods(jobs.core, jobs.namespace)
    jobs.create("refused", gpu_pool)
    status = jobs.wait(
        "refused",
        lambda s: s.get("reason") == "CreateRefused" and "exceeded quota" in (s.get("message") or ""),
        "a CreateRefused reason carrying the quota's message",
    )
    assert jobs.condition("refused", "PodsCreated")["status"] == "False"
    assert status["phase"] in ("Starting", "Queued")
    jobs.wait_event("refused", "CreateRefused")
    warnings = [message for reason, message in jobs.events("refused") if reason == "CreateRefused"]
    assert any("exceeded quota: no-pods" in message for message in warnings)
    wide = cluster.kubectl("get", "tj", "refused", "-n", jobs.namespace, "-o", "wide").stdout
    assert "REASON" in wide.splitlines()[0]
    assert "CreateRefused" in wide
    assert "exceeded quota" in cluster.kubectl("describe", "tj", "refused", "-n", jobs.namespace).stdout

    # The refusal lasts the binding timeout (10 s here): the gang's GPUs are given back.
    # Each release in a row waits out a backoff (1 s, then 2 s here) before its next admission.
    jobs.wait(
        "refused",
        lambda s: (
            int(s.get("attempt") or 0) >= 1 and s.get("restarts") == 0 and int(s.get("releases") or 0) >= 1
        ),
        "the gang released without counting a restart",
    )
    assert any(
        "gang released and queued again (release 1 in a row: admitted again no sooner than in 1s)" in message
        for _, message in jobs.events("refused")
    )

    jobs.core.delete_namespaced_resource_quota("no-pods", jobs.namespace)
    jobs.wait_phase("refused", "Running")
    # The refusal is gone: PodsCreated turned True within an attempt that was refused, or the released
    # attempt's condition went with it and the next one was never refused (the quota's deletion was seen
    # before its first create).
    created = [c for c in jobs.status("refused").get("conditions") or [] if c["type"] == "PodsCreated"]
    assert [c["status"] for c in created] in ([], ["True"])
    assert len(jobs.live_pods("refused")) == 2
    ran = jobs.status("refused")
    assert "releases" not in ran  # it ran: a later release starts from the shortest backoff
    assert "nextAdmissionTime" not in ran


def test_a_foreign_object_with_the_job_s_child_name_is_a_name_conflict(
    jobs: Jobs, gpu_pool: NodePool
) -> None:
    foreign = {
        "metadata": {"name": "clash"},
        "spec": {"clusterIP": "None", "selector": {"app": "not-largo"}, "ports": [{"port": 80}]},
    }
    jobs.core.create_namespaced_service(jobs.namespace, foreign)
    jobs.create("clash", gpu_pool)
    jobs.wait(
        "clash",
        lambda s: (
            s.get("reason") == "NameConflict" and "Service clash already exists" in (s.get("message") or "")
        ),
        "a NameConflict reason",
    )
    jobs.wait_event("clash", "NameConflict")
    assert jobs.live_pods("clash") == []  # no pod is started without its own Service
    jobs.core.delete_namespaced_service("clash", jobs.namespace)
    jobs.wait_phase("clash", "Running")
    service = jobs.core.read_namespaced_service("clash", jobs.namespace)
    assert service.metadata.owner_references[0].kind == "TrainJob"


# kwok keeps a deleted pod for this long, as a kubelet does a container that takes its whole grace period.
SLOW_TERMINATION = {
    "terminationGracePeriodSeconds": 15,
    "annotations": {"pod-delete.stage.kwok.x-k8s.io/delay": "15s"},
}


class AttemptWatch:
    """Samples the job's pods and status until stopped, and remembers what it must never see."""

    def __init__(self, jobs: Jobs, name: str) -> None:
        self.jobs, self.name = jobs, name
        self.mixed: list[list[str]] = []
        self.suspended_with_pods: list[list[str]] = []

    def sample(self) -> None:
        pods = self.jobs.pods(self.name)
        attempts = {pod.metadata.labels["largo.dev/attempt"] for pod in pods}
        shown = [f"{pod.metadata.name}@{pod.metadata.labels['largo.dev/attempt']}" for pod in pods]
        if len(attempts) > 1:
            self.mixed.append(shown)
        if pods and self.jobs.status(self.name).get("phase") == "Suspended":
            self.suspended_with_pods.append(shown)

    def new_attempt_waits_for_the_old_pods(self) -> dict[str, Any]:
        def waiting_or_created() -> bool:
            status = self.jobs.status(self.name)
            return (
                status.get("reason") == "PreviousAttemptTerminating"
                or len(self.jobs.live_pods(self.name)) == 2
            )

        wait_for(waiting_or_created, TIMEOUT, "the new attempt waiting for the old pods")
        status = self.jobs.status(self.name)
        self.sample()
        assert status.get("reason") == "PreviousAttemptTerminating", status
        return status

    def new_gang_is_created_whole(self) -> None:
        def whole_new_gang() -> bool:
            self.sample()
            pods = self.jobs.live_pods(self.name)
            return len(pods) == 2 and all(p.metadata.labels["largo.dev/attempt"] != "0" for p in pods)

        wait_for(whole_new_gang, TIMEOUT, "the new attempt's gang", self.jobs.operator.assert_alive)
        assert self.mixed == []  # never a rank of the new attempt beside one of the old


def test_resume_while_the_old_pods_terminate_starts_the_new_gang_whole(jobs: Jobs, make_pool: Any) -> None:
    pool = make_pool(count=3)
    jobs.create("resume", pool, podTemplate=dict(SLOW_TERMINATION))
    jobs.wait_phase("resume", "Running")
    watch = AttemptWatch(jobs, "resume")
    jobs.patch_spec("resume", {"suspend": True})
    status = jobs.wait(
        "resume", lambda s: s.get("phase") == "Suspending", "Suspending while the pods terminate"
    )
    assert "to terminate" in status["message"]
    watch.sample()
    jobs.patch_spec("resume", {"suspend": False})  # resumed before the old pods are gone
    watch.new_gang_is_created_whole()
    assert watch.suspended_with_pods == []
    jobs.wait_phase("resume", "Running")


def test_a_released_gang_is_recreated_whole_after_its_terminating_pod(jobs: Jobs, make_pool: Any) -> None:
    # One pod may exist: one rank is created and runs, the other is refused until the gang is released.
    quota = {"metadata": {"name": "one-pod"}, "spec": {"hard": {"pods": "1"}}}
    jobs.core.create_namespaced_resource_quota(jobs.namespace, quota)
    wait_for(
        lambda: bool(jobs.core.read_namespaced_resource_quota("one-pod", jobs.namespace).status.hard),
        TIMEOUT,
        "the quota observed",
    )
    pool = make_pool(count=3)
    jobs.create("release", pool, podTemplate=dict(SLOW_TERMINATION))
    watch = AttemptWatch(jobs, "release")
    jobs.wait("release", lambda s: int(s.get("attempt") or 0) >= 1, "the gang released")
    jobs.core.delete_namespaced_resource_quota("one-pod", jobs.namespace)
    # A third node is free: the new attempt is admitted at once, while the old rank still terminates.
    watch.new_attempt_waits_for_the_old_pods()
    watch.new_gang_is_created_whole()
    jobs.wait_phase("release", "Running")


def test_a_gang_released_after_a_binding_failure_is_recreated_whole(jobs: Jobs, make_pool: Any) -> None:
    """A real binding failure: the checkpoint volume can only be mounted on the pool's first node, which
    largo's admission does not know and kube-scheduler does. The rank placed there binds and runs; the
    other stays unschedulable, so after the binding timeout the gang is released while that rank takes
    its long grace period to terminate."""
    pool = make_pool(count=3)
    here = pool.node_names()[0]
    jobs.core.patch_node(here, {"metadata": {"labels": {"largo.dev/test-volume": jobs.namespace}}})
    only_here = {"key": "largo.dev/test-volume", "operator": "In", "values": [jobs.namespace]}
    volume = bound_claim(
        jobs.core, jobs.namespace, "pinned", "ReadWriteMany",
        local={"path": "/checkpoints"},
        nodeAffinity={"required": {"nodeSelectorTerms": [{"matchExpressions": [only_here]}]}},
    )  # fmt: skip
    try:
        jobs.create("bind", pool, checkpoint={"claimName": "pinned"}, podTemplate=dict(SLOW_TERMINATION))
        watch = AttemptWatch(jobs, "bind")
        admitted = jobs.wait("bind", lambda s: bool(s.get("placement")), "the first admission")
        assert here in admitted["placement"]["nodes"], admitted["placement"]  # packing fills by name
        jobs.wait_event("bind", "BindingFailed")
        status = watch.new_attempt_waits_for_the_old_pods()
        assert status["restarts"] == 0  # a binding failure is not the job's fault
        watch.new_gang_is_created_whole()
    finally:
        jobs.custom.delete_namespaced_custom_object(GROUP, VERSION, jobs.namespace, PLURAL, "bind")
        jobs.core.delete_persistent_volume(volume)


def test_an_edit_while_running_takes_effect_at_the_next_attempt(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("edited", gpu_pool, args=["--lr", "0.1"])
    jobs.wait_phase("edited", "Running")
    before = {pod.metadata.name: pod.metadata.uid for pod in jobs.live_pods("edited")}
    old_hash = {pod.metadata.annotations["largo.dev/spec-hash"] for pod in jobs.live_pods("edited")}
    jobs.patch_spec("edited", {"args": ["--lr", "0.05"]})
    status = jobs.wait("edited", lambda s: s.get("reason") == "SpecChanged", "the edit shown as pending")
    assert "takes effect at the next attempt" in status["message"]
    assert status["phase"] == "Running"
    assert {pod.metadata.name: pod.metadata.uid for pod in jobs.live_pods("edited")} == before

    jobs.exit("edited", 1, rank=1)  # a failure: the gang restarts, now with the edited spec
    jobs.wait(
        "edited",
        lambda s: s.get("phase") == "Running" and s.get("attempt") == 1,
        "the restarted gang Running",
    )
    pods = jobs.live_pods("edited")
    assert [pod.spec.containers[0].args for pod in pods] == [["--lr", "0.05"]] * 2
    hashes = {pod.metadata.annotations["largo.dev/spec-hash"] for pod in pods}
    assert len(hashes) == 1
    assert hashes != old_hash
    assert jobs.condition("edited", "PodsUpToDate")["status"] == "True"


def test_exclusive_nodes_give_each_pod_a_node_of_its_own(jobs: Jobs, gpu_pool: NodePool) -> None:
    jobs.create("alone", gpu_pool, num_nodes=2, gpus=4, scheduling={"exclusiveNodes": True})
    jobs.wait_phase("alone", "Running")
    nodes = [pod.spec.node_name for pod in jobs.live_pods("alone")]
    assert len(set(nodes)) == 2, nodes  # packing would have put both 4-GPU pods on one 8-GPU node
    # Four GPUs are free on each node, yet nothing is placed beside an exclusive pod.
    jobs.create("beside", gpu_pool, num_nodes=1, gpus=2)
    status = jobs.wait("beside", lambda s: s.get("phase") == "Queued" and bool(s.get("queue")), "queued")
    assert status["queue"]["reason"] == "InsufficientCapacity"
    jobs.exit("alone", 0)
    jobs.wait_phase("alone", "Succeeded")
    jobs.wait_phase("beside", "Running")


def test_kubectl_explain_shows_ranges_defaults_and_immutability(cluster: LocalCluster, crds: None) -> None:
    def explain() -> str:
        return cluster.kubectl("explain", "trainjobs.spec.numNodes", check=False).stdout

    # The API server publishes a new CRD's OpenAPI a moment after it is Established.
    wait_for(lambda: "numNodes" in explain(), TIMEOUT, "the TrainJob schema in the OpenAPI document")
    explained = explain()
    assert "1..1024" in explained
    assert "immutable" in explained


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_operator_s_metrics_follow_a_gang_s_gpus(jobs: Jobs, gpu_pool: NodePool) -> None:
    def held_by_largo() -> float:
        series = _scrape(jobs.operator.metrics_url)
        return sum(
            value
            for (name, labels), value in series.items()
            if name == "largo_node_gpus_allocated"
            and dict(labels)["owner"] == "largo"
            and dict(labels)["node"].startswith(gpu_pool.name_prefix)
        )

    jobs.create("metered", gpu_pool, num_nodes=2, gpus=8)
    jobs.wait_phase("metered", "Running")
    wait_for(lambda: held_by_largo() == 16, TIMEOUT, "16 GPUs held by largo on the pool")
    series = _scrape(jobs.operator.metrics_url)
    assert series[("largo_leader", ())] == 1
    assert series[("largo_trainjobs", (("phase", "Running"),))] >= 1
    assert series[("largo_events_total", (("reason", "Admitted"), ("type", "Normal")))] >= 1
    assert series[("largo_reconcile_duration_seconds_count", ())] > 0
    assert series[("largo_scheduler_pass_duration_seconds_count", ())] > 0
    assert series[("largo_queue_wait_seconds_count", ())] >= 1
    assert series[("largo_gang_start_seconds_count", ())] >= 1  # this gang went Starting -> Running
    assert series[("largo_workqueue_wait_seconds_count", ())] > 0

    def inactive_restarts() -> float:
        return sum(
            value
            for (name, labels), value in _scrape(jobs.operator.metrics_url).items()
            if name == "largo_operator_watch_restarts_total" and dict(labels)["reason"] == "inactive"
        )

    # Some watched kind sees no event for the 30 s the test operator allows: kopf reconnects, largo counts.
    wait_for(lambda: inactive_restarts() >= 1, TIMEOUT, "a watch-stream reconnected for inactivity")
    jobs.exit("metered", 0)
    jobs.wait_phase("metered", "Succeeded")
    wait_for(lambda: held_by_largo() == 0, TIMEOUT, "the GPUs given back")


def test_largo_top_shows_the_cluster_as_it_is(jobs: Jobs, gpu_pool: NodePool, cluster: LocalCluster) -> None:
    jobs.create("watched", gpu_pool, num_nodes=2, gpus=8)
    jobs.wait_phase("watched", "Running")
    top = subprocess.run(
        [sys.executable, "-m", "largo", "top"],  # not a terminal: plain output, once
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = top.stdout.splitlines()
    for node in gpu_pool.node_names():
        row = next(line for line in lines if line.startswith(node))
        assert "[########]" in row  # both nodes held whole by the gang
        assert row.split()[-3:] == ["8", "0", "0"]
    row = next(line for line in lines if line.startswith(f"{jobs.namespace}/watched"))
    assert row.split()[1:3] == ["Running", "2/2"]


def test_an_rdma_adapter_is_counted_like_gpus(jobs: Jobs, make_pool: Any) -> None:
    """Network hardware a gang needs (here one RDMA adapter per node) is admitted exactly like GPUs."""
    pool = make_pool(count=2, extended={"rdma/hca": "1"})
    rdma = {"nvidia.com/gpu": 4, "rdma/hca": 1, "cpu": "1", "memory": "1Gi"}
    jobs.create("first", pool, num_nodes=1, resourcesPerNode=rdma)
    jobs.wait_phase("first", "Running")
    jobs.create("second", pool, num_nodes=1, resourcesPerNode=rdma)
    jobs.wait_phase("second", "Running")
    # GPU packing alone would have put both 4-GPU pods on one node: the adapter forbids it.
    nodes = {jobs.live_pods(name)[0].spec.node_name for name in ("first", "second")}
    assert len(nodes) == 2
    jobs.create("third", pool, num_nodes=1, resourcesPerNode={**rdma, "nvidia.com/gpu": 1})
    status = jobs.wait("third", lambda s: bool(s.get("queue")), "queued")
    assert status["queue"]["reason"] == "InsufficientCapacity"
    assert "rdma/hca" in status["queue"]["message"]  # 8 GPUs are free, the adapters are not
