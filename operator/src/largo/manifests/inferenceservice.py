"""Pure builders: InferenceService -> its Services and the pods of its replica groups (docs/serving.md).

Nothing here talks to the API server; owner references are added by the caller.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from largo.api.v1alpha1 import GPU_RESOURCE, InferenceService, InferenceServiceSpec, RuntimeType
from largo.manifests import names
from largo.manifests.pods import (
    add_shared_memory,
    carried_scheduling,
    equal_resources,
    gpu_tolerations,
    pinned_pod_spec,
)
from largo.manifests.vllm import VLLM_IMAGE, vllm_launch
from largo.sched.quantity import parse_resources

JSON = dict[str, Any]

# The built-in server's entry point in the runtime image (largo.runtime).
LARGO_SERVER_COMMAND = ["python", "-m", "largo.runtime.serve"]
# The image the `largo` runtime uses unless the service names one: the operator's (chart value).
DEFAULT_SERVER_IMAGE = "largo-trainer:dev"
# Every member of a group waits this long after its deletion before its SIGTERM, so that the routers
# have taken its leader out (the EndpointSlice marks it terminating at once) before it refuses requests.
SERVER_PRE_STOP_SECONDS = 5
# Kubernetes' terminationGracePeriodSeconds when the pod template leaves it unset.
DEFAULT_GRACE_SECONDS = 30
# Of the grace left after the preStop, what the server's drain leaves for its own exit.
EXIT_MARGIN_SECONDS = 3


def _grace_seconds(spec: InferenceServiceSpec) -> int:
    grace = spec.pod_template.termination_grace_period_seconds
    return DEFAULT_GRACE_SECONDS if grace is None else grace


def pre_stop_seconds(spec: InferenceServiceSpec) -> int:
    """The preStop sleep: SERVER_PRE_STOP_SECONDS, shorter where the grace period is (the API server
    refuses a sleep that is not less than it); 0 (none) with a grace period of 1 s or 0."""
    return min(SERVER_PRE_STOP_SECONDS, max(_grace_seconds(spec) - 1, 0))


def drain_seconds(spec: InferenceServiceSpec) -> int:
    """How long the server may finish in-flight requests after its SIGTERM: the pod's grace period
    (``podTemplate.terminationGracePeriodSeconds``) less the preStop and a margin to exit."""
    return max(_grace_seconds(spec) - pre_stop_seconds(spec) - EXIT_MARGIN_SECONDS, 0)


@dataclass(frozen=True, slots=True)
class ModelMount:
    """The model a revision serves, resolved from spec.model: the claim to mount, where inside it, and
    for a TrainJob's checkpoints the step to load."""

    claim_name: str
    sub_path: str | None = None
    directory: str = names.MODEL_MOUNT
    step: int | None = None
    train_job: str | None = None

    def summary(self) -> str:
        if self.train_job is not None:
            return f"{self.train_job}@step-{self.step}" if self.step is not None else self.train_job
        return f"{self.claim_name}/{self.sub_path}" if self.sub_path else self.claim_name


def gpus_per_pod(spec: InferenceServiceSpec) -> int:
    return int(spec.resources_per_node.get(GPU_RESOURCE, 0))


def per_pod_requests(spec: InferenceServiceSpec) -> dict[str, int]:
    """One member's requests in the scheduler's canonical units (as for a TrainJob pod)."""
    return parse_resources(dict(sorted(spec.resources_per_node.items())))


def server_image(spec: InferenceServiceSpec, default_image: str = DEFAULT_SERVER_IMAGE) -> str:
    if spec.runtime.image is not None:
        return spec.runtime.image
    return VLLM_IMAGE if spec.runtime.type is RuntimeType.VLLM else default_image


_WHOLE = re.compile(r"[0-9]+")


