"""A fresh namespace for an e2e test on the local cluster, shared by the test modules."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from kubernetes import client, config
from largo.dev.cluster import LocalCluster, wait_for


@contextlib.contextmanager
def fresh_namespace(cluster: LocalCluster, prefix: str) -> Iterator[str]:
    """A namespace of its own, ready for pods (its default ServiceAccount exists); deleted after."""
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for(
        lambda: any(a.metadata.name == "default" for a in core.list_namespaced_service_account(name).items),
        60,
        "the default ServiceAccount",
    )
    try:
        yield name
    finally:
        core.delete_namespace(name)
