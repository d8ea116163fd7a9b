"""InferenceService autoscaling end to end on localnode nodes: real server processes in their own network
namespaces export their load on /metrics, the operator scrapes the ready leaders every 2 s, and the
service scales up under load and back down when it stops, each decision in its status.

The server here is a stand-in that reports the load the test sets (a file on a hostPath volume): the
decision loop, the scrape over the pod network and the writes are the real ones. The model server
itself is the serving runtime's to test."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from largo.dev.cluster import LocalCluster, wait_for
from largo.dev.operator_process import OperatorProcess
from localnode_namespaces import fresh_namespace
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "largo.dev", "v1alpha1", "inferenceservices"

# Serves `largo_serve_requests_in_flight` (docs/serving.md) with the number in $LOAD_FILE.
LOAD_SERVER = """
import http.server, os
class Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            load = open(os.environ["LOAD_FILE"]).read().strip() or "0"
        except OSError:
            load = "0"
        body = f"largo_serve_requests_in_flight {float(load)}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["LARGO_METRICS_PORT"])), Metrics).serve_forever()
"""

# Answers every POST on the `http` port with its pod's name, and reports no load on /metrics.
ECHO_SERVER = """
import http.server, json, os, threading
class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"largo_serve_requests_in_flight 0\\n" if self.path == "/metrics" else b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.dumps({"replica": os.environ["HOSTNAME"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
for port in ("LARGO_METRICS_PORT", "LARGO_HTTP_PORT"):
    server = http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ[port])), Echo)
    threading.Thread(target=server.serve_forever).start()
