"""Serving for real on localnode: a TrainJob trains the reference model, an InferenceService serves its
last checkpoint with largo's built-in server behind the router, and clients call the service's
ClusterIP (kube-proxy) as they would in a cluster. One training run is shared by the module's tests."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from kubernetes import client, config
from largo.dev import load
from largo.dev.cluster import ClusterError, LocalCluster, LocalNodePool, wait_for
from largo.dev.operator_process import OperatorProcess
from largo.dev.prometheus import DASHBOARD, PrometheusServer, dashboard_queries, publish_operator
from largo.runtime.engine import Engine, Request
from largo.runtime.engine_host import load_model

pytestmark = pytest.mark.e2e

GROUP, VERSION = "largo.dev", "v1alpha1"
LOCALNODE = {"largo.dev/localnode": "true"}
PROMPTS = ["def ", "import ", "class A"]
STEPS = 30


@dataclass
class Trained:
    namespace: str
    cluster: LocalCluster
    api: client.ApiClient
    operator: OperatorProcess

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def status(self, name: str) -> dict[str, Any]:
        found = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "inferenceservices", name
        )
        return dict(found.get("status") or {})

    def serve(self, name: str, **spec: Any) -> str:
        """Creates an InferenceService of the trained model; returns its completions URL once Ready."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferenceService",
            "metadata": {"name": name},
            "spec": {
                "model": {"fromTrainJob": {"name": "tiny"}},
                "runtime": {"type": "largo", "args": ["--threads", "1"]},
                "resourcesPerNode": {"cpu": "250m", "memory": "512Mi"},
                "router": {"nodeSelector": LOCALNODE},
                "podTemplate": {"nodeSelector": LOCALNODE, "terminationGracePeriodSeconds": 5},
                **spec,
            },
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "inferenceservices", body)
        wanted = int(spec.get("replicas", 1))
        try:
            wait_for(
                lambda: self.status(name).get("ready") == f"{wanted}/{wanted}",
                240,
                f"{name} ready",
                self.operator.assert_alive,
            )
        except ClusterError as error:
            raise AssertionError(f"{error}; status: {self.status(name)}") from error
        cluster_ip = self.core.read_namespaced_service(name, self.namespace).spec.cluster_ip

        def routed() -> bool:
            try:
                load.complete(f"http://{cluster_ip}/v1/completions", "x", max_tokens=1)
                return True
            except Exception:
                return False  # the router has not seen the ready replica yet

        wait_for(routed, 60, f"{name} answering through its ClusterIP")
        return f"http://{cluster_ip}/v1/completions"

    def pods(self, name: str) -> dict[str, Any]:
        selector = f"largo.dev/inferenceservice={name}"
        return {
            p.metadata.name: p
            for p in self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        }


@pytest.fixture(scope="module")
def serving_nodes(local_cluster: LocalCluster) -> Iterator[list[str]]:
    """Four more localnode nodes for this module (two 2-pod replicas, a node per pod), cordoned after
    it so that the other modules see the cluster they expect."""
    names = local_cluster.add_local_nodes(LocalNodePool(count=4, name_prefix="serving-node"))
    yield names
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(local_cluster.kubeconfig)))
    for name in names:
        core.patch_node(name, {"spec": {"unschedulable": True}})


@pytest.fixture(scope="module")
def trained(
    local_cluster: LocalCluster, local_operator: OperatorProcess, serving_nodes: list[str]
) -> Iterator[Trained]:
    """A namespace where the TrainJob `tiny` trained the reference model for 30 steps onto a claim."""
    api = config.new_client_from_config(config_file=str(local_cluster.kubeconfig))
    core = client.CoreV1Api(api)
    namespace = f"srv-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": namespace}})
    wait_for(
        lambda: any(
            a.metadata.name == "default" for a in core.list_namespaced_service_account(namespace).items
        ),
        60,
        "the default ServiceAccount",
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "checkpoints"},
            "spec": {
                "storageClassName": "largo-local",
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    # Rank 0 reports progress (the checkpoint step a service follows) into tiny-progress: allow it, as
    # examples/trainjob-demo.yaml does.
    rbac = client.RbacAuthorizationV1Api(api)
    rule = {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["tiny-progress"],
        "verbs": ["get", "patch"],
    }
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "progress"}, "rules": [rule]})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "progress"},
            "subjects": [{"kind": "ServiceAccount", "name": "default"}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "progress"},
        },
    )
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "image": "largo-trainer:dev",
            "command": ["python", "-m", "largo.runtime.train"],
            "args": [
                "--steps",
                str(STEPS),
                "--checkpoint-every",
                "10",
                "--batch-size",
                "4",
                "--report-every-seconds",
                "1",
            ],
            "numNodes": 1,
            "procsPerNode": 1,
            "backend": "gloo",
            "resourcesPerNode": {"cpu": "500m", "memory": "1Gi"},
            "checkpoint": {"claimName": "checkpoints", "path": "/checkpoints"},
            "podTemplate": {"nodeSelector": LOCALNODE},
        },
    }
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainjobs", job)

    def succeeded() -> bool:
        found = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "trainjobs", "tiny")
        phase = (found.get("status") or {}).get("phase")
        assert phase != "Failed", found.get("status")
        return phase == "Succeeded"

    wait_for(succeeded, 240, "the TrainJob to succeed", local_operator.assert_alive)
    yield Trained(namespace, local_cluster, api, local_operator)
    core.delete_namespace(namespace)


