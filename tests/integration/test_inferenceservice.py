"""InferenceService on the local cluster: the operator as a process, a real API server, kube-scheduler and
kwok GPU nodes. Replica groups go through the same gang scheduler as TrainJobs; pods fail on cue through
largo's kwok stage (an annotation)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from largo.dev.cluster import LocalCluster, NodePool, wait_for
from trainjobs import EXIT_ANNOTATION, TIMEOUT, Jobs, bound_claim, refuse_pods

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "largo.dev", "v1alpha1", "inferenceservices"
LABEL = "largo.dev/inferenceservice"


class Services:
    """Small verbs over the InferenceService API for one test namespace."""

    def __init__(self, api: client.ApiClient, namespace: str, operator: Any) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.operator = operator

    def claim(self, name: str) -> None:
        bound_claim(self.core, self.namespace, name, "ReadOnlyMany", hostPath={"path": "/models"})

    def body(self, name: str, pool: NodePool | None, gpus: int = 8, **spec: Any) -> dict[str, Any]:
        # kwok removes a deleted pod within its grace period, as a kubelet might: keep it short.
        template = {"terminationGracePeriodSeconds": 1, **spec.pop("podTemplate", {})}
        if pool is not None:
            template["nodeSelector"] = dict(pool.labels)
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferenceService",
            "metadata": {"name": name},
            "spec": {
                "model": {"claimName": "weights"},
                "resourcesPerNode": {"nvidia.com/gpu": gpus, "cpu": "1", "memory": "1Gi"},
                "podTemplate": template,
                **spec,
            },
        }

    def create(self, name: str, pool: NodePool | None, gpus: int = 8, **spec: Any) -> None:
        body = self.body(name, pool, gpus, **spec)
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return found

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.get(name).get("status") or {}
        return status

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def wait(self, name: str, condition: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        wait_for(lambda: condition(self.status(name)), TIMEOUT, f"{name}: {what}", self.operator.assert_alive)
        return self.status(name)

    def wait_ready(self, name: str, replicas: int) -> dict[str, Any]:
        def ready(status: dict[str, Any]) -> bool:
            groups = [g for g in status.get("groups") or [] if not g.get("retiring")]
            return (
                status.get("ready") == f"{replicas}/{replicas}"
                and status.get("phase") == "Ready"
                and len(groups) == replicas
                and status.get("updatedReplicas") == replicas
            )

        return self.wait(name, ready, f"{replicas}/{replicas} ready")

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for condition in self.status(name).get("conditions") or []:
            if condition["type"] == type_:
                return dict(condition)
        return {}

    def wait_condition(self, name: str, type_: str, status: str, reason: str) -> dict[str, Any]:
        self.wait(
            name,
            lambda s: any(
                c["type"] == type_ and c["status"] == status and c.get("reason") == reason
                for c in s.get("conditions") or []
            ),
            f"{type_}={status} ({reason})",
        )
        return self.condition(name, type_)

    def pods(self, name: str) -> list[Any]:
        items = self.core.list_namespaced_pod(self.namespace, label_selector=f"{LABEL}={name}").items
        return sorted(items, key=lambda pod: pod.metadata.name)

    def live_pods(self, name: str) -> list[Any]:
        return [pod for pod in self.pods(name) if pod.metadata.deletion_timestamp is None]

    def events(self, name: str) -> list[tuple[str, str]]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=InferenceService"
        ).items
        return [(event.reason, event.message) for event in items]


@pytest.fixture
def services(api: client.ApiClient, namespace: str, operator: Any) -> Iterator[Services]:
    verbs = Services(api, namespace, operator)
    verbs.claim("weights")
    yield verbs
    for volume in verbs.core.list_persistent_volume().items:
        if volume.metadata.name.endswith(f"-{namespace}"):
            verbs.core.delete_persistent_volume(volume.metadata.name)


@pytest.fixture
def jobs(api: client.ApiClient, namespace: str, operator: Any) -> Jobs:
    return Jobs(api, namespace, operator)


def _env(pod: Any) -> dict[str, str]:
    return {item.name: item.value for item in pod.spec.containers[0].env or [] if item.value is not None}


def _ready_leaders(pods: list[Any]) -> int:
    """Leaders a Service sends traffic to: ready and not terminating."""
    return sum(
        1
        for pod in pods
        if pod.metadata.labels.get("largo.dev/member") == "0"
        and pod.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
    )


def test_two_replicas_of_two_nodes_are_two_gangs_behind_one_service(
    services: Services, make_pool: Callable[..., NodePool], cluster: LocalCluster, tmp_path: Path
) -> None:
    pool = make_pool(count=4)
    pulling = {"imagePullSecrets": [{"name": "registry"}]}
    services.create("llm", pool, replicas=2, nodesPerReplica=2, podTemplate=pulling)
    status = services.wait_ready("llm", 2)
    namespace = services.namespace
    assert status["url"] == f"http://llm.{namespace}.svc"
    assert status["selector"] == "largo.dev/inferenceservice=llm,largo.dev/member=0"
    assert status["model"] == {"claimName": "weights", "summary": "weights"}

    # Two gangs: each group's 2 members on 2 nodes of its own (8 GPUs each fill a node).
    groups = status["groups"]
    assert [g["replica"] for g in groups] == [0, 1]
    placed = [set(g["nodes"]) for g in groups]
    assert all(len(nodes) == 2 for nodes in placed)
    assert not placed[0] & placed[1]
    pods = services.pods("llm")
    assert [p.metadata.name for p in pods] == [
        "llm-r0-node-0",
        "llm-r0-node-1",
        "llm-r1-node-0",
        "llm-r1-node-1",
    ]
    for pod in pods:
        replica, member = (
            int(pod.metadata.labels["largo.dev/replica"]),
            int(pod.metadata.labels["largo.dev/member"]),
        )
        assert pod.spec.node_name == groups[replica]["nodes"][member]
        env = _env(pod)
        assert env["LARGO_LEADER_ADDR"] == f"llm-r{replica}-node-0.llm-members.{namespace}.svc"
        assert (env["LARGO_REPLICA"], env["LARGO_MEMBER"], env["LARGO_MEMBERS"]) == (
            str(replica),
            str(member),
            "2",
        )
        assert pod.spec.subdomain == "llm-members"
        assert [secret.name for secret in pod.spec.image_pull_secrets] == ["registry"]
        ports = {port.name for port in pod.spec.containers[0].ports}
        assert ("http" in ports) == (member == 0)

    front = services.core.read_namespaced_service("llm", namespace)
    assert front.spec.selector == {"largo.dev/router": "llm"}
    assert [(p.port, p.target_port) for p in front.spec.ports] == [(80, "http")]
    members = services.core.read_namespaced_service("llm-members", namespace)
    assert members.spec.cluster_ip == "None"
    assert members.spec.publish_not_ready_addresses
    # The router: its Deployment and narrow RBAC, and the ready leaders in the EndpointSlices of
    # llm-replicas (written by the controller-manager), which is what it balances over.
    router = client.AppsV1Api(services.api).read_namespaced_deployment("llm-router", namespace)
    assert router.spec.template.spec.service_account_name == "llm-router"
    assert [secret.name for secret in router.spec.template.spec.image_pull_secrets] == ["registry"]
    assert router.metadata.owner_references[0].name == "llm"
    budget = client.PolicyV1Api(services.api).read_namespaced_pod_disruption_budget("llm-router", namespace)
    assert budget.spec.max_unavailable == 1
    assert budget.spec.selector.match_labels == {"largo.dev/router": "llm"}
    assert budget.metadata.owner_references[0].name == "llm"
    services.core.read_namespaced_service_account("llm-router", namespace)
    rbac = client.RbacAuthorizationV1Api(services.api)
    assert rbac.read_namespaced_role("llm-router", namespace).rules[0].resources == ["endpointslices"]
    assert rbac.read_namespaced_role_binding("llm-router", namespace).subjects[0].name == "llm-router"
    leaders = {f"llm-r{replica}-node-0" for replica in range(2)}

    def listed_leaders() -> set[str]:
        slices = client.DiscoveryV1Api(services.api).list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=llm-replicas"
        )
        return {
            endpoint.target_ref.name
            for item in slices.items
            for endpoint in item.endpoints or []
            if endpoint.conditions.ready
        }

    wait_for(lambda: listed_leaders() == leaders, TIMEOUT, "the ready leaders in llm-replicas' slices")

    # kubectl: the columns, the /scale subresource's view, and the schema's descriptions.
    table = cluster.kubectl(
        "--cache-dir", str(tmp_path), "get", "infsvc", "llm", "-n", namespace
    ).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "URL", "MODEL", "AGE"]
    assert table[1].split()[:4] == ["llm", "2/2", f"http://llm.{namespace}.svc", "weights"]
    scale = json.loads(
        cluster.kubectl(
            "get", "--raw", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/llm/scale"
        ).stdout
    )
    assert scale["spec"]["replicas"] == 2
    assert scale["status"]["replicas"] == 2
    assert scale["status"]["selector"] == status["selector"]
    explained = cluster.kubectl(
        "--cache-dir", str(tmp_path), "explain", "inferenceservice.spec.nodesPerReplica"
    ).stdout
    assert "Pods per replica group" in explained

    # The router's Deployment and a Service deleted by hand are made again; the Role, changed by hand
    # as an earlier version of largo could have left it, is brought back to what this one wants.
    changed = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    rbac.patch_namespaced_role("llm-router", namespace, {"rules": changed})
    client.AppsV1Api(services.api).delete_namespaced_deployment("llm-router", namespace)
    wait_for(
        lambda: any(
            d.metadata.name == "llm-router"
            for d in client.AppsV1Api(services.api).list_namespaced_deployment(namespace).items
            if d.metadata.deletion_timestamp is None
        ),
        TIMEOUT,
        "the router's Deployment made again",
    )
    wait_for(
        lambda: rbac.read_namespaced_role("llm-router", namespace).rules[0].resources == ["endpointslices"],
        TIMEOUT,
        "the router's Role brought back",
    )
    services.core.delete_namespaced_service("llm", namespace)
    wait_for(
        lambda: any(
            svc.metadata.name == "llm" for svc in services.core.list_namespaced_service(namespace).items
        ),
        TIMEOUT,
        "the Service made again",
    )


def test_a_router_setting_removed_from_the_spec_is_removed_from_the_router(services: Services) -> None:
    """The router's Deployment is applied from its first write: a field set when it was made (here a
    node selector) and later dropped from spec.router leaves it, where a create would have kept it
    owned by the create's field manager for ever."""
    apps = client.AppsV1Api(services.api)
    services.create("edge", None, router={"nodeSelector": {"tier": "edge"}})

    def selector() -> Any:
        named = "metadata.name=edge-router"
        found = apps.list_namespaced_deployment(services.namespace, field_selector=named)
        return found.items[0].spec.template.spec.node_selector if found.items else "absent"

    wait_for(lambda: selector() == {"tier": "edge"}, TIMEOUT, "the router made with its node selector")
    services.patch_spec("edge", {"router": {"nodeSelector": None}})
    wait_for(lambda: not selector(), TIMEOUT, "the node selector gone from the router")