"""


@pytest.fixture
def namespace(local_cluster: LocalCluster) -> Iterator[str]:
    with fresh_namespace(local_cluster, "e2e") as name:
        yield name


def test_load_scales_the_service_up_and_its_end_scales_it_down(
    local_cluster: LocalCluster, local_operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    api = config.new_client_from_config(config_file=str(local_cluster.kubeconfig))
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    load = tmp_path / "load"
    load.write_text("0")
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "weights"},
            "spec": {
                "storageClassName": "largo-local",
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": "echo"},
        "spec": {
            "model": {"claimName": "weights"},
            "runtime": {
                "type": "custom",
                "image": "largo-trainer:dev",
                "command": ["python", "-c", LOAD_SERVER],
            },
            "env": [{"name": "LOAD_FILE", "value": "/load/load"}],
            "resourcesPerNode": {"cpu": "100m", "memory": "64Mi"},
            "replicas": 1,
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "target": 2,
                "stableWindowSeconds": 6,
                "scaleDownDelaySeconds": 6,
            },
            "podTemplate": {
                "nodeSelector": {"largo.dev/localnode": "true"},
                "terminationGracePeriodSeconds": 2,
                "volumes": [{"name": "load", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
                "volumeMounts": [{"name": "load", "mountPath": "/load"}],
            },
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def status() -> dict[str, Any]:
        found: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "echo")
        return found.get("status") or {}

    def wait(predicate: Any, what: str) -> dict[str, Any]:
        wait_for(lambda: predicate(status()), 180, what, local_operator.assert_alive)
        return status()

    wait(lambda s: s.get("ready") == "1/1", "one replica ready")
    load.write_text("6")  # 6 in flight at a target of 2 per replica: 3 replicas
    up = wait(lambda s: s.get("ready") == "3/3", "three replicas ready under load")
    first = up["scaling"][0]
    assert (first["from"], first["to"]) == (1, 3)
    assert first["metricValue"] > 0  # the stable window's load the decision saw
    assert "panic" in first["reason"] or "target 2" in first["reason"]

    scraped = urllib.request.urlopen(local_operator.metrics_url, timeout=5).read().decode()
    ups = [
        sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == "largo_autoscaler_decisions_total" and sample.labels == {"direction": "up"}
    ]
    assert ups
    assert ups[0] >= 1

    load.write_text("0")
    down = wait(lambda s: s.get("ready") == "1/1" and s.get("replicas") == 1, "back to one replica")
    downs = [d for d in down["scaling"] if d["to"] < d["from"]]
    assert downs[0]["from"] == 3
    assert downs[-1]["to"] == 1
    assert all("load" in d["reason"] for d in downs)
    spec = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "echo")["spec"]
    assert spec["replicas"] == 1  # written by largo, which owns it with autoscaling

    def told() -> set[str]:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=echo").items
        return {event.reason for event in events}

    # An event follows the status write that decided it: waited for, not read at once (CI once saw the
    # status back at one replica before the GroupRetired event was posted).
    wait_for(lambda: {"Scaled", "GroupAdmitted", "GroupRetired"} <= told(), 30, "the scaling events")


def accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


def test_a_request_at_zero_replicas_is_held_by_the_router_brings_one_up_and_is_answered(
    local_cluster: LocalCluster, local_operator: OperatorProcess, namespace: str
) -> None:
    """The router (HAProxy and its agent, in a pod on a localnode node) holds the request; the
    autoscaler reads the held count and scales 0 -> 1; the replica's EndpointSlice turns ready and the
    held request is answered by it. The request goes to the service's address, its ClusterIP (routed
    by kube-proxy), as a client in the cluster would send it."""
    api = config.new_client_from_config(config_file=str(local_cluster.kubeconfig))
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "weights"},
            "spec": {
                "storageClassName": "largo-local",
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    localnode = {"largo.dev/localnode": "true"}
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": "idle"},
        "spec": {
            "model": {"claimName": "weights"},
            "runtime": {
                "type": "custom",
                "image": "largo-trainer:dev",
                "command": ["python", "-c", ECHO_SERVER],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            },
            "resourcesPerNode": {"cpu": "100m", "memory": "64Mi"},
            "replicas": 0,
            "autoscaling": {"maxReplicas": 2, "target": 4, "stableWindowSeconds": 6, "scaleToZero": True},
            "router": {"nodeSelector": localnode, "holdTimeoutSeconds": 120},
            "podTemplate": {"nodeSelector": localnode, "terminationGracePeriodSeconds": 2},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def router_address() -> str | None:
        for pod in core.list_namespaced_pod(namespace, label_selector="largo.dev/router=idle").items:
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
            if ready and pod.status.pod_ip:
                return str(pod.status.pod_ip)
        return None

    wait_for(lambda: router_address() is not None, 120, "the router ready", local_operator.assert_alive)
    address = router_address()
    cluster_ip = core.read_namespaced_service("idle", namespace).spec.cluster_ip
    # kube-proxy routes the ClusterIP to the router once it has seen the ready endpoint; until then a
    # connection is refused, as it would be for any client. A bare connection holds no request.
    wait_for(lambda: accepts(cluster_ip, 80), 60, "the service routing", local_operator.assert_alive)
    request = urllib.request.Request(
        f"http://{cluster_ip}/v1/completions",
        data=json.dumps({"prompt": "hi", "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=150) as answer:
        assert answer.status == 200
        assert json.loads(answer.read()) == {"replica": "idle-r0-node-0"}
    found = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "idle")
    first = found["status"]["scaling"][0]
    assert (first["from"], first["to"]) == (0, 1)
    assert first["metricValue"] > 0  # the held request, as the router counted it

    # Now a replica is ready: once HAProxy has it as a server (the activator forwards to a replica as
    # soon as its EndpointSlice is ready; the agent then adds it to HAProxy), the next request goes to
    # it directly.
    def router_samples(name: str, by: str, **where: str) -> dict[str | None, float]:
        metrics = urllib.request.urlopen(f"http://{address}:9400/metrics", timeout=5).read().decode()
        return {
            sample.labels.get(by): sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in where.items())
        }

    wait_for(
        lambda: router_samples("largo_router_replicas", "state").get("ready") == 1,
        30,
        "HAProxy balancing over the replica",
        local_operator.assert_alive,
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read()) == {"replica": "idle-r0-node-0"}
    served = router_samples("haproxy_server_sessions_total", "server", proxy="replicas")
    assert served.get("idle-r0-node-0") == 1  # the second request; the first went through the activator