def _expected(trained: Trained, max_tokens: int) -> dict[str, str]:
    """What the last checkpoint answers, computed here from the claim's file with the server's engine."""
    directory = trained.cluster.localnode_dir / "claims" / trained.namespace / "checkpoints"
    model, step = load_model(directory, None, torch.device("cpu"))
    assert step == STEPS
    engine = Engine.local(model, max_batch=1)
    engine.start()
    answers: dict[str, str] = {}
    try:
        for prompt in PROMPTS:
            tokens: list[int] = []
            done = threading.Event()
            request = Request(prompt=list(prompt.encode()), max_tokens=max_tokens, temperature=0.0)
            request.on_token = tokens.append
            request.on_finish = lambda reason, done=done: done.set()
            assert engine.submit(request)
            assert done.wait(60)
            answers[prompt] = bytes(tokens).decode(errors="replace")
    finally:
        engine.stop()
    return answers


def test_the_service_answers_with_the_trainjob_s_last_checkpoint(trained: Trained) -> None:
    url = trained.serve("chat")
    model = trained.status("chat")["model"]
    assert model["trainJob"] == "tiny"
    assert model["checkpointStep"] == STEPS
    expected = _expected(trained, 16)
    assert {prompt: load.complete(url, prompt, max_tokens=16) for prompt in PROMPTS} == expected


def test_a_replica_killed_under_load_costs_no_request(trained: Trained) -> None:
    url = trained.serve("steady", replicas=2)
    victim = "steady-r0-node-0"

    async def burst_and_kill() -> load.Results:
        stop = asyncio.Event()
        running = asyncio.create_task(
            load.run(url, PROMPTS, concurrency=4, duration=40, max_tokens=24, stop=stop)
        )
        await asyncio.sleep(4)
        # Killed, not drained: no grace period, its in-flight requests cut off.
        await asyncio.to_thread(
            trained.core.delete_namespaced_pod, victim, trained.namespace, grace_period_seconds=0
        )
        await asyncio.to_thread(
            wait_for,
            lambda: (
                trained.status("steady").get("ready") == "2/2"
                and trained.status("steady")["groups"][0].get("restarts", 0) >= 1
            ),
            120,
            "the killed replica's group back",
        )
        await asyncio.sleep(3)
        stop.set()
        return await running

    results = asyncio.run(burst_and_kill())
    assert results.failed == 0, results.summary()
    assert results.answered > 20, results.summary()


def test_a_two_pod_replica_answers_the_same_and_a_killed_member_restarts_only_its_group(
    trained: Trained,
) -> None:
    # 1.1 CPUs a pod on nodes of 2: no two on one node, so each stage runs on a node of its own.
    resources = {"cpu": "1100m", "memory": "512Mi"}
    url = trained.serve("split", replicas=2, nodesPerReplica=2, resourcesPerNode=resources)
    pods = trained.pods("split")
    # Each group's two pipeline stages on two nodes (a node per pod: 4 of them).
    assert len({pod.spec.node_name for pod in pods.values()}) == 4
    expected = _expected(trained, 16)
    # Through the router, whichever group answers: each splits the model into 2 pipeline stages.
    for _ in range(2):
        assert {prompt: load.complete(url, prompt, max_tokens=16) for prompt in PROMPTS} == expected
    before = {name: pod.metadata.uid for name, pod in trained.pods("split").items()}
    assert set(before) == {f"split-r{r}-node-{m}" for r in range(2) for m in range(2)}
    trained.core.delete_namespaced_pod("split-r1-node-1", trained.namespace, grace_period_seconds=0)

    def group_1_replaced() -> bool:
        pods = trained.pods("split")
        group_1 = [pods.get(f"split-r1-node-{m}") for m in range(2)]
        return (
            all(p is not None and p.metadata.uid != before[p.metadata.name] for p in group_1)
            and trained.status("split").get("ready") == "2/2"
        )

    wait_for(group_1_replaced, 120, "group 1's two pods new and ready", trained.operator.assert_alive)
    after = {name: pod.metadata.uid for name, pod in trained.pods("split").items()}
    # Group 0 untouched: the same two pods.
    assert [after[f"split-r0-node-{m}"] for m in range(2)] == [before[f"split-r0-node-{m}"] for m in range(2)]
    assert trained.status("split")["groups"][1]["restarts"] >= 1
    assert {prompt: load.complete(url, prompt, max_tokens=16) for prompt in PROMPTS} == expected