def test_kubectl_scale_works_without_autoscaling_and_is_clamped_with_it(
    services: Services, make_pool: Callable[..., NodePool], cluster: LocalCluster
) -> None:
    pool = make_pool(count=3)
    services.create("chat", pool, replicas=1)
    services.wait_ready("chat", 1)
    cluster.kubectl("scale", "infsvc/chat", "-n", services.namespace, "--replicas", "3")
    status = services.wait_ready("chat", 3)
    assert status["scaling"][-1]["from"] == 1
    assert status["scaling"][-1]["to"] == 3
    assert "spec.replicas set to 3" in status["scaling"][-1]["reason"]

    services.patch_spec("chat", {"autoscaling": {"minReplicas": 1, "maxReplicas": 2}})
    status = services.wait_ready("chat", 2)
    limited = services.condition("chat", "ScalingLimited")
    assert limited["status"] == "True"
    assert limited["reason"] == "Clamped"
    assert "clamped to maxReplicas 2" in limited["message"]
    assert services.get("chat")["spec"]["replicas"] == 3  # the user's write is kept, and said to be clamped
    cluster.kubectl("scale", "infsvc/chat", "-n", services.namespace, "--replicas", "1")
    services.wait_ready("chat", 1)
    assert services.condition("chat", "ScalingLimited")["status"] == "False"
    assert [(d["from"], d["to"]) for d in services.status("chat")["scaling"]] == [(1, 3), (3, 2), (2, 1)]
    assert ("Scaled", "replicas 3 -> 2: " + limited["message"]) in services.events("chat")

    # An HPA aimed at a service whose replicas largo owns is told, not fought.
    client.AutoscalingV2Api(services.core.api_client).create_namespaced_horizontal_pod_autoscaler(
        services.namespace,
        {
            "metadata": {"name": "chat-hpa"},
            "spec": {
                "scaleTargetRef": {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "InferenceService",
                    "name": "chat",
                },
                "minReplicas": 1,
                "maxReplicas": 4,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 50},
                        },
                    }
                ],
            },
        },
    )
    conflict = services.wait_condition("chat", "ScalingConflict", "True", "HorizontalPodAutoscaler")
    assert "chat-hpa" in conflict["message"]


