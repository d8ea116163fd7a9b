"""A real Prometheus: it discovers the operator through the API server (kubernetes_sd, EndpointSlices)
as it would in a cluster, PromQL sees a gang's GPUs come and go, and largo's alert rules load and
pass their promtool unit tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from largo.dev.cluster import LocalCluster, NodePool, wait_for
from largo.dev.prometheus import RULES, PrometheusServer, publish_operator
from trainjobs import TIMEOUT, Jobs

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1] / "prometheus"


def test_the_alert_rules_pass_their_unit_tests(cluster: LocalCluster) -> None:
    promtool = cluster.tools.path("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yaml"],
        cwd=TESTS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


@pytest.fixture
def prometheus(
    cluster: LocalCluster, api: client.ApiClient, namespace: str, operator: Any
) -> Iterator[PrometheusServer]:
    """Prometheus, and the operator's /metrics published as the chart's Service would publish it."""
    publish_operator(api, namespace, operator.metrics_url)
    server = PrometheusServer(cluster.tools, cluster.kubeconfig, [namespace])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_prometheus_discovers_the_operator_and_sees_a_gang_s_gpus(
    prometheus: PrometheusServer, api: client.ApiClient, namespace: str, operator: Any, gpu_pool: NodePool
) -> None:
    wait_for(
        lambda: prometheus.value('up{job="largo-operator"}') == 1,
        TIMEOUT,
        "the operator scraped",
        prometheus.assert_alive,
    )
    rules = prometheus.api("/api/v1/rules")["data"]["groups"][0]["rules"]
    assert {rule["name"] for rule in rules} >= {"LargoQueueStuck", "LargoRestartStorm", "LargoOperatorDown"}
    assert all(rule["health"] == "ok" for rule in rules)

    held = f'sum(largo_node_gpus_allocated{{owner="largo", node=~"{gpu_pool.name_prefix}-.*"}})'
    jobs = Jobs(api, namespace, operator)
    jobs.create("scraped", gpu_pool, num_nodes=2, gpus=8)
    jobs.wait_phase("scraped", "Running")
    wait_for(lambda: prometheus.value(held) == 16, TIMEOUT, "16 GPUs held by largo, in PromQL")
    assert (prometheus.value(f'sum(largo_node_gpus_free{{node=~"{gpu_pool.name_prefix}-.*"}})') or 0) == 0
    assert (prometheus.value("largo_queue_wait_seconds_count") or 0) >= 1
    assert prometheus.value("largo_leader") == 1

    jobs.exit("scraped", 0)
    jobs.wait_phase("scraped", "Succeeded")
    wait_for(lambda: prometheus.value(held) == 0, TIMEOUT, "the GPUs given back, in PromQL")
