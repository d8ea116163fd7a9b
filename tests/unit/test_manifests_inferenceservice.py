"""InferenceService builders: the two Services, the members' names and DNS, labels, the leader's port and
probes per runtime, the model claim, node pinning, the vllm preset's launch, and what the revision
hash follows (and what it ignores)."""

from __future__ import annotations

import copy
import shlex
from typing import Any

import pytest
from largo.api.v1alpha1 import InferenceService
from largo.manifests.inferenceservice import (
    DEFAULT_SERVER_IMAGE,
    LARGO_SERVER_COMMAND,
    ModelMount,
    build_members_service,
    build_pod,
    build_service,
    contract_env,
    pod_tolerations,
    revision,
)
from largo.manifests.names import LABEL_REVISION
from largo.manifests.vllm import VLLM_IMAGE

GPU = "nvidia.com/gpu"
MODEL = ModelMount(claim_name="weights", sub_path="llama-8b")
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}

# What the restricted PodSecurity standard asks of a container, beyond the pod's own settings.
RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, recursively for mappings."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make(name: str = "llama", namespace: str | None = "ml", **spec: Any) -> InferenceService:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    body_spec = merge({"model": {"claimName": "weights", "path": "llama-8b"}}, spec)
    return InferenceService.from_body({"metadata": metadata, "spec": body_spec})


def vllm(nodes: int = 1, gpus: int = 8, **spec: Any) -> InferenceService:
    return make(
        **merge(
            {"runtime": {"type": "vllm"}, "nodesPerReplica": nodes, "resourcesPerNode": {GPU: gpus}},
            spec,
        )
    )