def test_a_new_image_rolls_out_group_by_group_keeping_replicas_ready(
    services: Services, make_pool: Callable[..., NodePool]
) -> None:
    pool = make_pool(count=4)
    services.create("roll", pool, replicas=3, rollout={"maxSurge": 1, "maxUnavailable": 0})
    before = services.wait_ready("roll", 3)["revision"]
    lowest: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            lowest.append(_ready_leaders(services.pods("roll")))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        services.patch_spec("roll", {"runtime": {"image": "example/server:2"}})
        after = services.wait(
            "roll",
            lambda s: (
                s.get("revision") != before
                and s.get("updatedReplicas") == 3
                and s.get("replicas") == 3
                and s.get("ready") == "3/3"
                and not any(g.get("retiring") for g in s.get("groups") or [])
            ),
            "every group at the new revision",
        )
    finally:
        done.set()
        sampler.join()
    assert min(lowest) >= 3, f"ready leaders dropped to {min(lowest)} during the rollout"
    assert len(lowest) > 10
    images = {pod.spec.containers[0].image for pod in services.live_pods("roll")}
    assert images == {"example/server:2"}, [
        (p.metadata.name, p.metadata.labels, p.status.phase) for p in services.pods("roll")
    ] + [after]
    assert {g["revision"] for g in after["groups"]} == {after["revision"]}
    assert services.condition("roll", "Progressing")["reason"] == "RolloutComplete"
    assert any(reason == "GroupRetired" for reason, _ in services.events("roll"))


