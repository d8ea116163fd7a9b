"""Pure builders: an InferenceService's router (docs/serving.md, "The router"): the Deployment that
runs HAProxy with largo's agent, the ServiceAccount and Role that let it watch the replicas'
EndpointSlices, and the headless Service of the ready leaders that those EndpointSlices describe.

The router's pods carry ``largo.dev/router``, never ``largo.dev/inferenceservice``: the controller
counts every pod with the latter as a replica-group member.
"""

from __future__ import annotations

from typing import Any

from largo.api.v1alpha1 import InferenceService
from largo.manifests import names
from largo.manifests.pods import image_pull_secrets

JSON = dict[str, Any]

DEFAULT_ROUTER_IMAGE = "largo-router:dev"
ROUTER_COMMAND = ["python", "-m", "largo.router.agent"]


# Seconds a stopping router keeps listening before HAProxy's soft stop.
PRE_STOP_SECONDS = 5


def _metadata(service: InferenceService, name: str) -> JSON:
    if not service.metadata.namespace:
        raise ValueError(f"InferenceService {service.metadata.name} has no metadata.namespace")
    return {
        "name": name,
        "namespace": service.metadata.namespace,
        "labels": {names.LABEL_SERVICE: service.metadata.name},
    }


def build_replicas_service(service: InferenceService) -> JSON:
    """Headless, ready leaders only: its EndpointSlices are the router's list of replicas."""
    name = service.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(service, names.replicas_service(name)),
        "spec": {
            "clusterIP": "None",
            "selector": names.leader_selector(name),
            "ports": [
                {
                    "name": names.HTTP_PORT_NAME,
                    "port": service.spec.runtime.port,
                    "targetPort": names.HTTP_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_router_account(service: InferenceService) -> list[JSON]:
    """ServiceAccount, Role and RoleBinding: the router reads EndpointSlices of its namespace, nothing
    else."""
    name = names.router_name(service.metadata.name)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(service, name)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(service, name),
            "rules": [
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(service, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": service.metadata.namespace}],
        },
    ]


def _probe(path: str, period: int, failures: int) -> JSON:
    # A generous timeout: on a node busy serving, one slow answer must not pull the entry point.
    return {
        "httpGet": {"path": path, "port": names.METRICS_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def build_router_budget(service: InferenceService) -> JSON:
    """A drain evicts the router's pods one at a time: with two or more, the entry point keeps one
    (each balances on its own). One that is not ready may always go (``AlwaysAllow``): a router that
    cannot start must not block a node's drain."""
    name = service.metadata.name
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(service, names.router_name(name)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": names.router_selector(name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_router_deployment(service: InferenceService, image: str = DEFAULT_ROUTER_IMAGE) -> JSON:
    """``spec.router.replicas`` router pods, replaced surge-first so that the entry point never has
    none ready."""
    name = service.metadata.name
    settings = service.spec.router
    labels = names.router_selector(name)
    container: JSON = {
        "name": "router",
        "image": image,
        "command": ROUTER_COMMAND,
        "env": [
            {"name": "LARGO_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "LARGO_SERVICE", "value": name},
            {"name": "LARGO_REPLICAS_SERVICE", "value": names.replicas_service(name)},
            {"name": "LARGO_HTTP_PORT", "value": str(names.ROUTER_HTTP_PORT)},
            {"name": "LARGO_METRICS_PORT", "value": str(names.METRICS_PORT)},
            {"name": "LARGO_HOLD_TIMEOUT_SECONDS", "value": str(settings.hold_timeout_seconds)},
            {"name": "LARGO_HOLD_KEEPALIVE_SECONDS", "value": str(settings.stream_keepalive_seconds)},
        ],
        "ports": [
            {"name": names.HTTP_PORT_NAME, "containerPort": names.ROUTER_HTTP_PORT, "protocol": "TCP"},
            {"name": names.METRICS_PORT_NAME, "containerPort": names.METRICS_PORT, "protocol": "TCP"},
        ],
        # The Service and kube-proxy take a moment to stop sending to a pod that is stopping: HAProxy
        # keeps listening that long before its soft stop, or those connections would be refused.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "readinessProbe": _probe("/readyz", period=2, failures=3),
        "livenessProbe": _probe("/healthz", period=10, failures=3),
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
        # What a "restricted" PodSecurity namespace asks of a container (the image runs as uid 1000).
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(service, names.router_name(name)),
        "spec": {
            "replicas": settings.replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(names.METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": names.router_name(name),
                    # The pre-stop wait, then the agent's drain of requests in flight, then a margin.
                    "terminationGracePeriodSeconds": PRE_STOP_SECONDS + names.ROUTER_DRAIN_SECONDS + 5,
                    "containers": [container],
                    # Several routers on one node would fall together: spread where the nodes allow.
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": labels},
                        }
                    ],
                    # The router's image is often in the same private registry as the server's.
                    **(
                        {"imagePullSecrets": image_pull_secrets(service.spec.pod_template)}
                        if service.spec.pod_template.image_pull_secrets
                        else {}
                    ),
                    **({"nodeSelector": dict(settings.node_selector)} if settings.node_selector else {}),
                    **(
                        {"tolerations": [dict(t) for t in settings.tolerations]}
                        if settings.tolerations
                        else {}
                    ),
                },
            },
        },
    }
