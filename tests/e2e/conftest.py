"""A local cluster of its own for the end-to-end tests: two localnode nodes whose pods are real
processes, and the operator. Needs root (network namespaces and mounts), as localnode does."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from largo.dev.cluster import ClusterSpec, LocalCluster, LocalNodePool, NodePool
from largo.dev.operator_process import OperatorProcess

REPO = Path(__file__).resolve().parents[2]


def _cannot_run(why: str) -> None:
    """Skipped on a developer's machine without what localnode needs; in CI (CI set) a failure: a run
    whose localnode suites all skipped passed with none of them run."""
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the localnode suites: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="package")
def local_cluster() -> Iterator[LocalCluster]:
    if os.geteuid() != 0:
        _cannot_run("localnode needs root to create network namespaces and mounts")
    if shutil.which("ip") is None:
        _cannot_run("localnode needs iproute2's `ip` (Debian package iproute2)")
    probe = f"largo-probe-{os.getpid()}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if created.returncode != 0:
        _cannot_run(f"network namespaces are not available here: {created.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], check=True)
    # One kwok node beside them: both kinds serve one cluster (pods here select localnode nodes).
    spec = ClusterSpec(
        node_pools=(NodePool(count=1, name_prefix="kwok"),), local_nodes=(LocalNodePool(count=2),)
    )
    cluster = LocalCluster(spec)
    cluster.start()
    try:
        cluster.install_crds(REPO / "crds")
        yield cluster
    finally:
        cluster.stop()
    # A stopped cluster leaves no pod network namespace (nor, with it, any pod process or mount), and
    # no kube-proxy rule.
    assert cluster.pod_network_leftovers() == []
    assert cluster.service_network_leftovers() == []


@pytest.fixture(scope="package")
def local_operator(local_cluster: LocalCluster) -> Iterator[OperatorProcess]:
    env = {"LARGO_RESTART_BACKOFF_SECONDS": "1", "LARGO_RESTART_BACKOFF_MAX_SECONDS": "2"}
    process = OperatorProcess(local_cluster.kubeconfig, local_cluster.workdir / "operator.log", env)
    process.start()
    try:
        yield process
    finally:
        process.stop()