def test_a_failed_member_restarts_only_its_group(
    services: Services, make_pool: Callable[..., NodePool]
) -> None:
    pool = make_pool(count=4)
    services.create("pipe", pool, replicas=2, nodesPerReplica=2)
    services.wait_ready("pipe", 2)
    untouched = {
        p.metadata.name: p.metadata.uid
        for p in services.pods("pipe")
        if p.metadata.labels["largo.dev/replica"] == "1"
    }
    services.core.patch_namespaced_pod(
        "pipe-r0-node-1", services.namespace, {"metadata": {"annotations": {EXIT_ANNOTATION: "1"}}}
    )
    status = services.wait(
        "pipe",
        lambda s: (
            s.get("ready") == "2/2" and s["groups"][0].get("attempt") == 1 and s["groups"][0].get("ready")
        ),
        "group 0 restarted whole and ready again",
    )
    assert status["groups"][0]["restarts"] == 1
    assert status["groups"][1]["attempt"] == 0
    assert status["groups"][1]["restarts"] == 0
    pods = services.live_pods("pipe")
    assert {
        p.metadata.name: p.metadata.uid for p in pods if p.metadata.labels["largo.dev/replica"] == "1"
    } == untouched
    assert {
        p.metadata.labels["largo.dev/attempt"] for p in pods if p.metadata.labels["largo.dev/replica"] == "0"
    } == {"1"}
    restarted = [message for reason, message in services.events("pipe") if reason == "GroupRestarted"]
    assert restarted
    assert "member 1 (pipe-r0-node-1) failed" in restarted[0]


