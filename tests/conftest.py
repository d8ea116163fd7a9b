"""Shared fixtures: one local cluster per test session (the same code as `largo dev up`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from largo.dev.cluster import ClusterSpec, LocalCluster, NodePool, wait_for


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


@pytest.fixture
def gpu_pool(cluster: LocalCluster) -> NodePool:
    """Two 8-GPU nodes of the test's own, selected by a label, so capacity tests do not interfere."""
    pool_id = uuid.uuid4().hex[:6]
    pool = NodePool(count=2, name_prefix=f"pool-{pool_id}", labels={"largo.dev/test-pool": pool_id})
    cluster.add_nodes(pool)
    return pool
