"""The router's builders: the Deployment, its narrow RBAC, and the Service of ready leaders whose
EndpointSlices it follows."""

from __future__ import annotations

from typing import Any

import pytest
from largo.api.v1alpha1 import InferenceService
from largo.manifests import names
from largo.manifests.router import (
    build_replicas_service,
    build_router_account,
    build_router_budget,
    build_router_deployment,
)


def make(namespace: str | None = "ml", **spec: Any) -> InferenceService:
    metadata: dict[str, Any] = {"name": "chat"}
    if namespace is not None:
        metadata["namespace"] = namespace
    return InferenceService.from_body(
        {"metadata": metadata, "spec": {"model": {"claimName": "weights"}, **spec}}
    )


def test_the_replicas_service_is_headless_over_ready_leaders_on_the_runtime_port() -> None:
    manifest = build_replicas_service(make(runtime={"port": 9000}))
    assert manifest["metadata"] == {
        "name": "chat-replicas",
        "namespace": "ml",
        "labels": {"largo.dev/inferenceservice": "chat"},
    }
    spec = manifest["spec"]
    assert spec["clusterIP"] == "None"
    # Not ready means not listed: the router balances over ready leaders only.
    assert "publishNotReadyAddresses" not in spec
    assert spec["selector"] == {"largo.dev/inferenceservice": "chat", "largo.dev/member": "0"}
    assert spec["ports"] == [{"name": "http", "port": 9000, "targetPort": "http", "protocol": "TCP"}]


def test_the_router_may_only_read_endpointslices_of_its_namespace() -> None:
    account, role, binding = build_router_account(make())
    assert (account["kind"], account["metadata"]["name"]) == ("ServiceAccount", "chat-router")
    assert role["kind"] == "Role"
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["list", "watch"],
        }
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "chat-router",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-router", "namespace": "ml"}]


def test_the_router_deployment_runs_the_agent_with_its_contract() -> None:
    manifest = build_router_deployment(make(), image="registry.example/largo-router:1.0")
    assert manifest["metadata"]["name"] == "chat-router"
    # The Deployment is the service's (its deletion is noticed); its pods are not members.
    assert manifest["metadata"]["labels"] == {"largo.dev/inferenceservice": "chat"}
    spec = manifest["spec"]
    template = spec["template"]
    assert spec["selector"] == {"matchLabels": {"largo.dev/router": "chat"}}
    assert template["metadata"]["labels"] == {"largo.dev/router": "chat"}
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "9400"
    assert template["spec"]["serviceAccountName"] == "chat-router"
    (container,) = template["spec"]["containers"]
    assert container["image"] == "registry.example/largo-router:1.0"
    assert container["command"] == ["python", "-m", "largo.router.agent"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env == {
        "LARGO_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        "LARGO_SERVICE": "chat",
        "LARGO_REPLICAS_SERVICE": "chat-replicas",
        "LARGO_HTTP_PORT": "8080",
        "LARGO_METRICS_PORT": "9400",
        "LARGO_HOLD_TIMEOUT_SECONDS": "300",
        "LARGO_HOLD_KEEPALIVE_SECONDS": "15",
    }
    assert spec["replicas"] == 1
    assert "nodeSelector" not in template["spec"]
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("http", 8080),
        ("metrics", 9400),
    ]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # Everything a "restricted" PodSecurity namespace asks of a container.
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


@pytest.mark.parametrize("build", [build_replicas_service, build_router_account, build_router_deployment])
def test_builders_refuse_a_service_without_namespace(build: Any) -> None:
    with pytest.raises(ValueError, match=r"has no metadata\.namespace"):
        build(make(namespace=None))


def test_spec_router_sets_replicas_placement_the_hold_timeout_and_the_keepalive() -> None:
    toleration = {"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoSchedule"}
    manifest = build_router_deployment(
        make(
            router={
                "replicas": 2,
                "holdTimeoutSeconds": 30,
                "streamKeepaliveSeconds": 0,
                "nodeSelector": {"pool": "cpu"},
                "tolerations": [toleration],
            }
        )
    )
    pod_spec = manifest["spec"]["template"]["spec"]
    assert manifest["spec"]["replicas"] == 2
    assert pod_spec["nodeSelector"] == {"pool": "cpu"}
    assert pod_spec["tolerations"] == [toleration]
    env = {e["name"]: e.get("value") for e in pod_spec["containers"][0]["env"]}
    assert env["LARGO_HOLD_TIMEOUT_SECONDS"] == "30"
    assert env["LARGO_HOLD_KEEPALIVE_SECONDS"] == "0"
    assert "imagePullSecrets" not in pod_spec


def test_the_router_pulls_its_image_with_the_services_pull_secrets() -> None:
    service = make(podTemplate={"imagePullSecrets": [{"name": "registry"}, {"name": "mirror"}]})
    pod_spec = build_router_deployment(service)["spec"]["template"]["spec"]
    assert pod_spec["imagePullSecrets"] == [{"name": "registry"}, {"name": "mirror"}]


@pytest.mark.parametrize(
    ("router", "field"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": 17}, "replicas"),
        ({"holdTimeoutSeconds": 0}, "holdTimeoutSeconds"),
        ({"streamKeepaliveSeconds": -1}, "streamKeepaliveSeconds"),
        ({"streamKeepaliveSeconds": 301}, "streamKeepaliveSeconds"),
    ],
)
def test_router_settings_out_of_bounds_are_refused_naming_the_field(
    router: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        make(router=router)


def test_a_stopping_router_listens_until_the_service_stops_sending_then_drains_within_its_grace() -> None:
    spec = build_router_deployment(make(), "largo-router:1")["spec"]["template"]["spec"]
    [container] = spec["containers"]
    waits = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert waits >= 2  # kube-proxy and the Service's endpoints follow within a few seconds
    assert spec["terminationGracePeriodSeconds"] > waits + names.ROUTER_DRAIN_SECONDS


def test_a_drain_takes_the_routers_one_at_a_time_and_they_spread_over_nodes() -> None:
    """Two routers could land on one node and a drain could evict both at once: the entry point had
    none. A router that is not ready never blocks a drain."""
    budget = build_router_budget(make(router={"replicas": 2}))
    assert (budget["apiVersion"], budget["kind"], budget["metadata"]["name"]) == (
        "policy/v1",
        "PodDisruptionBudget",
        "chat-router",
    )
    assert budget["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": names.router_selector("chat")},
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    deployment = build_router_deployment(make(router={"replicas": 2}))
    template = deployment["spec"]["template"]
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    [spread] = template["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # a one-node cluster still gets its routers
    assert spread["labelSelector"] == {"matchLabels": template["metadata"]["labels"]}
