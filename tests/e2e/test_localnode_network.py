"""Services and DNS on localnode: kube-proxy (nftables) routes ClusterIPs from pods and from the host,
CoreDNS answers Service, headless and pod names, as in a real cluster."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config
from largo.dev.cluster import LocalCluster, wait_for
from localnode_namespaces import fresh_namespace

pytestmark = pytest.mark.e2e

LOCALNODE = {"largo.dev/localnode": "true"}

# Answers every GET with its pod's name.
WEB = """
import http.server, os
class Name(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ["HOSTNAME"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Name).serve_forever()
"""

# Resolves and calls the Service as a client pod would, and prints what it found.
CLIENT = """
import json, os, socket, urllib.request
namespace, web_ip, cluster_ip = os.environ["NAMESPACE"], os.environ["WEB_IP"], os.environ["CLUSTER_IP"]
found = {
    "short": socket.gethostbyname("web"),
    "fqdn": socket.gethostbyname(f"web.{namespace}.svc.cluster.local"),
    "headless": sorted({a[4][0] for a in socket.getaddrinfo("web-pods", 8000, socket.AF_INET)}),
    "pod": socket.gethostbyname(web_ip.replace(".", "-") + f".{namespace}.pod.cluster.local"),
    "by_name": urllib.request.urlopen("http://web/", timeout=5).read().decode(),
    "by_ip": urllib.request.urlopen(f"http://{cluster_ip}/", timeout=5).read().decode(),
}
print(json.dumps(found))
"""


@pytest.fixture
def namespace(local_cluster: LocalCluster) -> Iterator[str]:
    with fresh_namespace(local_cluster, "net") as name:
        yield name


def _pod(
    name: str,
    script: str,
    labels: dict[str, str],
    env: dict[str, str],
    restart: str,
    probe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeSelector": LOCALNODE,
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11",
                    "command": ["python", "-c", script],
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                    **({"readinessProbe": probe} if probe else {}),
                }
            ],
        },
    }


def test_cluster_ips_route_and_cluster_names_resolve_from_pods_and_the_host(
    local_cluster: LocalCluster, namespace: str
) -> None:
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(local_cluster.kubeconfig)))
    web = _pod("web", WEB, {"app": "web"}, {}, "Always", {"tcpSocket": {"port": 8000}, "periodSeconds": 1})
    core.create_namespaced_pod(namespace, web)
    ports = [{"name": "http", "port": 80, "targetPort": 8000}]
    core.create_namespaced_service(
        namespace, {"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": ports}}
    )
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "web-pods"},
            "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": ports},
        },
    )

    def web_ip() -> str | None:
        pod = core.read_namespaced_pod("web", namespace)
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        return str(pod.status.pod_ip) if ready and pod.status.pod_ip else None

    wait_for(lambda: web_ip() is not None, 60, "the web pod ready")
    cluster_ip = core.read_namespaced_service("web", namespace).spec.cluster_ip

    # From the host: kube-proxy's rules apply to the host's own connections too.
    def from_host() -> str | None:
        try:
            return str(urllib.request.urlopen(f"http://{cluster_ip}/", timeout=2).read().decode())
        except OSError:
            return None  # the endpoints are not programmed yet

    wait_for(lambda: from_host() == "web", 30, "the ClusterIP answering from the host")

    address = str(web_ip())
    env = {"NAMESPACE": namespace, "WEB_IP": address, "CLUSTER_IP": cluster_ip}
    core.create_namespaced_pod(namespace, _pod("client", CLIENT, {}, env, "Never"))

    def finished() -> bool:
        phase = core.read_namespaced_pod("client", namespace).status.phase
        assert phase != "Failed", core.read_namespaced_pod_log("client", namespace)
        return phase == "Succeeded"

    wait_for(finished, 60, "the client pod to finish")
    found = json.loads(core.read_namespaced_pod_log("client", namespace).strip().splitlines()[-1])
    assert found == {
        "short": cluster_ip,
        "fqdn": cluster_ip,
        "headless": [address],
        "pod": address,
        "by_name": "web",
        "by_ip": "web",
    }