def pod(service: InferenceService, replica: int = 0, member: int = 0, **kw: Any) -> dict[str, Any]:
    return build_pod(
        service,
        kw.pop("model", MODEL),
        replica,
        member,
        kw.pop("node", "gpu-a"),
        kw.pop("attempt", 0),
        **kw,
    )


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    (only,) = manifest["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def env(manifest: dict[str, Any]) -> dict[str, Any]:
    """name -> value (or valueFrom) of the server container's environment."""
    found: dict[str, Any] = {}
    for entry in container(manifest)["env"]:
        assert entry["name"] not in found, f"{entry['name']} is set twice"
        found[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return found


def port_names(manifest: dict[str, Any]) -> list[str]:
    return [p["name"] for p in container(manifest)["ports"]]


# --- Services --------------------------------------------------------------------------------


def test_service_sends_port_80_to_the_router_s_http_port() -> None:
    manifest = build_service(make(name="chat"))
    assert manifest["kind"] == "Service"
    assert manifest["metadata"] == {
        "name": "chat",
        "namespace": "ml",
        "labels": {"largo.dev/inferenceservice": "chat"},
    }
    assert manifest["spec"]["selector"] == {"largo.dev/router": "chat"}
    assert manifest["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    assert "clusterIP" not in manifest["spec"]


def test_members_service_is_headless_and_publishes_not_ready_members() -> None:
    manifest = build_members_service(make(name="chat"))
    assert manifest["metadata"]["name"] == "chat-members"
    assert manifest["metadata"]["namespace"] == "ml"
    spec = manifest["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    # Every member of every group, not only the leaders.
    assert spec["selector"] == {"largo.dev/inferenceservice": "chat"}
    assert spec["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}]


@pytest.mark.parametrize(
    "build",
    [
        build_service,
        build_members_service,
        lambda s: pod(s),
        lambda s: contract_env(s, MODEL, 0, 0),
    ],
    ids=["service", "members-service", "pod", "contract-env"],
)
def test_builders_refuse_a_service_without_namespace(build: Any) -> None:
    with pytest.raises(ValueError, match=r"has no metadata\.namespace"):
        build(make(namespace=None))


# --- names, DNS, contract ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "replica", "member", "nodes", "pod_name", "leader"),
    [
        ("llama", 0, 0, 1, "llama-r0-node-0", "llama-r0-node-0.llama-members.ml.svc"),
        ("llama", 3, 1, 2, "llama-r3-node-1", "llama-r3-node-0.llama-members.ml.svc"),
        ("qwen-72b", 12, 3, 4, "qwen-72b-r12-node-3", "qwen-72b-r12-node-0.qwen-72b-members.ml.svc"),
    ],
)
def test_member_names_and_dns(
    name: str, replica: int, member: int, nodes: int, pod_name: str, leader: str
) -> None:
    service = make(name=name, nodesPerReplica=nodes)
    manifest = pod(service, replica, member)
    assert manifest["metadata"]["name"] == pod_name
    assert manifest["metadata"]["namespace"] == "ml"
    assert manifest["spec"]["hostname"] == pod_name
    assert manifest["spec"]["subdomain"] == f"{name}-members"
    values = env(manifest)
    assert values["LARGO_LEADER_ADDR"] == leader
    assert values["LARGO_REPLICA"] == str(replica)
    assert values["LARGO_MEMBER"] == str(member)
    assert values["LARGO_MEMBERS"] == str(nodes)


@pytest.mark.parametrize(
    ("spec", "model", "expected"),
    [
        (
            {
                "nodesPerReplica": 2,
                "resourcesPerNode": {GPU: 8},
                "runtime": {"port": 9000},
                "podTemplate": {"terminationGracePeriodSeconds": 120},
            },
            MODEL,
            {
                "LARGO_SERVICE": "llama",
                "LARGO_SERVICE_NAMESPACE": "ml",
                "LARGO_REPLICA": "4",
                "LARGO_MEMBER": "1",
                "LARGO_MEMBERS": "2",
                "LARGO_LEADER_ADDR": "llama-r4-node-0.llama-members.ml.svc",
                "LARGO_LEADER_PORT": "29500",
                "LARGO_BACKEND": "nccl",
                "LARGO_MODEL_DIR": "/model",
                "LARGO_SERVED_MODEL_NAME": "llama",
                "LARGO_HTTP_PORT": "9000",
                "LARGO_METRICS_PORT": "9400",
                "LARGO_DRAIN_SECONDS": "112",  # the grace period less the preStop's 5 s and 3 to exit
            },
        ),
        (
            {"nodesPerReplica": 2},
            ModelMount(claim_name="ckpt", step=1200, train_job="pretrain"),
            {
                "LARGO_SERVICE": "llama",
                "LARGO_SERVICE_NAMESPACE": "ml",
                "LARGO_REPLICA": "4",
                "LARGO_MEMBER": "1",
                "LARGO_MEMBERS": "2",
                "LARGO_LEADER_ADDR": "llama-r4-node-0.llama-members.ml.svc",
                "LARGO_LEADER_PORT": "29500",
                "LARGO_BACKEND": "gloo",
                "LARGO_MODEL_DIR": "/model",
                "LARGO_SERVED_MODEL_NAME": "llama",
                "LARGO_HTTP_PORT": "8000",
                "LARGO_METRICS_PORT": "9400",
                "LARGO_DRAIN_SECONDS": "22",  # Kubernetes' default grace period, 30 s
                "LARGO_MODEL_STEP": "1200",
            },
        ),
    ],
    ids=["gpus-claim", "cpu-checkpoint-step"],
)
def test_contract_env(spec: dict[str, Any], model: ModelMount, expected: dict[str, str]) -> None:
    entries = contract_env(make(**spec), model, replica=4, member=1)
    assert {e["name"]: e["value"] for e in entries} == expected
    assert len(entries) == len(expected)


@pytest.mark.parametrize("runtime", ["largo", "vllm", "custom"])
def test_every_member_waits_for_the_routers_before_its_sigterm(runtime: str) -> None:
    """The leader's endpoint is marked terminating at the deletion; the routers take it out within
    seconds. Every member, not the leader only: the stages are stopped together."""
    extra: dict[str, Any] = {"image": "mine:1"} if runtime == "custom" else {}
    gpus = {"resourcesPerNode": {GPU: 1}} if runtime == "vllm" else {}
    service = make(nodesPerReplica=2, runtime={"type": runtime, **extra}, **gpus)
    for member in (0, 1):
        container = pod(service, replica=0, member=member, node="n")["spec"]["containers"][0]
        assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    # The API server refuses a preStop sleep not less than the grace period: shorter, or none.
    for grace, sleep, drain in ((6, 5, 0), (4, 3, 0), (1, None, 0), (0, None, 0), (60, 5, 52)):
        short = make(podTemplate={"terminationGracePeriodSeconds": grace})
        container = pod(short, replica=0, member=0, node="n")["spec"]["containers"][0]
        assert container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds") == sleep
        env = {e["name"]: e["value"] for e in contract_env(short, MODEL, replica=0, member=0)}
        assert env["LARGO_DRAIN_SECONDS"] == str(drain)  # never negative


def test_labels_and_annotations() -> None:
    service = make(
        resourcesPerNode={GPU: 8},
        podTemplate={
            # (largo.dev/ keys of a template's own are refused by the API: test_api_inferenceservice.)
            "labels": {"team": "search"},
            "annotations": {"owner": "search"},
        },
    )
    manifest = pod(service, replica=2, member=0, node="gpu-7", attempt=5)
    labels = manifest["metadata"]["labels"]
    assert labels == {
        "team": "search",
        "largo.dev/inferenceservice": "llama",
        "largo.dev/replica": "2",
        "largo.dev/member": "0",
        "largo.dev/revision": revision(service.spec, MODEL),
        "largo.dev/attempt": "5",
        "largo.dev/runtime": "largo",  # where the chart's PodMonitor looks for its metrics
    }
    annotations = manifest["metadata"]["annotations"]
    assert annotations["owner"] == "search"
    assert annotations["largo.dev/placement-node"] == "gpu-7"
    assert annotations["prometheus.io/port"] == "9400"


@pytest.mark.parametrize(
    ("runtime", "member", "scrape_port"),
    [
        ("largo", 0, "9400"),
        ("largo", 1, "9400"),
        ("vllm", 0, "8000"),
        ("vllm", 1, None),
    ],
)
def test_prometheus_scrape_annotations(runtime: str, member: int, scrape_port: str | None) -> None:
    service = vllm(nodes=2) if runtime == "vllm" else make(nodesPerReplica=2)
    manifest = pod(service, member=member)
    annotations = manifest["metadata"]["annotations"]
    assert annotations.get("prometheus.io/port") == scrape_port
    assert ("prometheus.io/scrape" in annotations) == (scrape_port is not None)
    assert manifest["metadata"]["labels"]["largo.dev/runtime"] == runtime  # the PodMonitor's switch


def test_revision_label_is_the_same_on_every_member_and_attempt() -> None:
    service = make(nodesPerReplica=3)
    revisions = {
        pod(service, replica, member, attempt=attempt)["metadata"]["labels"]["largo.dev/revision"]
        for replica in (0, 5)
        for member in range(3)
        for attempt in (0, 2)
    }
    assert len(revisions) == 1


# --- the leader's port and probes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("runtime", "readiness", "liveness"),
    [
        ({"type": "largo"}, "/readyz", "/healthz"),
        ({"type": "largo", "port": 9090}, "/readyz", "/healthz"),
        ({"type": "vllm"}, "/health", "/health"),
        ({"type": "custom", "image": "mine:1"}, None, None),
    ],
    ids=["largo", "largo-port", "vllm", "custom"],
)
def test_only_the_leader_serves_http_and_is_probed(
    runtime: dict[str, Any], readiness: str | None, liveness: str | None
) -> None:
    service = make(runtime=runtime, nodesPerReplica=2, resourcesPerNode={GPU: 1})
    port = runtime.get("port", 8000)
    leader = container(pod(service, member=0))
    worker = container(pod(service, member=1))

    assert leader["ports"][0] == {"name": "http", "containerPort": port, "protocol": "TCP"}
    assert [p["name"] for p in leader["ports"]] == ["http", "rendezvous", "metrics"]
    assert [p["name"] for p in worker["ports"]] == ["rendezvous", "metrics"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe not in worker

    if readiness is None:
        assert "readinessProbe" not in leader
        assert "livenessProbe" not in leader
        return
    assert leader["readinessProbe"]["httpGet"] == {"path": readiness, "port": port}
    assert leader["livenessProbe"]["httpGet"] == {"path": liveness, "port": port}
    # A slow model load is no failure: liveness waits before its first look and tolerates misses.
    assert leader["livenessProbe"]["failureThreshold"] > 1
    # A busy server's answer takes more than Kubernetes' default second: no flapping under load.
    assert leader["readinessProbe"]["timeoutSeconds"] >= 3
    assert leader["livenessProbe"]["timeoutSeconds"] >= 5
    if runtime["type"] == "vllm":
        # vLLM listens only once its engine is built: a startup probe allows an hour of loading, and
        # liveness starts only after it passed.
        startup = leader["startupProbe"]
        assert startup["httpGet"] == {"path": liveness, "port": port}
        assert startup["periodSeconds"] * startup["failureThreshold"] == 3600
    else:  # largo's server answers /healthz at once, while it loads
        assert leader["livenessProbe"]["initialDelaySeconds"] > 0
        assert "startupProbe" not in leader


@pytest.mark.parametrize("runtime", [{"type": "largo"}, {"type": "vllm"}, {"type": "custom", "image": "x:1"}])
def test_user_probes_replace_the_presets_on_the_leader_only(runtime: dict[str, Any]) -> None:
    readiness = {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 7}
    liveness = {"tcpSocket": {"port": 8000}}
    service = make(
        runtime={**runtime, "readinessProbe": readiness, "livenessProbe": liveness},
        nodesPerReplica=2,
        resourcesPerNode={GPU: 1},
    )
    leader = container(pod(service, member=0))
    assert leader["readinessProbe"] == readiness
    assert leader["livenessProbe"] == liveness
    worker = container(pod(service, member=1))
    assert "readinessProbe" not in worker
    assert "livenessProbe" not in worker


# --- the model, pinning, tolerations -------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "sub_path"),
    [
        (ModelMount(claim_name="weights", sub_path="llama-8b"), "llama-8b"),
        (ModelMount(claim_name="ckpt", step=300, train_job="pretrain"), None),
        (ModelMount(claim_name="ckpt", sub_path="runs/a", step=300, train_job="pretrain"), "runs/a"),
    ],
)
def test_model_claim_is_mounted_read_only_at_model(model: ModelMount, sub_path: str | None) -> None:
    manifest = pod(make(), model=model)
    volumes = {v["name"]: v for v in manifest["spec"]["volumes"]}
    assert volumes["largo-model"] == {
        "name": "largo-model",
        "persistentVolumeClaim": {"claimName": model.claim_name, "readOnly": True},
    }
    (mount,) = [m for m in container(manifest)["volumeMounts"] if m["name"] == "largo-model"]
    expected = {"name": "largo-model", "mountPath": "/model", "readOnly": True}
    if sub_path is not None:
        expected["subPath"] = sub_path
    assert mount == expected


def test_shm_is_added_unless_the_user_mounts_dev_shm() -> None:
    plain = pod(make())
    assert {"name": "largo-dshm", "emptyDir": {"medium": "Memory"}} in plain["spec"]["volumes"]
    assert {"name": "largo-dshm", "mountPath": "/dev/shm"} in container(plain)["volumeMounts"]

    own = pod(
        make(
            podTemplate={
                "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}],
                "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
            }
        )
    )
    assert [v["name"] for v in own["spec"]["volumes"]] == ["shm", "largo-model"]
    assert [m["mountPath"] for m in container(own)["volumeMounts"]] == ["/dev/shm", "/model"]


@pytest.mark.parametrize("node", ["gpu-a", "ip-10-0-3-7.ec2.internal"])
def test_pod_is_pinned_to_its_node_by_node_affinity(node: str) -> None:
    spec = pod(make(), node=node)["spec"]
    assert "nodeName" not in spec
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}]
    assert spec["restartPolicy"] == "Never"


@pytest.mark.parametrize(
    ("gpus", "user", "expected"),
    [
        (None, [], []),
        (0, [], []),
        (8, [], [GPU_TOLERATION]),
        (
            1,
            [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            [
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
                GPU_TOLERATION,
            ],
        ),
        (8, [{"key": GPU, "operator": "Exists"}], [{"key": GPU, "operator": "Exists"}]),
    ],
    ids=["cpu", "zero-gpus", "gpus", "gpus-and-user", "user-gpu-toleration-kept"],
)
def test_pod_tolerations(
    gpus: int | None, user: list[dict[str, Any]], expected: list[dict[str, Any]]
) -> None:
    spec: dict[str, Any] = {"podTemplate": {"tolerations": user}}
    if gpus is not None:
        spec["resourcesPerNode"] = {GPU: gpus}
    service = make(**spec)
    assert pod_tolerations(service) == expected
    manifest = pod(service)
    assert manifest["spec"].get("tolerations", []) == expected


def test_resources_pod_template_and_scheduler_name_reach_the_pod() -> None:
    service = make(
        resourcesPerNode={GPU: 8, "cpu": "32", "memory": "512Gi"},
        podTemplate={
            "nodeSelector": {"pool": "h100"},
            "serviceAccountName": "serving",
            "priorityClassName": "high",
            "terminationGracePeriodSeconds": 120,
            "securityContext": {"runAsUser": 1000},
            "containerSecurityContext": RESTRICTED,
            "imagePullSecrets": [{"name": "registry"}],
        },
        scheduling={"schedulerName": "custom-scheduler"},
    )
    manifest = pod(service)
    resources = container(manifest)["resources"]
    assert resources["requests"] == {"cpu": "32", "memory": "512Gi", GPU: "8"}
    assert resources["limits"] == resources["requests"]
    spec = manifest["spec"]
    assert spec["nodeSelector"] == {"pool": "h100"}
    assert spec["serviceAccountName"] == "serving"
    assert spec["priorityClassName"] == "high"
    assert spec["terminationGracePeriodSeconds"] == 120
    assert spec["securityContext"] == {"runAsUser": 1000}
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert "automountServiceAccountToken" not in spec  # an account of its own: its token is wanted
    assert container(manifest)["securityContext"] == RESTRICTED  # a restricted namespace admits it
    assert "securityContext" not in container(pod(make()))
    assert spec["schedulerName"] == "custom-scheduler"
    assert spec["enableServiceLinks"] is False


@pytest.mark.parametrize(("runtime", "token"), [({"type": "largo"}, False), ({"type": "vllm"}, False)])
def test_a_preset_server_gets_no_api_token(runtime: dict[str, Any], token: bool) -> None:
    """The presets' servers never call the Kubernetes API: the default account's token is not mounted
    in a process that serves the network; a custom server keeps it."""
    spec = pod(make(runtime=runtime, resourcesPerNode={GPU: 1}))["spec"]
    assert spec["automountServiceAccountToken"] is token
    custom = pod(make(runtime={"type": "custom", "image": "x:1"}))["spec"]
    assert "automountServiceAccountToken" not in custom


@pytest.mark.parametrize("member", [-1, 2])
def test_member_outside_the_group_is_refused(member: int) -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        pod(make(nodesPerReplica=2), member=member)


# --- runtimes: image, command, args, env -----------------------------------------------------------


@pytest.mark.parametrize(
    ("runtime", "default_image", "image", "command", "args"),
    [
        ({"type": "largo"}, DEFAULT_SERVER_IMAGE, "largo-trainer:dev", LARGO_SERVER_COMMAND, None),
        ({"type": "largo"}, "registry/largo:1.2", "registry/largo:1.2", LARGO_SERVER_COMMAND, None),
        (
            {"type": "largo", "image": "mine:2", "args": ["--max-batch", "8"]},
            DEFAULT_SERVER_IMAGE,
            "mine:2",
            ["python", "-m", "largo.runtime.serve"],
            ["--max-batch", "8"],
        ),
        (
            {"type": "largo", "command": ["serve.sh"], "args": ["--fast"]},
            DEFAULT_SERVER_IMAGE,
            "largo-trainer:dev",
            ["serve.sh"],
            ["--fast"],
        ),
        (
            {"type": "custom", "image": "tgi:3", "args": ["--model-id", "/model"]},
            DEFAULT_SERVER_IMAGE,
            "tgi:3",
            None,
            ["--model-id", "/model"],
        ),
        (
            {"type": "custom", "image": "tgi:3", "command": ["text-generation-launcher"]},
            DEFAULT_SERVER_IMAGE,
            "tgi:3",
            ["text-generation-launcher"],
            None,
        ),
    ],
    ids=["largo", "largo-default-image", "largo-args", "largo-command", "custom-args", "custom-command"],
)
def test_largo_and_custom_launch(
    runtime: dict[str, Any],
    default_image: str,
    image: str,
    command: list[str] | None,
    args: list[str] | None,
) -> None:
    box = container(pod(make(runtime=runtime), default_image=default_image))
    assert box["image"] == image
    assert box.get("command") == command
    assert box.get("args") == args


def test_vllm_one_pod_of_8_gpus_runs_vllm_serve_with_user_args_last() -> None:
    service = vllm(nodes=1, gpus=8, runtime={"args": ["--max-model-len", "4096", "--port", "8001"]})
    box = container(pod(service))
    assert box["image"] == VLLM_IMAGE
    assert box["command"] == ["vllm", "serve"]
    assert box["args"] == [
        "/model",
        "--served-model-name",
        "llama",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "8",
        "--max-model-len",
        "4096",
        "--port",
        "8001",
    ]
    assert "--pipeline-parallel-size" not in box["args"]
    assert env(pod(service))["VLLM_HOST_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_vllm_two_pods_of_8_gpus_leader_runs_ray_head_and_pipeline() -> None:
    service = vllm(nodes=2, gpus=8, runtime={"args": ["--enforce-eager"]})
    leader = container(pod(service, replica=1, member=0))
    assert leader["command"] == ["/bin/sh", "-c"]
    (script,) = leader["args"]
    head, _, serve = script.partition(" && ")
    assert head == "ray start --head --port=6379"
    assert shlex.split(serve) == [
        "exec",
        "vllm",
        "serve",
        "/model",
        "--served-model-name",
        "llama",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "8",
        "--pipeline-parallel-size",
        "2",
        "--distributed-executor-backend",
        "ray",
        "--enforce-eager",
    ]


def test_vllm_two_pods_worker_joins_its_groups_leader() -> None:
    service = vllm(nodes=2, gpus=8, runtime={"args": ["--enforce-eager"]})
    worker = container(pod(service, replica=1, member=1))
    assert worker["command"] == ["/bin/sh", "-c"]
    (script,) = worker["args"]
    assert "exec ray start --address=llama-r1-node-0.llama-members.ml.svc:6379 --block" in script
    assert "vllm serve" not in script
    assert "--enforce-eager" not in script
    # Workers resolve the leader of their own group, not another replica's.
    assert "llama-r0-node-0" not in script
    assert env(pod(service, replica=1, member=1))["VLLM_HOST_IP"] == {
        "fieldRef": {"fieldPath": "status.podIP"}
    }


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        (
            make(env=[{"name": "HF_HOME", "value": "/cache"}]),
            {"PYTHONUNBUFFERED": "1", "HF_HOME": "/cache"},
        ),
        (
            make(env=[{"name": "PYTHONUNBUFFERED", "value": "0"}]),
            {"PYTHONUNBUFFERED": "0"},
        ),
        (
            vllm(env=[{"name": "VLLM_HOST_IP", "value": "10.0.0.1"}]),
            {"PYTHONUNBUFFERED": "1", "VLLM_HOST_IP": "10.0.0.1"},
        ),
    ],
    ids=["user-env", "user-pythonunbuffered-wins", "user-vllm-host-ip-wins"],
)
def test_user_env_follows_the_contract_and_replaces_defaults(
    service: InferenceService, expected: dict[str, Any]
) -> None:
    values = env(pod(service))  # also checks that no name is set twice
    assert {k: v for k, v in values.items() if not k.startswith("LARGO_")} == expected
    if service.spec.runtime.type != "vllm":
        assert "VLLM_HOST_IP" not in values


# --- ModelMount.summary -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mount", "summary"),
    [
        (ModelMount(claim_name="weights"), "weights"),
        (ModelMount(claim_name="weights", sub_path="llama/8b"), "weights/llama/8b"),
        (ModelMount(claim_name="ckpt", train_job="pretrain"), "pretrain"),
        (ModelMount(claim_name="ckpt", step=0, train_job="pretrain"), "pretrain@step-0"),
        (ModelMount(claim_name="ckpt", sub_path="x", step=1500, train_job="pretrain"), "pretrain@step-1500"),
    ],
)
def test_model_mount_summary(mount: ModelMount, summary: str) -> None:
    assert mount.summary() == summary