def test_training_and_serving_share_one_gpu_queue_by_priority(
    services: Services, jobs: Jobs, make_pool: Callable[..., NodePool]
) -> None:
    pool = make_pool(count=2)
    jobs.create("holder", pool, num_nodes=2)
    jobs.wait_phase("holder", "Running")
    # Both wait for the holder's GPUs: the later, higher-priority service goes first.
    jobs.create("batch", pool, num_nodes=2, scheduling={"priority": 0})
    jobs.wait_phase("batch", "Queued")
    services.create("urgent", pool, replicas=1, scheduling={"priority": 10})
    waiting = services.wait(
        "urgent", lambda s: bool((s.get("groups") or [{}])[0].get("queue")), "its group queued"
    )["groups"][0]["queue"]
    assert waiting["position"] == 1
    assert waiting["reason"] == "InsufficientCapacity"
    # The job's position is its own status write, after the group's in the same pass: waited for.
    jobs.wait("batch", lambda s: (s.get("queue") or {}).get("position") == 2, "the job second in the queue")
    jobs.exit("holder", 0)
    jobs.wait_phase("holder", "Succeeded")
    services.wait_ready("urgent", 1)
    # The service holds one node; the 2-node job still waits, behind nobody but capacity.
    assert jobs.status("batch")["phase"] == "Queued"
    services.patch_spec("urgent", {"replicas": 0})
    services.wait(
        "urgent", lambda s: s.get("phase") == "ScaledToZero" and not s.get("groups"), "scaled to zero"
    )
    jobs.wait_phase("batch", "Running")


def _report_checkpoint(core: client.CoreV1Api, namespace: str, job: str, step: int) -> None:
    """What the trainer's rank 0 writes after a complete checkpoint (docs/runtime.md)."""
    report = {
        "step": step,
        "totalSteps": 100,
        "percent": step,
        "updatedAt": "2030-01-01T00:00:00Z",
        "checkpointStep": step,
        "checkpointedAt": "2030-01-01T00:00:00Z",
    }
    core.patch_namespaced_config_map(f"{job}-progress", namespace, {"data": {"progress": json.dumps(report)}})


def test_from_train_job_waits_then_serves_the_newest_checkpoint_and_follows_it(
    services: Services, jobs: Jobs, make_pool: Callable[..., NodePool]
) -> None:
    # The job, two services and the follower's surge group: a node each.
    pool = make_pool(count=4)
    services.create("follow", pool, model={"fromTrainJob": {"name": "tune", "follow": True}})
    services.create("pinned", pool, model={"fromTrainJob": {"name": "tune"}})
    missing = services.wait_condition("follow", "ModelReady", "False", "TrainJobNotFound")
    assert "TrainJob tune not found" in missing["message"]
    jobs.create("tune", pool, num_nodes=1, checkpoint={"claimName": "weights"})
    jobs.wait_phase("tune", "Running")
    services.wait_condition("follow", "ModelReady", "False", "WaitingForCheckpoint")
    assert not services.pods("follow")

    _report_checkpoint(jobs.core, jobs.namespace, "tune", 10)
    for name in ("follow", "pinned"):
        status = services.wait_ready(name, 1)
        assert status["model"]["trainJob"] == "tune"
        assert status["model"]["checkpointStep"] == 10
        assert _env(services.live_pods(name)[0])["LARGO_MODEL_STEP"] == "10"

    _report_checkpoint(jobs.core, jobs.namespace, "tune", 20)
    status = services.wait(
        "follow",
        lambda s: (
            (s.get("model") or {}).get("checkpointStep") == 20
            and s.get("updatedReplicas") == 1
            and s.get("ready") == "1/1"
            and len(s.get("groups") or []) == 1
        ),
        "the newer checkpoint rolled out",
    )
    assert [_env(p)["LARGO_MODEL_STEP"] for p in services.live_pods("follow")] == ["20"]
    assert any(reason == "NewerCheckpoint" for reason, _ in services.events("follow"))
    assert services.status("pinned")["model"]["checkpointStep"] == 10  # without follow: pinned
    assert [_env(p)["LARGO_MODEL_STEP"] for p in services.live_pods("pinned")] == ["10"]