def revision(spec: InferenceServiceSpec, model: ModelMount, default_image: str = DEFAULT_SERVER_IMAGE) -> str:
    """A hash of everything that shapes a replica group's pods: groups of one revision are alike, and a
    new revision (image, args, model, runtime, resources, ...) is rolled out group by group."""
    shaping = spec.model_dump(
        mode="json",
        by_alias=True,
        exclude_none=True,
        include={"runtime", "nodes_per_replica", "resources_per_node", "env", "pod_template"},
    )
    # Spellings of one pod hash alike (a tool that writes `args: []` or `cpu: "8"` where the last apply
    # had none or 8 rolled every group): empty lists the pods do not show are dropped, and whole-number
    # quantities are numbers. A spec written without these spellings hashes as before (an operator
    # upgrade rolls it not); one written with them rolls once.
    for section, key in (("runtime", "args"), ("runtime", "command"), ("podTemplate", "imagePullSecrets")):
        if shaping.get(section, {}).get(key) == []:
            del shaping[section][key]
    shaping["resourcesPerNode"] = {
        name: int(quantity) if isinstance(quantity, str) and _WHOLE.fullmatch(quantity) else quantity
        for name, quantity in shaping.get("resourcesPerNode", {}).items()
    }
    shaping["image"] = server_image(spec, default_image)
    shaping["model"] = [model.claim_name, model.sub_path, model.directory, model.step]
    placed = carried_scheduling(spec.scheduling)
    if placed:
        shaping["scheduling"] = placed
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _namespace(service: InferenceService) -> str:
    if not service.metadata.namespace:
        raise ValueError(f"InferenceService {service.metadata.name} has no metadata.namespace")
    return service.metadata.namespace