# --- revision ------------------------------------------------------------------------------------

BASE_SPEC: dict[str, Any] = {
    "runtime": {"type": "largo", "image": "server:1", "args": ["--a"]},
    "replicas": 2,
    "resourcesPerNode": {GPU: 1},
}
BASE_MODEL = ModelMount(claim_name="ckpt", sub_path="run", step=100, train_job="pretrain")


@pytest.mark.parametrize(
    ("change", "model"),
    [
        ({"runtime": {"image": "server:2"}}, BASE_MODEL),
        ({"runtime": {"args": ["--a", "--b"]}}, BASE_MODEL),
        ({"runtime": {"port": 9000}}, BASE_MODEL),
        ({"runtime": {"command": ["other"]}}, BASE_MODEL),
        ({"env": [{"name": "HF_HOME", "value": "/cache"}]}, BASE_MODEL),
        ({"resourcesPerNode": {GPU: 2}}, BASE_MODEL),
        ({"nodesPerReplica": 2}, BASE_MODEL),
        ({"podTemplate": {"nodeSelector": {"pool": "b"}}}, BASE_MODEL),
        ({}, ModelMount(claim_name="ckpt", sub_path="run", step=200, train_job="pretrain")),
        ({}, ModelMount(claim_name="other", sub_path="run", step=100, train_job="pretrain")),
        ({}, ModelMount(claim_name="ckpt", sub_path="run2", step=100, train_job="pretrain")),
        ({"scheduling": {"schedulerName": "volcano"}}, BASE_MODEL),
        ({"scheduling": {"exclusiveNodes": True}}, BASE_MODEL),
    ],
    ids=[
        "image",
        "args",
        "port",
        "command",
        "env",
        "resources",
        "nodes-per-replica",
        "pod-template",
        "model-step",
        "model-claim",
        "model-sub-path",
        "scheduler-name",
        "exclusive-nodes",
    ],
)
def test_revision_changes_with_what_shapes_the_pods(change: dict[str, Any], model: ModelMount) -> None:
    before = revision(make(**BASE_SPEC).spec, BASE_MODEL)
    after = revision(make(**merge(BASE_SPEC, change)).spec, model)
    assert after != before
    assert len(after) == 16
    int(after, 16)