def test_a_rollout_under_steady_load_fails_no_request(trained: Trained) -> None:
    url = trained.serve("rolling", replicas=2)
    before = {name: pod.metadata.uid for name, pod in trained.pods("rolling").items()}
    first_revision = trained.status("rolling")["revision"]

    def rolled() -> bool:
        status = trained.status("rolling")
        pods = trained.pods("rolling")
        return (
            status.get("revision") != first_revision
            and status.get("updatedReplicas") == 2
            and status.get("ready") == "2/2"
            and not set(before) & {name for name, pod in pods.items() if pod.metadata.uid in before.values()}
        )

    async def roll_under_load() -> load.Results:
        stop = asyncio.Event()
        running = asyncio.create_task(
            load.run(url, PROMPTS, concurrency=4, duration=120, max_tokens=24, stop=stop)
        )
        await asyncio.sleep(3)
        # A new revision: every group is replaced, one at a time (maxSurge 1, maxUnavailable 0).
        patch = {"spec": {"runtime": {"args": ["--threads", "1", "--max-batch", "16"]}}}
        await asyncio.to_thread(
            trained.custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            trained.namespace,
            "inferenceservices",
            "rolling",
            patch,
        )
        await asyncio.to_thread(wait_for, rolled, 180, "the rollout to complete")
        await asyncio.sleep(3)
        stop.set()
        return await running

    results = asyncio.run(roll_under_load())
    assert results.failed == 0, results.summary()
    assert results.answered > 20, results.summary()


def test_prometheus_finds_the_servers_and_the_router_and_every_serving_panel_shows_something(
    trained: Trained,
) -> None:
    """A real Prometheus discovers the model servers and the router by their pods' annotations (and the
    operator by its EndpointSlice): the servers' latency histogram, the router's per-replica series
    named after the pods, and the operator's replica counts are there, and so is every panel of the
    dashboard's Serving row."""
    publish_operator(trained.api, trained.namespace, trained.operator.metrics_url)
    prometheus = PrometheusServer(trained.cluster.tools, trained.cluster.kubeconfig, [trained.namespace])
    prometheus.start()
    try:
        url = trained.serve("watched", replicas=2)
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                asyncio.run(load.run(url, PROMPTS, concurrency=2, duration=2, max_tokens=8))

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            where = f'namespace="{trained.namespace}", inferenceservice="watched"'
            wait_for(
                lambda: (
                    (prometheus.value(f"sum(largo_serve_request_seconds_count{{{where}}})") or 0) > 0
                    and (
                        prometheus.value(f'sum(haproxy_server_sessions_total{{{where}, proxy="replicas"}})')
                        or 0
                    )
                    > 0
                ),
                120,
                "the servers' and the router's series in Prometheus",
                prometheus.assert_alive,
            )
            # Each replica's series once the router routes to it and Prometheus scraped it since: the
            # router may have answered (and been scraped) with the first replica alone.
            per_replica = f'haproxy_server_current_sessions{{{where}, proxy="replicas", component="router"}}'
            both = {"watched-r0-node-0", "watched-r1-node-0"}
            wait_for(
                lambda: {series["metric"]["server"] for series in prometheus.query(per_replica)} == both,
                60,
                f"the router's series of {sorted(both)} in Prometheus",
                prometheus.assert_alive,
            )
            for query in dashboard_queries(json.loads(DASHBOARD.read_text()), {"Serving"}):
                wait_for(lambda q=query: bool(prometheus.query(q)), 60, f"dashboard query with data: {query}")
        finally:
            stop.set()
            sender.join()
    finally:
        prometheus.stop()
