"""Shared fixtures: one local cluster per test session (the same code as `largo dev up`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client, config
from largo.dev.cluster import ClusterSpec, LocalCluster, NodePool, wait_for
from largo.dev.operator_process import OperatorProcess

REPO = Path(__file__).resolve().parents[1]


# Short delays keep the lifecycle tests quick; the behaviour is the same as with defaults.
QUICK_OPERATOR_ENV = {
    "LARGO_RESTART_BACKOFF_SECONDS": "1",
    "LARGO_RESTART_BACKOFF_MAX_SECONDS": "2",
    "LARGO_BINDING_TIMEOUT_SECONDS": "10",
    "LARGO_PROGRESS_STALE_SECONDS": "3",
    # A node not Ready this long is lost (test_a_node_not_ready_restarts_the_gang_after_its_grace).
    "LARGO_NODE_LOST_SECONDS": "3",
    # Streams of resources nothing changes are reconnected within a test (counted in the metrics).
    "LARGO_WATCH_INACTIVITY_SECONDS": "30",
}


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster(ClusterSpec(node_pools=(NodePool(count=2, name_prefix="shared-gpu"),)))
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def api(cluster: LocalCluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace per test, ready for pods (its default ServiceAccount exists)."""
    core = client.CoreV1Api(api)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})

    def has_default_account() -> bool:
        return any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items)

    wait_for(has_default_account, 60, f"ServiceAccount default in {name}")
    yield name
    core.delete_namespace(name)


PoolFactory = Callable[..., NodePool]


@pytest.fixture
def make_pool(cluster: LocalCluster) -> PoolFactory:
    """Fake GPU nodes of the test's own, selected by a label, so capacity tests do not interfere."""

    def make(
        count: int = 2, gpus: int = 8, nodes_per_rack: int = 0, extended: dict[str, str] | None = None
    ) -> NodePool:
        pool_id = uuid.uuid4().hex[:6]
        pool = NodePool(
            count=count,
            gpus=gpus,
            name_prefix=f"pool-{pool_id}",
            labels={"largo.dev/test-pool": pool_id},
            nodes_per_rack=nodes_per_rack,
            extended=extended or {},
        )
        cluster.add_nodes(pool)
        return pool

    return make


@pytest.fixture
def gpu_pool(make_pool: PoolFactory) -> NodePool:
    """Two 8-GPU nodes of the test's own."""
    return make_pool()


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster, api: client.ApiClient) -> None:
    """largo's CRDs as generated into crds/, applied and Established."""
    cluster.install_crds(REPO / "crds")


@pytest.fixture(scope="session")
def operator(
    cluster: LocalCluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator, started once per session; tests may kill and restart it."""
    process = OperatorProcess(
        cluster.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", QUICK_OPERATOR_ENV
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