@pytest.mark.parametrize(
    "change",
    [
        {"replicas": 5},
        {"replicas": 0},
        {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
        {"autoscaling": {"maxReplicas": 8, "scaleToZero": True, "target": 2.5}},
        {"scheduling": {"queue": "batch", "priority": 7}},
        {"scheduling": {"exclusiveNodes": False, "topologyKey": "rack"}},
        {"rollout": {"maxSurge": 0, "maxUnavailable": 1}},
    ],
    ids=[
        "replicas",
        "replicas-zero",
        "autoscaling",
        "autoscaling-other",
        "scheduling",
        "placement",
        "rollout",
    ],
)
def test_revision_ignores_count_scaling_and_scheduling(change: dict[str, Any]) -> None:
    before = revision(make(**BASE_SPEC).spec, BASE_MODEL)
    assert revision(make(**merge(BASE_SPEC, change)).spec, BASE_MODEL) == before


def test_revision_follows_the_default_image_and_is_stable() -> None:
    spec = make(runtime={"type": "largo"}).spec
    assert revision(spec, MODEL) == revision(make(runtime={"type": "largo"}).spec, MODEL)
    assert revision(spec, MODEL, "largo:a") != revision(spec, MODEL, "largo:b")
    # An image the service names wins over the default, so the default no longer matters.
    named = make(runtime={"type": "largo", "image": "mine:1"}).spec
    assert revision(named, MODEL, "largo:a") == revision(named, MODEL, "largo:b")


@pytest.mark.parametrize(
    ("written", "again"),
    [
        ({"runtime": {"type": "largo"}}, {"runtime": {"type": "largo", "args": []}}),
        ({"runtime": {"type": "largo"}}, {"runtime": {"type": "largo", "command": []}}),
        ({}, {"podTemplate": {"imagePullSecrets": []}}),
        ({}, {"resourcesPerNode": {"nvidia.com/gpu": 1, "cpu": "8"}}),
        ({}, {"resourcesPerNode": {"nvidia.com/gpu": "1", "cpu": 8}}),
    ],
)
def test_spellings_of_one_pod_are_one_revision(written: dict[str, Any], again: dict[str, Any]) -> None:
    """A tool that writes `args: []` or `cpu: "8"` where the last apply had none or 8 rolled every group
    for pods alike to the byte."""
    weights = ModelMount(claim_name="weights")
    base = {"model": {"claimName": "weights"}, "resourcesPerNode": {"nvidia.com/gpu": 1, "cpu": 8}}
    specs = [{**base, **spelling} for spelling in (written, again)]
    first, second = (make("chat", **spec) for spec in specs)
    pods = [build_pod(service, weights, 0, 0, "n1", 0) for service in (first, second)]
    for pod in pods:
        pod["metadata"]["labels"].pop(LABEL_REVISION)
    assert pods[0] == pods[1]
    assert revision(first.spec, weights) == revision(second.spec, weights)


def test_a_revision_hashes_as_it_did_in_earlier_versions() -> None:
    """An upgrade of the operator must not roll out every InferenceService: a new field of the hashed
    parts needs a default of None, which leaves the revision of a spec that does not set it as it was.
    These are the revisions earlier versions gave."""
    weights = ModelMount(claim_name="weights")
    assert revision(make("chat", model={"claimName": "weights"}).spec, weights) == "7d76833a24b24c01"
    spec = {
        "model": {"claimName": "weights"},
        "runtime": {"args": ["--max-batch", "16"]},
        "nodesPerReplica": 2,
        "resourcesPerNode": {"nvidia.com/gpu": 1},
        "env": [{"name": "A", "value": "1"}],
        "podTemplate": {"nodeSelector": {"pool": "h100"}},
    }
    assert revision(make("chat", **spec).spec, weights, "largo-trainer:1.0") == "488da1ae4f8c8541"