def build_service(service: InferenceService) -> JSON:
    """The stable address: port 80 to the router's `http` port (the router balances over the ready
    leaders; docs/serving.md)."""
    name = service.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": _namespace(service), "labels": {names.LABEL_SERVICE: name}},
        "spec": {
            "selector": names.router_selector(name),
            "ports": [
                {
                    "name": names.HTTP_PORT_NAME,
                    "port": names.SERVICE_PORT,
                    "targetPort": names.HTTP_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_members_service(service: InferenceService) -> JSON:
    """Headless, ready or not: a group's workers resolve their leader while it still loads the model."""
    name = service.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": names.members_service(name),
            "namespace": _namespace(service),
            "labels": {names.LABEL_SERVICE: name},
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {names.LABEL_SERVICE: name},
            "ports": [
                {
                    "name": names.RENDEZVOUS_PORT_NAME,
                    "port": names.MASTER_PORT,
                    "targetPort": names.MASTER_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def contract_env(service: InferenceService, model: ModelMount, replica: int, member: int) -> list[JSON]:
    """The variables every member gets (docs/serving.md)."""
    spec = service.spec
    name = service.metadata.name
    namespace = _namespace(service)
    values = {
        "LARGO_SERVICE": name,
        "LARGO_SERVICE_NAMESPACE": namespace,
        "LARGO_REPLICA": str(replica),
        "LARGO_MEMBER": str(member),
        "LARGO_MEMBERS": str(spec.nodes_per_replica),
        "LARGO_LEADER_ADDR": names.leader_addr(name, namespace, replica),
        "LARGO_LEADER_PORT": str(names.MASTER_PORT),
        "LARGO_BACKEND": "nccl" if gpus_per_pod(spec) > 0 else "gloo",
        "LARGO_MODEL_DIR": model.directory,
        "LARGO_SERVED_MODEL_NAME": name,
        "LARGO_HTTP_PORT": str(spec.runtime.port),
        "LARGO_METRICS_PORT": str(names.METRICS_PORT),
        "LARGO_DRAIN_SECONDS": str(drain_seconds(spec)),
    }
    if model.step is not None:
        values["LARGO_MODEL_STEP"] = str(model.step)
    return [{"name": key, "value": value} for key, value in values.items()]


def pod_tolerations(service: InferenceService) -> list[JSON]:
    """The user's tolerations, plus the GPU taint's for GPU pods (as for a TrainJob)."""
    return gpu_tolerations(service.spec.pod_template, gpus_per_pod(service.spec))


# How long a probe waits for its answer: Kubernetes' default, 1 s, is missed by a busy server's event
# loop (vLLM's answers /health on the loop its API runs on), which then flapped unready under load, was
# drained by the router and, past liveness's threshold, restarted with its whole group.
PROBE_TIMEOUT_SECONDS = 3
LIVENESS_TIMEOUT_SECONDS = 5


def _http_probe(
    path: str, port: int, period: int, failures: int, timeout: int = PROBE_TIMEOUT_SECONDS
) -> JSON:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _launch(
    service: InferenceService, model: ModelMount, replica: int, member: int
) -> tuple[list[str], list[str]]:
    """(command, args) of a member's container for the service's runtime."""
    spec = service.spec
    runtime = spec.runtime
    user_args = list(runtime.args or [])
    if runtime.type is RuntimeType.CUSTOM:
        return list(runtime.command or []), user_args
    if runtime.type is RuntimeType.VLLM:
        name, namespace = service.metadata.name, _namespace(service)
        launch = vllm_launch(
            model_dir=model.directory,
            served_model_name=name,
            gpus_per_pod=gpus_per_pod(spec),
            pods_per_replica=spec.nodes_per_replica,
            member=member,
            leader_address=names.leader_addr(name, namespace, replica),
            port=runtime.port,
            extra_args=user_args,
        )
        return list(runtime.command or launch.command), list(launch.args)
    return list(runtime.command or LARGO_SERVER_COMMAND), user_args


def build_pod(
    service: InferenceService,
    model: ModelMount,
    replica: int,
    member: int,
    node_name: str,
    attempt: int,
    default_image: str = DEFAULT_SERVER_IMAGE,
) -> JSON:
    """Member ``member`` of replica group ``replica`` (attempt ``attempt``), pinned to ``node_name``."""
    spec = service.spec
    if not 0 <= member < spec.nodes_per_replica:
        raise ValueError(f"member {member} is outside 0..{spec.nodes_per_replica - 1}")
    name = service.metadata.name
    template = spec.pod_template
    runtime = spec.runtime
    leader = member == 0
    pod_revision = revision(spec, model, default_image)
    labels = {
        **template.labels,
        names.LABEL_SERVICE: name,
        names.LABEL_REPLICA: str(replica),
        names.LABEL_MEMBER: str(member),
        names.LABEL_REVISION: pod_revision,
        names.LABEL_ATTEMPT: str(attempt),
        names.LABEL_RUNTIME: runtime.type.value,
        # largo's admission holds such a pod's node whole (the scheduler reads it from the label).
        **({names.LABEL_EXCLUSIVE: "true"} if spec.scheduling.exclusive_nodes else {}),
    }
    # vLLM serves /metrics on its HTTP port, from the leader only; largo's server on `metrics`, everywhere.
    vllm = runtime.type is RuntimeType.VLLM
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(runtime.port if vllm else names.METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    annotations = {
        **(scrape if leader or not vllm else {}),
        **template.annotations,
        names.ANNOTATION_PLACEMENT_NODE: node_name,
    }

    mount: JSON = {"name": names.MODEL_VOLUME, "mountPath": names.MODEL_MOUNT, "readOnly": True}
    if model.sub_path:
        mount["subPath"] = model.sub_path
    volumes = [
        *(dict(v) for v in template.volumes),
        {
            "name": names.MODEL_VOLUME,
            "persistentVolumeClaim": {"claimName": model.claim_name, "readOnly": True},
        },
    ]
    mounts = [*(dict(m) for m in template.volume_mounts), mount]
    add_shared_memory(volumes, mounts)

    ports = [
        {"name": names.RENDEZVOUS_PORT_NAME, "containerPort": names.MASTER_PORT, "protocol": "TCP"},
        {"name": names.METRICS_PORT_NAME, "containerPort": names.METRICS_PORT, "protocol": "TCP"},
    ]
    if leader:
        ports.insert(0, {"name": names.HTTP_PORT_NAME, "containerPort": runtime.port, "protocol": "TCP"})
    command, args = _launch(service, model, replica, member)
    user = [e.model_dump(by_alias=True, exclude_none=True) for e in spec.env]
    user_names = {e.name for e in spec.env}
    defaults: list[JSON] = (
        [{"name": "PYTHONUNBUFFERED", "value": "1"}] if "PYTHONUNBUFFERED" not in user_names else []
    )
    if vllm and "VLLM_HOST_IP" not in user_names:
        # Ray and vLLM must agree on the pod's address, whatever interfaces the node has.
        defaults.append({"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    container: JSON = {
        "name": names.SERVER_CONTAINER_NAME,
        "image": server_image(spec, default_image),
        "env": [*contract_env(service, model, replica, member), *defaults, *user],
        "ports": ports,
        "volumeMounts": mounts,
    }
    pre_stop = pre_stop_seconds(spec)
    if pre_stop:
        # On every member: the pipeline's stages are stopped together, after the routers let go.
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": pre_stop}}}
    if template.container_security_context is not None:
        container["securityContext"] = dict(template.container_security_context)
    if command:
        container["command"] = command
    if args:
        container["args"] = args
    resources = equal_resources(spec.resources_per_node)
    if resources:
        container["resources"] = resources
    if leader:
        # Only the leader serves HTTP; a worker is ready once it runs (its leader's readiness covers
        # the pipeline). A slow model load is not a failure: readiness waits, liveness is patient.
        health, ready = (
            ("/health", "/health") if runtime.type is RuntimeType.VLLM else ("/healthz", "/readyz")
        )
        if runtime.readiness_probe is not None:
            container["readinessProbe"] = dict(runtime.readiness_probe)
        elif runtime.type is not RuntimeType.CUSTOM:
            container["readinessProbe"] = _http_probe(ready, runtime.port, period=2, failures=1)
        if runtime.liveness_probe is not None:
            container["livenessProbe"] = dict(runtime.liveness_probe)
        elif runtime.type is RuntimeType.VLLM:
            # vLLM listens only once its engine is built: loading a large model's weights and capturing
            # its graphs can take many minutes, during which a liveness probe would kill it (and, pods
            # never restarting in place, its whole group) again and again. The startup probe allows an
            # hour; liveness takes over once it passed.
            container["startupProbe"] = _http_probe(health, runtime.port, period=10, failures=360)
            container["livenessProbe"] = _http_probe(
                health, runtime.port, period=10, failures=6, timeout=LIVENESS_TIMEOUT_SECONDS
            )
        elif runtime.type is not RuntimeType.CUSTOM:
            container["livenessProbe"] = {
                **_http_probe(health, runtime.port, period=10, failures=6, timeout=LIVENESS_TIMEOUT_SECONDS),
                "initialDelaySeconds": 60,
            }

    tolerations = pod_tolerations(service)
    pod_spec = pinned_pod_spec(
        hostname=names.member_pod_name(name, replica, member),
        subdomain=names.members_service(name),
        node_name=node_name,
        container=container,
        volumes=volumes,
        template=template,
        tolerations=tolerations,
        scheduler_name=spec.scheduling.scheduler_name,
    )
    if runtime.type is not RuntimeType.CUSTOM and template.service_account_name is None:
        # The presets' servers never call the Kubernetes API: no token of the namespace's default
        # ServiceAccount in a process that serves the network. A custom server, or a pod given an
        # account of its own, keeps it.
        pod_spec["automountServiceAccountToken"] = False
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": names.member_pod_name(name, replica, member),
            "namespace": _namespace(service),
            "labels": labels,
            "annotations": annotations,
        },
        "spec": pod_spec,
    }
