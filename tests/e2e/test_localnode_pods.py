"""localnode as a kubelet, pod by pod: environment and volumes, restart policies and counts, probes,
deletion with a grace period, and ``largo dev logs``."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from largo.dev.cluster import LocalCluster, wait_for
from largo.dev.localnode import network

pytestmark = pytest.mark.e2e
TIMEOUT = 120


class Pods:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.core = client.CoreV1Api(api)
        self.namespace = f"pods-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace({"metadata": {"name": self.namespace}})
        wait_for(self._has_default_account, 60, "the namespace's default ServiceAccount")

    def _has_default_account(self) -> bool:
        accounts = self.core.list_namespaced_service_account(self.namespace).items
        return any(a.metadata.name == "default" for a in accounts)

    def create(self, name: str, containers: list[dict[str, Any]], **spec: Any) -> None:
        body = {
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {
                "nodeSelector": {"largo.dev/localnode": "true"},
                "terminationGracePeriodSeconds": 2,
                "containers": [{"image": "none", **c} for c in containers],
                **spec,
            },
        }
        self.core.create_namespaced_pod(self.namespace, body)

    def get(self, name: str) -> Any:
        return self.core.read_namespaced_pod(name, self.namespace)

    def wait(self, name: str, what: str, condition: Any) -> Any:
        wait_for(lambda: condition(self.get(name)), TIMEOUT, f"{name}: {what}", self.cluster.assert_running)
        return self.get(name)

    def logs(self, name: str) -> str:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "largo",
                "dev",
                "logs",
                name,
                "-n",
                self.namespace,
                "--logs-dir",
                str(self.cluster.localnode_dir / "logs"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout


@pytest.fixture
def pods(local_cluster: LocalCluster) -> Iterator[Pods]:
    pods = Pods(local_cluster)
    yield pods
    pods.core.delete_namespace(pods.namespace)


def test_environment_volumes_and_names_reach_the_process(pods: Pods) -> None:
    pods.core.create_namespaced_config_map(
        pods.namespace, {"metadata": {"name": "settings"}, "data": {"greeting": "hello"}}
    )
    pods.core.create_namespaced_secret(
        pods.namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}}
    )
    script = "; ".join(
        [
            'echo "msg=$MSG token=$TOKEN node=$NODE ip=$POD_IP"',
            'echo "file=$(cat /etc/settings/greeting)"',
            'echo "host=$(hostname)"',
            'echo "namespace=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"',
            'echo "resolves=$(getent hosts checker.sub.$NS.svc | cut -f1 -d" ")"',
            'echo "service=$(getent ahostsv4 sub.$NS.svc.cluster.local | head -1 | cut -f1 -d" ")"',
            "echo written > /scratch/x && echo scratch=$(cat /scratch/x)",
            'echo "secret-file=$(cat /etc/creds/token)"',
            'echo "cwd=$(pwd)"',
        ]
    )
    pods.create(
        "checker",
        [
            {
                "name": "main",
                "command": ["sh", "-c", script],
                "env": [
                    {
                        "name": "GREETING",
                        "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}},
                    },
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "MSG", "value": "$(GREETING) world"},
                ],
                "volumeMounts": [
                    {"name": "settings", "mountPath": "/etc/settings", "readOnly": True},
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
                ],
                "workingDir": "/tmp",
            }
        ],
        restartPolicy="Never",
        hostname="checker",
        subdomain="sub",
        volumes=[
            {"name": "settings", "configMap": {"name": "settings"}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "creds", "secret": {"secretName": "creds"}},
        ],
    )
    pod = pods.wait("checker", "Succeeded", lambda p: p.status.phase in ("Succeeded", "Failed"))
    output = pods.logs("checker")
    assert pod.status.phase == "Succeeded", output
    ip = pod.status.pod_ip
    assert f"msg=hello world token=s3cret node={pod.spec.node_name} ip={ip}" in output
    assert "file=hello" in output
    assert "host=checker" in output
    assert f"namespace={pods.namespace}" in output
    assert f"resolves={ip}" in output
    assert f"service={ip}" in output
    assert "scratch=written" in output
    assert "secret-file=s3cret" in output
    assert "cwd=/tmp" in output
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    # kubectl logs goes through the API server to the node's endpoint and reads the same file.
    assert pods.cluster.kubectl("logs", "-n", pods.namespace, "checker").stdout == output


def test_on_failure_restarts_the_container_and_counts_it(pods: Pods, tmp_path: Path) -> None:
    script = "if [ -f /state/ran ]; then echo second; exit 0; fi; touch /state/ran; echo first; exit 3"
    pods.create(
        "flaky",
        [
            {
                "name": "main",
                "command": ["sh", "-c", script],
                "volumeMounts": [{"name": "state", "mountPath": "/state"}],
            }
        ],
        restartPolicy="OnFailure",
        volumes=[
            {"name": "state", "hostPath": {"path": str(tmp_path / "state"), "type": "DirectoryOrCreate"}}
        ],
    )
    pod = pods.wait("flaky", "Succeeded", lambda p: p.status.phase in ("Succeeded", "Failed"))
    status = pod.status.container_statuses[0]
    assert pod.status.phase == "Succeeded"
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 3
    assert pods.logs("flaky").strip() == "second"
    previous = pods.cluster.kubectl("logs", "-n", pods.namespace, "flaky", "--previous").stdout
    assert previous.strip() == "first"


def test_never_reports_the_failing_exit_code(pods: Pods) -> None:
    pods.create("fails", [{"name": "main", "command": ["sh", "-c", "exit 7"]}], restartPolicy="Never")
    pod = pods.wait("fails", "Failed", lambda p: p.status.phase in ("Succeeded", "Failed"))
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 7


def test_a_container_without_command_fails_with_a_clear_reason(pods: Pods) -> None:
    pods.create("no-command", [{"name": "main"}], restartPolicy="Never")
    pod = pods.wait("no-command", "Failed", lambda p: p.status.phase == "Failed")
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.reason == "ContainerCannotRun"
    assert "localnode runs no images" in terminated.message


def test_readiness_and_liveness_probes(pods: Pods) -> None:
    server = [sys.executable, "-m", "http.server", "8080"]
    pods.create(
        "web",
        [
            {
                "name": "main",
                "command": server,
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            }
        ],
    )
    ready = pods.wait(
        "web", "Ready", lambda p: p.status.container_statuses and p.status.container_statuses[0].ready
    )
    assert ready.status.phase == "Running"
    assert any(c.type == "Ready" and c.status == "True" for c in ready.status.conditions)

    pods.create(
        "exec-ready",
        [
            {
                "name": "main",
                "command": ["sleep", "600"],
                "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1},
            }
        ],
    )
    pods.wait(
        "exec-ready", "Ready", lambda p: p.status.container_statuses and p.status.container_statuses[0].ready
    )

    pods.create(
        "unhealthy",
        [
            {
                "name": "main",
                "command": server,
                "livenessProbe": {"tcpSocket": {"port": 9999}, "periodSeconds": 1, "failureThreshold": 2},
            }
        ],
    )
    restarted = pods.wait(
        "unhealthy",
        "a restart",
        lambda p: p.status.container_statuses and p.status.container_statuses[0].restart_count >= 1,
    )
    last = restarted.status.container_statuses[0].last_state.terminated
    assert "liveness probe failed" in last.message


def test_kubectl_logs_follows_a_running_container_to_its_end(pods: Pods) -> None:
    script = "for i in 1 2 3 4 5 6; do echo line-$i; sleep 0.5; done"
    pods.create("counter", [{"name": "main", "command": ["sh", "-c", script]}], restartPolicy="Never")
    pods.wait("counter", "Running", lambda p: p.status.phase in ("Running", "Succeeded"))
    followed = pods.cluster.kubectl("logs", "-f", "-n", pods.namespace, "counter").stdout
    assert followed.split() == [f"line-{i}" for i in range(1, 7)]
    tail = pods.cluster.kubectl("logs", "--tail=2", "-n", pods.namespace, "counter").stdout
    assert tail.split() == ["line-5", "line-6"]


def test_node_keeps_its_lease_fresh(pods: Pods) -> None:
    coordination = client.CoordinationV1Api(pods.core.api_client)
    node = pods.cluster.local_node_names[0]
    first = coordination.read_namespaced_lease(node, "kube-node-lease").spec
    assert first.holder_identity == node
    wait_for(
        lambda: (
            coordination.read_namespaced_lease(node, "kube-node-lease").spec.renew_time > first.renew_time
        ),
        60,
        "a lease renewal",
    )
    ready = next(c for c in pods.core.read_node(node).status.conditions if c.type == "Ready")
    assert ready.status == "True"


def test_deletion_kills_after_the_grace_period_and_cleans_up(pods: Pods) -> None:
    pods.create(
        "stubborn", [{"name": "main", "command": ["sh", "-c", "trap '' TERM; while true; do sleep 1; done"]}]
    )
    pod = pods.wait("stubborn", "Running", lambda p: p.status.phase == "Running")
    sandbox = network.sandbox_name(pod.spec.node_name, pod.metadata.uid)
    pids = network.sandbox_pids(sandbox)
    assert pids
    pods.core.delete_namespaced_pod("stubborn", pods.namespace)

    def gone() -> bool:
        try:
            pods.get("stubborn")
        except client.ApiException as error:
            return error.status == 404
        return False

    wait_for(gone, TIMEOUT, "the pod to be deleted")
    assert sandbox not in network.list_sandboxes(network.node_prefix(pod.spec.node_name))
    assert not [pid for pid in pids if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