def test_bad_input_is_refused_with_the_field_named_or_told_in_a_condition(
    services: Services, jobs: Jobs, make_pool: Callable[..., NodePool]
) -> None:
    pool = make_pool(count=1)
    refused = {
        "two sources": (
            {"model": {"claimName": "weights", "fromTrainJob": {"name": "x"}}},
            "set exactly one of claimName or fromTrainJob",
        ),
        "bounds": (
            {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
            "spec.autoscaling.minReplicas must be <= spec.autoscaling.maxReplicas",
        ),
        "vllm without GPUs": (
            {"runtime": {"type": "vllm"}, "resourcesPerNode": {"cpu": "1"}},
            "spec.runtime.type vllm",
        ),
        "a port every pod has": ({"runtime": {"port": 9400}}, "spec.runtime.port must not be 9400"),
        "custom without image": ({"runtime": {"type": "custom"}}, "spec.runtime.image is required"),
        "rollout both zero": ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "cannot both be 0"),
        "negative memory": ({"resourcesPerNode": {"memory": "-1Gi"}}, "spec.resourcesPerNode.memory"),
        "negative count": ({"resourcesPerNode": {"memory": -1}}, "greater than or equal to 0"),
        # What the pods would be refused for is refused itself, not by every pod creation.
        "model path up": ({"model": {"claimName": "weights", "path": "../x"}}, "spec.model.path must not"),
        "ray's port": (
            {
                "runtime": {"type": "vllm", "port": 6379},
                "nodesPerReplica": 2,
                "resourcesPerNode": {"nvidia.com/gpu": 1},
            },
            "spec.runtime.port must not be 6379",
        ),
        "decimal exponent": ({"resourcesPerNode": {"cpu": "1e1.5"}}, "spec.resourcesPerNode.cpu"),
        "env name": ({"env": [{"name": "A=B", "value": "1"}]}, "spec.env[0].name"),
        "account": ({"podTemplate": {"serviceAccountName": "Server"}}, "spec.podTemplate.serviceAccountName"),
    }
    for what, (spec, message) in refused.items():
        body = services.body("bad", pool, **spec)
        with pytest.raises(ApiException) as error:
            services.custom.create_namespaced_custom_object(GROUP, VERSION, services.namespace, PLURAL, body)
        assert error.value.status == 422, what
        assert message in json.loads(error.value.body)["message"], what

    told = {
        "no-claim": ({"model": {"claimName": "nowhere"}}, "ClaimNotFound", "PersistentVolumeClaim nowhere"),
        "no-job": (
            {"model": {"fromTrainJob": {"name": "ghost"}}},
            "TrainJobNotFound",
            "TrainJob ghost not found",
        ),
        "no-ckpt": (
            {"model": {"fromTrainJob": {"name": "plain"}}},
            "TrainJobWithoutCheckpoint",
            "has no spec.checkpoint",
        ),
        "failed": (
            {"model": {"fromTrainJob": {"name": "doomed"}}},
            "TrainJobFailed",
            "failed without a complete checkpoint",
        ),
    }
    # A quantity the schema lets through but the scheduler could not count (10^22 millicores overflow
    # Kubernetes' int64) is told in a condition; the scheduling passes go on for everyone else.
    services.create("overflow", pool, resourcesPerNode={"cpu": "10E"})
    jobs.create("plain", pool, num_nodes=1, gpus=1)
    jobs.create(
        "doomed",
        pool,
        num_nodes=1,
        gpus=1,
        checkpoint={"claimName": "weights"},
        failurePolicy={"backoffLimit": 0},
    )
    jobs.wait_phase("doomed", "Running")
    condition = services.wait_condition("overflow", "Ready", "False", "InvalidSpec")
    assert "spec.resourcesPerNode['cpu']: quantity '10E' for cpu is out of range" in condition["message"]
    assert not services.pods("overflow")
    jobs.exit("doomed", 1)
    jobs.wait_phase("doomed", "Failed")
    for name, (spec, _, _) in told.items():
        services.create(name, pool, gpus=1, **spec)
    for name, (_, reason, message) in told.items():
        condition = services.wait_condition(name, "ModelReady", "False", reason)
        assert message in condition["message"], name
        assert services.status(name)["reason"] == reason
        # The event follows the status write.
        wait_for(
            lambda n=name, r=reason, c=condition: (r, c["message"]) in services.events(n), TIMEOUT, "event"
        )
        assert not services.pods(name)
    # A Deployment of the router's name that is not largo's is told and left alone, never adopted:
    # largo's owner reference on it would have it deleted with the service.
    apps = client.AppsV1Api(services.api)
    labels = {"app": "theirs"}
    theirs = {
        "metadata": {"name": "taken-router"},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "example.com/theirs:1"}]},
            },
        },
    }
    apps.create_namespaced_deployment(services.namespace, theirs)
    services.create("taken", pool, gpus=1)
    wait_for(
        lambda: any(
            reason == "NameConflict" and "Deployment taken-router already exists" in message
            for reason, message in services.events("taken")
        ),
        TIMEOUT,
        "a NameConflict event",
    )
    kept = apps.read_namespaced_deployment("taken-router", services.namespace)
    assert not kept.metadata.owner_references
    assert kept.spec.template.spec.containers[0].image == "example.com/theirs:1"
    assert not services.pods("taken")
    # Fixing the input is enough: the claim appears, the service serves.
    services.claim("nowhere")
    services.wait_ready("no-claim", 1)


