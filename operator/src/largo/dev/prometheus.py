"""A real Prometheus for tests and development, discovering targets through the local cluster's API
server (``kubernetes_sd_configs``) the way it would in a cluster, with largo's alert rules loaded."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from largo.dev.cluster import ClusterError, free_port, http_ok, wait_for
from largo.dev.processes import terminate_group
from largo.dev.tools import Tools

CHART_FILES = Path(__file__).resolve().parents[4] / "charts" / "largo" / "files"
RULES = CHART_FILES / "prometheus-rules.yaml"
DASHBOARD = CHART_FILES / "dashboard.json"


def host_address() -> str:
    """This machine's address as other hosts (and an EndpointSlice) would name it: not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: it only picks the outgoing address
        address: str = probe.getsockname()[0]
    return address


def scrape_config(kubeconfig: Path, namespaces: list[str]) -> dict[str, Any]:
    """The operator's job, as a cluster's Prometheus would have it: EndpointSlices of Services labelled
    app.kubernetes.io/name=largo, their port named ``metrics``."""
    return {
        "job_name": "largo-operator",
        "kubernetes_sd_configs": [
            {
                "role": "endpointslice",
                "kubeconfig_file": str(kubeconfig),
                "namespaces": {"names": namespaces},
            }
        ],
        "relabel_configs": [
            {
                "source_labels": ["__meta_kubernetes_service_label_app_kubernetes_io_name"],
                "regex": "largo",
                "action": "keep",
            },
            {
                "source_labels": ["__meta_kubernetes_endpointslice_port_name"],
                "regex": "metrics",
                "action": "keep",
            },
        ],
    }


def _annotated_pods_job(
    job_name: str,
    kubeconfig: Path,
    namespaces: list[str],
    keep: list[dict[str, Any]],
    labels: list[dict[str, Any]],
) -> dict[str, Any]:
    """A job over pods found as Prometheus finds annotated pods: ``prometheus.io/scrape: "true"``,
    then the ``keep`` rules, scraped at their pod IP and ``prometheus.io/port``, labelled by ``labels``,
    their namespace and their name."""
    return {
        "job_name": job_name,
        "kubernetes_sd_configs": [
            {"role": "pod", "kubeconfig_file": str(kubeconfig), "namespaces": {"names": namespaces}}
        ],
        "relabel_configs": [
            {
                "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
                "regex": "true",
                "action": "keep",
            },
            *keep,
            {
                "source_labels": [
                    "__meta_kubernetes_pod_ip",
                    "__meta_kubernetes_pod_annotation_prometheus_io_port",
                ],
                "regex": "(.+);(.+)",
                "replacement": "$1:$2",
                "target_label": "__address__",
            },
            *labels,
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ],
    }


def trainer_scrape_config(kubeconfig: Path, namespaces: list[str]) -> dict[str, Any]:
    """TrainJob pods (rank 0 carries the annotations), labelled with their job."""
    job = "__meta_kubernetes_pod_label_largo_dev_job_name"
    return _annotated_pods_job(
        "largo-trainers",
        kubeconfig,
        namespaces,
        keep=[{"source_labels": [job], "regex": ".+", "action": "keep"}],
        labels=[{"source_labels": [job], "target_label": "trainjob"}],
    )


def serving_scrape_config(kubeconfig: Path, namespaces: list[str]) -> dict[str, Any]:
    """InferenceService pods: the model servers (``inferenceservice`` = their service,
    ``component="server"``) and the routers (``component="router"``: per-replica ``haproxy_server_*``
    and ``largo_router_*``)."""
    service, router = (
        "__meta_kubernetes_pod_label_largo_dev_inferenceservice",
        "__meta_kubernetes_pod_label_largo_dev_router",
    )
    return _annotated_pods_job(
        "largo-serving",
        kubeconfig,
        namespaces,
        # One of the two labels, never both: replica members, or a router.
        keep=[{"source_labels": [service, router], "separator": "", "regex": ".+", "action": "keep"}],
        labels=[
            {"source_labels": [service, router], "separator": "", "target_label": "inferenceservice"},
            {"source_labels": [service], "regex": ".+", "replacement": "server", "target_label": "component"},
            {"source_labels": [router], "regex": ".+", "replacement": "router", "target_label": "component"},
        ],
    )


def publish_operator(api: Any, namespace: str, metrics_url: str) -> None:
    """A Service and an EndpointSlice for an operator running on this machine (not in a pod), as the
    chart's Service publishes one in a cluster: the slice names this machine's address."""
    from kubernetes import client

    port = urllib.parse.urlsplit(metrics_url).port
    # JSON-shaped bodies, as the API takes them.
    core: Any = client.CoreV1Api(api)
    discovery: Any = client.DiscoveryV1Api(api)
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "largo-operator-metrics", "labels": {"app.kubernetes.io/name": "largo"}},
            "spec": {"ports": [{"name": "metrics", "port": port, "targetPort": port}]},
        },
    )
    discovery.create_namespaced_endpoint_slice(
        namespace,
        {
            "metadata": {
                "name": "largo-operator-metrics",
                "labels": {"kubernetes.io/service-name": "largo-operator-metrics"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [host_address()], "conditions": {"ready": True}}],
            "ports": [{"name": "metrics", "port": port, "protocol": "TCP"}],
        },
    )


def dashboard_queries(
    dashboard: Mapping[str, Any], rows: set[str] | None = None, rate_interval: str = "1m"
) -> list[str]:
    """Every panel's PromQL (of the named rows only, when given), with Grafana's ``$__rate_interval``
    made concrete."""
    queries = []
    row = ""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            row = str(panel.get("title"))
            continue
        if rows is not None and row not in rows:
            continue
        queries += [
            target["expr"].replace("$__rate_interval", rate_interval) for target in panel.get("targets") or []
        ]
    return queries


class PrometheusServer:
    def __init__(self, tools: Tools, kubeconfig: Path, namespaces: list[str], interval: str = "1s") -> None:
        self.tools = tools
        self.workdir = Path(tempfile.mkdtemp(prefix="largo-prometheus-"))
        self.url = f"http://127.0.0.1:{free_port()}"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                scrape_config(kubeconfig, namespaces),
                trainer_scrape_config(kubeconfig, namespaces),
                serving_scrape_config(kubeconfig, namespaces),
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        log = (self.workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                self.tools.path("prometheus"),
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={urllib.parse.urlsplit(self.url).netloc}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: http_ok(f"{self.url}/-/ready"), timeout, "Prometheus ready", self.assert_alive)

    def assert_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            tail = (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]
            raise ClusterError(f"Prometheus is not running; log tail:\n{tail}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        if answer.get("status") != "success":
            raise ClusterError(f"query {promql!r} failed: {answer}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of an instant query, or None when it returns nothing."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.process is not None:
            terminate_group(self.process, 10)
        shutil.rmtree(self.workdir, ignore_errors=True)