def test_a_rollout_whose_new_pods_keep_failing_stops_and_the_old_replicas_keep_serving(
    services: Services, make_pool: Callable[..., NodePool]
) -> None:
    pool = make_pool(count=3)
    # kwok marks a pod Ready the moment it runs, as a server without a readiness probe would be: a new
    # group counts as available only after 10 s ready, and these crash well before.
    rollout = {"maxSurge": 1, "maxUnavailable": 0, "minReadySeconds": 10}
    services.create("bad", pool, replicas=2, rollout=rollout)
    before = services.wait_ready("bad", 2)["revision"]
    old = {p.metadata.name: p.metadata.uid for p in services.live_pods("bad")}
    services.patch_spec("bad", {"runtime": {"image": "example/broken:1"}})
    done = threading.Event()

    def crash_new_pods() -> None:
        """Every pod of the new revision exits 1 as soon as it runs, as a crash-looping server would."""
        while not done.is_set():
            for pod in services.live_pods("bad"):
                broken = pod.spec.containers[0].image == "example/broken:1"
                annotated = EXIT_ANNOTATION in (pod.metadata.annotations or {})
                if broken and not annotated and pod.status.phase == "Running":
                    with contextlib.suppress(ApiException):
                        services.core.patch_namespaced_pod(
                            pod.metadata.name,
                            services.namespace,
                            {"metadata": {"annotations": {EXIT_ANNOTATION: "1"}}},
                        )
            done.wait(0.2)

    crasher = threading.Thread(target=crash_new_pods, daemon=True)
    crasher.start()
    try:
        stalled = services.wait_condition("bad", "Progressing", "False", "RolloutStalled")
    finally:
        done.set()
        crasher.join()
    assert "restarted 3" in stalled["message"] or "3 times" in stalled["message"]
    status = services.status("bad")
    assert status["reason"] == "RolloutStalled"
    assert status["ready"] == "2/2"  # the old groups serve on
    assert status["revision"] != before
    serving = {
        p.metadata.name: p.metadata.uid
        for p in services.live_pods("bad")
        if p.spec.containers[0].image != "example/broken:1"
    }
    assert serving == old
    # Fixing the spec (back to a working image) ends the stall.
    services.patch_spec("bad", {"runtime": {"image": None}})
    services.wait_condition("bad", "Progressing", "True", "RolloutComplete")


def test_a_group_whose_pods_are_refused_gives_its_gpus_back_and_serves_once_allowed(
    services: Services, jobs: Jobs, make_pool: Callable[..., NodePool]
) -> None:
    """A quota that refuses a group's pods must not keep its GPUs reserved: after the binding timeout
    (10 s here) the group is restarted without nodes, and a job queued behind it is admitted."""
    pool = make_pool(count=1)
    refuse_pods(services.core, services.namespace)
    services.create("refused", pool)
    status = services.wait(
        "refused",
        lambda s: any(g.get("nodes") and g.get("createRefused") for g in s.get("groups") or []),
        "the refusal recorded on the admitted group",
    )
    refusal = status["groups"][0]["createRefused"]
    assert refusal["reason"] == "CreateRefused"
    assert "exceeded quota: no-pods" in refusal["message"]
    jobs.create("behind", pool, num_nodes=1)  # the node's 8 GPUs are the group's: it waits
    jobs.wait("behind", lambda s: s.get("phase") == "Queued", "the job queued behind the group")

    def released() -> bool:
        return any(
            reason == "GroupRestarted" and "its pods were refused for 10s" in message
            for reason, message in services.events("refused")
        )

    wait_for(released, TIMEOUT, "the group restarted for its refused pods", services.operator.assert_alive)
    jobs.wait("behind", lambda s: s.get("phase") in ("Starting", "Running"), "the job admitted on the GPUs")

    jobs.custom.delete_namespaced_custom_object(GROUP, VERSION, jobs.namespace, "trainjobs", "behind")
    services.core.delete_namespaced_resource_quota("no-pods", services.namespace)
    services.wait_ready("refused", 1)
    assert all("createRefused" not in group for group in services.status("refused")["groups"])
