"""Builders: the rendezvous env/DNS contract and the shape of the gang's pods and Service."""

from __future__ import annotations

from typing import Any

import pytest
from largo.api.v1alpha1 import MAX_JOB_NAME_LENGTH, Backend, TrainJob
from largo.controllers.state import gang_request, pod_usage
from largo.manifests import names
from largo.manifests.trainjob import (
    build_pod,
    build_pods,
    build_service,
    gpus_per_node,
    per_pod_requests,
    pod_spec_hash,
    reporting_pod,
    resolved_backend,
    resolved_procs_per_node,
    total_gpus,
)
from largo.runtime.parallel import Layout
from largo.sched.quantity import parse_resource

# What the restricted PodSecurity standard asks of a container, beyond the pod's own settings.
RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def make_job(name: str = "llama", namespace: str | None = "ml", **spec: Any) -> TrainJob:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return TrainJob.model_validate({"metadata": metadata, "spec": {"image": "trainer:1", **spec}})


GPU_JOB: dict[str, Any] = {
    "numNodes": 2,
    "resourcesPerNode": {"nvidia.com/gpu": 8, "cpu": "16", "memory": "64Gi"},
}


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    env = container["env"]
    result = {e["name"]: e.get("value", e.get("valueFrom")) for e in env}
    assert len(result) == len(env), "duplicate env names"
    return result


def test_names() -> None:
    assert names.service_name("llama") == "llama"
    assert names.pod_name("llama", 3) == "llama-node-3"
    assert names.hostname("llama", 3) == "llama-node-3"
    assert names.subdomain("llama") == "llama"
    assert names.master_addr("llama", "ml") == "llama-node-0.llama.ml.svc"
    assert names.MASTER_PORT == 29500


def test_longest_names_fit_dns_labels() -> None:
    longest = "a" * MAX_JOB_NAME_LENGTH
    job = make_job(longest, numNodes=1024)
    assert len(names.pod_name(longest, 1023)) <= 63
    pod = build_pod(job, 1023, "node-x", 0)
    assert len(pod["metadata"]["name"]) <= 63
    assert len(pod["spec"]["hostname"]) <= 63
    assert len(pod["spec"]["subdomain"]) <= 63


def test_resolution_with_gpus() -> None:
    spec = make_job(**GPU_JOB).spec
    assert gpus_per_node(spec) == 8
    assert total_gpus(spec) == 16
    assert resolved_procs_per_node(spec) == 8
    assert resolved_backend(spec) is Backend.NCCL


def test_resolution_without_gpus() -> None:
    spec = make_job(numNodes=3, resourcesPerNode={"cpu": 4}).spec
    assert gpus_per_node(spec) == 0
    assert total_gpus(spec) == 0
    assert resolved_procs_per_node(spec) == 1
    assert resolved_backend(spec) is Backend.GLOO


def test_explicit_values_win() -> None:
    spec = make_job(procsPerNode=2, backend="gloo", resourcesPerNode={"nvidia.com/gpu": "4"}).spec
    assert gpus_per_node(spec) == 4
    assert resolved_procs_per_node(spec) == 2
    assert resolved_backend(spec) is Backend.GLOO


def test_per_pod_requests_canonical_units() -> None:
    spec = make_job(
        resourcesPerNode={
            "nvidia.com/gpu": 8,
            "cpu": "1500m",
            "memory": "64Gi",
            "ephemeral-storage": "1G",
        }
    ).spec
    assert per_pod_requests(spec) == {
        "cpu": 1500,
        "ephemeral-storage": 10**9,
        "memory": 64 * 2**30,
        "nvidia.com/gpu": 8,
    }
    assert parse_resource("cpu", 2) == 2000
    assert parse_resource("cpu", "0.1") == 100
    assert parse_resource("memory", "1.5Ki") == 1536


def test_service() -> None:
    svc = build_service(make_job(**GPU_JOB))
    assert svc["apiVersion"] == "v1"
    assert svc["kind"] == "Service"
    assert svc["metadata"]["name"] == "llama"
    assert svc["metadata"]["namespace"] == "ml"
    assert "ownerReferences" not in svc["metadata"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"largo.dev/job-name": "llama"}
    assert svc["spec"]["ports"] == [
        {"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}
    ]


def test_service_selects_pods() -> None:
    job = make_job(**GPU_JOB)
    selector = build_service(job)["spec"]["selector"]
    for pod in build_pods(job, ["n1", "n2"], attempt=1):
        assert selector.items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("rank", [0, 1])
def test_contract_env(rank: int) -> None:
    job = make_job(**GPU_JOB, checkpoint={"claimName": "ckpt"})
    env = env_of(build_pod(job, rank, f"n{rank}", attempt=2))
    assert env["PET_NNODES"] == "2"
    assert env["PET_NPROC_PER_NODE"] == "8"
    assert env["PET_NODE_RANK"] == str(rank)
    assert env["PET_MASTER_ADDR"] == "llama-node-0.llama.ml.svc"
    assert env["PET_MASTER_PORT"] == "29500"
    assert env["LARGO_JOB_NAME"] == "llama"
    assert env["LARGO_JOB_NAMESPACE"] == "ml"
    assert env["LARGO_NODE_RANK"] == str(rank)
    assert env["LARGO_NUM_NODES"] == "2"
    assert env["LARGO_BACKEND"] == "nccl"
    assert env["LARGO_ATTEMPT"] == "2"
    assert env["LARGO_CHECKPOINT_DIR"] == "/checkpoints"
    assert env["NCCL_DEBUG"] == "WARN"
    assert (env["LARGO_TENSOR_PARALLEL"], env["LARGO_PIPELINE_PARALLEL"]) == ("1", "1")
    for name in (
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        assert name not in env


def test_contract_env_hands_every_rank_the_parallelism() -> None:
    job = make_job(**GPU_JOB, parallelism={"tensor": 8, "pipeline": 2})
    for rank in (0, 1):
        env = env_of(build_pod(job, rank, f"n{rank}", attempt=0))
        assert (env["LARGO_TENSOR_PARALLEL"], env["LARGO_PIPELINE_PARALLEL"]) == ("8", "2")


def test_contract_env_cpu_only_without_checkpoint() -> None:
    env = env_of(build_pod(make_job(), 0, "n0", attempt=0))
    assert env["LARGO_BACKEND"] == "gloo"
    assert env["PET_NPROC_PER_NODE"] == "1"
    assert "LARGO_CHECKPOINT_DIR" not in env
    assert "NCCL_DEBUG" not in env


def test_user_env_kept_and_defaults_overridable() -> None:
    job = make_job(
        **GPU_JOB,
        env=[
            {"name": "NCCL_DEBUG", "value": "INFO"},
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
            },
            {"name": "OUT", "value": "$(LARGO_CHECKPOINT_DIR)/out"},
        ],
    )
    pod = build_pod(job, 0, "n0", attempt=0)
    env = env_of(pod)
    assert env["NCCL_DEBUG"] == "INFO"
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    order = [e["name"] for e in pod["spec"]["containers"][0]["env"]]
    # Contract variables come first so user values can reference them with $(VAR).
    assert order.index("LARGO_JOB_NAME") < order.index("OUT")
    assert order[-3:] == ["NCCL_DEBUG", "HF_TOKEN", "OUT"]


def test_pod_identity_and_dns() -> None:
    job = make_job(**GPU_JOB)
    pod = build_pod(job, 1, "gpu-node-7", attempt=3)
    meta = pod["metadata"]
    assert pod["apiVersion"] == "v1"
    assert pod["kind"] == "Pod"
    assert meta["name"] == "llama-node-1"
    assert meta["namespace"] == "ml"
    assert meta["labels"] == {
        "largo.dev/job-name": "llama",
        "largo.dev/node-rank": "1",
        "largo.dev/attempt": "3",
    }
    assert meta["annotations"] == {  # rank 1: no metrics to scrape, only the reporting pod serves them
        "largo.dev/placement-node": "gpu-node-7",
        "largo.dev/spec-hash": pod_spec_hash(job.spec),
    }
    assert "ownerReferences" not in meta
    spec = pod["spec"]
    assert spec["hostname"] == "llama-node-1"
    assert spec["subdomain"] == "llama"
    assert spec["restartPolicy"] == "Never"
    assert spec["enableServiceLinks"] is False
    assert "schedulerName" not in spec
    assert "nodeName" not in spec


def test_node_affinity_pins_the_pod() -> None:
    pod = build_pod(make_job(**GPU_JOB), 0, "gpu-node-7", attempt=0)
    required = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required == {
        "nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-7"]}]}
        ]
    }


def test_gpu_limits_and_toleration() -> None:
    pod = build_pod(make_job(**GPU_JOB), 0, "n0", attempt=0)
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "trainer"
    assert container["image"] == "trainer:1"
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "8"
    assert (
        resources["requests"] == resources["limits"] == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "8"}
    )
    assert {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    } in pod["spec"]["tolerations"]


def test_no_resources_no_gpu_toleration() -> None:
    pod = build_pod(make_job(), 0, "n0", attempt=0)
    assert "resources" not in pod["spec"]["containers"][0]
    assert "tolerations" not in pod["spec"]


def test_checkpoint_mount() -> None:
    job = make_job(**GPU_JOB, checkpoint={"claimName": "ckpt", "path": "/ckpt", "subPath": "llama"})
    pod = build_pod(job, 0, "n0", attempt=0)
    assert {
        "name": "largo-checkpoint",
        "persistentVolumeClaim": {"claimName": "ckpt"},
    } in pod["spec"]["volumes"]
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert {
        "name": "largo-checkpoint",
        "mountPath": "/ckpt",
        "subPath": "llama",
    } in mounts
    assert env_of(pod)["LARGO_CHECKPOINT_DIR"] == "/ckpt"


def test_shm_volume_unless_user_mounts_one() -> None:
    pod = build_pod(make_job(), 0, "n0", attempt=0)
    assert {"name": "largo-dshm", "mountPath": "/dev/shm"} in pod["spec"]["containers"][0]["volumeMounts"]
    job = make_job(
        podTemplate={
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
        }
    )
    pod = build_pod(job, 0, "n0", attempt=0)
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["shm"]
    assert [m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]] == ["shm"]


def test_pod_template_and_scheduling_pass_through() -> None:
    job = make_job(
        **GPU_JOB,
        command=["torchrun"],
        args=["train.py"],
        scheduling={"schedulerName": "largo-scheduler"},
        podTemplate={
            "nodeSelector": {"pool": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}],
            # (largo.dev/ keys of a template's own are refused by the API: test_api_trainjob.)
            "annotations": {"team": "x"},
            "labels": {"team": "x"},
            "serviceAccountName": "trainer",
            "securityContext": {"runAsNonRoot": True},
            "containerSecurityContext": RESTRICTED,
            "priorityClassName": "high",
            "terminationGracePeriodSeconds": 120,
            "imagePullSecrets": [{"name": "registry"}],
        },
    )
    pod = build_pod(job, 0, "n0", attempt=1)
    spec = pod["spec"]
    assert spec["containers"][0]["command"] == ["torchrun"]
    assert spec["containers"][0]["args"] == ["train.py"]
    assert spec["schedulerName"] == "largo-scheduler"
    assert spec["nodeSelector"] == {"pool": "h100"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present"}]
    assert spec["serviceAccountName"] == "trainer"
    assert spec["securityContext"] == {"runAsNonRoot": True}
    assert spec["containers"][0]["securityContext"] == RESTRICTED  # a restricted namespace admits it
    assert "securityContext" not in build_pod(make_job(), 0, "n0", attempt=0)["spec"]["containers"][0]
    assert spec["priorityClassName"] == "high"
    assert spec["terminationGracePeriodSeconds"] == 120
    assert "terminationGracePeriodSeconds" not in build_pod(make_job(), 0, "n0", attempt=0)["spec"]
    # torchrun waits that long for its workers' last checkpoint after a SIGTERM (its own default: 30 s,
    # the pod's default grace period too).
    assert env_of(pod)["PET_SHUTDOWN_TIMEOUT"] == "120"
    assert "PET_SHUTDOWN_TIMEOUT" not in env_of(build_pod(make_job(), 0, "n0", attempt=0))
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert "imagePullSecrets" not in build_pod(make_job(), 0, "n0", attempt=0)["spec"]
    assert pod["metadata"]["labels"]["team"] == "x"
    assert pod["metadata"]["labels"]["largo.dev/attempt"] == "1"
    assert pod["metadata"]["annotations"] == {
        "team": "x",
        "largo.dev/placement-node": "n0",
        "largo.dev/spec-hash": pod_spec_hash(job.spec),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9400",
        "prometheus.io/path": "/metrics",
    }


def test_builders_do_not_mutate_the_job() -> None:
    job = make_job(**GPU_JOB, podTemplate={"volumes": [{"name": "v", "emptyDir": {}}]})
    before = job.model_dump()
    build_pod(job, 0, "n0", attempt=0)["spec"]["volumes"].append({"name": "extra"})
    assert job.model_dump() == before


def test_build_pods_by_rank() -> None:
    pods = build_pods(make_job(**GPU_JOB), ["a", "b"], attempt=0)
    assert [p["metadata"]["name"] for p in pods] == ["llama-node-0", "llama-node-1"]
    assert [p["metadata"]["annotations"]["largo.dev/placement-node"] for p in pods] == [
        "a",
        "b",
    ]
    with pytest.raises(ValueError, match="numNodes"):
        build_pods(make_job(**GPU_JOB), ["a"], attempt=0)


def test_invalid_arguments() -> None:
    job = make_job(**GPU_JOB)
    with pytest.raises(ValueError, match="rank"):
        build_pod(job, 2, "n", attempt=0)
    with pytest.raises(ValueError, match="attempt"):
        build_pod(job, 0, "n", attempt=-1)
    with pytest.raises(ValueError, match="namespace"):
        build_service(make_job(namespace=None))


def test_selectors() -> None:
    assert names.gang_selector("llama", 2) == {
        "largo.dev/job-name": "llama",
        "largo.dev/attempt": "2",
    }
    assert (
        names.label_selector(names.gang_selector("llama", 2))
        == "largo.dev/attempt=2,largo.dev/job-name=llama"
    )


def test_the_spec_hash_moves_with_the_fields_that_shape_pods_only() -> None:
    base = make_job(**GPU_JOB)
    same = pod_spec_hash(base.spec)
    assert pod_spec_hash(make_job(**GPU_JOB).spec) == same
    for change in (
        {"args": ["--lr", "0.1"]},
        {"command": ["python", "other.py"]},
        {"env": [{"name": "A", "value": "1"}]},
        {"podTemplate": {"labels": {"team": "y"}}},
        # The pods carry these two: an attempt half created must not mix them.
        {"scheduling": {"schedulerName": "volcano"}},
        {"scheduling": {"exclusiveNodes": True}},
    ):
        assert pod_spec_hash(make_job(**{**GPU_JOB, **change}).spec) != same, change
    for change in (
        {"suspend": True},
        {"activeDeadlineSeconds": 60},
        {"ttlSecondsAfterFinished": 5},
        {"scheduling": {"priority": 5, "queue": "q", "exclusiveNodes": False}},
    ):
        assert pod_spec_hash(make_job(**{**GPU_JOB, **change}).spec) == same, change


def test_exclusive_pods_are_labelled_for_the_scheduler() -> None:
    shared = build_pod(make_job(**GPU_JOB), 0, "n0", attempt=0)
    assert "largo.dev/exclusive-node" not in shared["metadata"]["labels"]
    alone = build_pod(make_job(**GPU_JOB, scheduling={"exclusiveNodes": True}), 0, "n0", attempt=0)
    assert alone["metadata"]["labels"]["largo.dev/exclusive-node"] == "true"


def test_rank_0_s_metrics_port_is_declared_and_discoverable() -> None:
    pod = build_pod(make_job(**GPU_JOB), 0, "n0", attempt=0)
    (container,) = pod["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
    assert env_of(pod)["LARGO_METRICS_PORT"] == "9400"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9400"
    quiet = build_pod(
        make_job(**GPU_JOB, podTemplate={"annotations": {"prometheus.io/scrape": "false"}}),
        0,
        "n0",
        attempt=0,
    )
    assert quiet["metadata"]["annotations"]["prometheus.io/scrape"] == "false"  # the user's word wins
    assert pod["metadata"]["labels"]["largo.dev/reporting"] == "true"
    other = build_pod(make_job(**GPU_JOB), 1, "n1", attempt=0)
    assert [port["name"] for port in other["spec"]["containers"][0]["ports"]] == ["rendezvous"]
    assert "largo.dev/reporting" not in other["metadata"]["labels"]


@pytest.mark.parametrize(
    ("num_nodes", "procs", "tensor", "pipeline"),
    [(2, 8, 1, 1), (2, 8, 8, 2), (4, 2, 2, 2), (4, 2, 1, 4), (3, 4, 2, 3), (2, 1, 1, 2), (4, 4, 2, 2)],
)
def test_the_reporting_pod_runs_the_trainers_reporting_rank(
    num_nodes: int, procs: int, tensor: int, pipeline: int
) -> None:
    job = make_job(
        numNodes=num_nodes, procsPerNode=procs, parallelism={"tensor": tensor, "pipeline": pipeline}
    )
    layout = Layout(num_nodes * procs, tensor, pipeline)
    assert reporting_pod(job.spec) == layout.reporter // procs
    pods = [build_pod(job, rank, f"n{rank}", attempt=0) for rank in range(num_nodes)]
    serving = [
        rank for rank, pod in enumerate(pods) if "prometheus.io/scrape" in pod["metadata"]["annotations"]
    ]
    assert serving == [layout.reporter // procs]


def test_a_spec_written_before_image_pull_secrets_keeps_its_pod_hash() -> None:
    """Unset, the field is not in what the hash reads: an operator upgrade restarts no running job."""
    job = make_job(podTemplate={"nodeSelector": {"pool": "h100"}})
    shaping = job.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert "imagePullSecrets" not in shaping["podTemplate"]
    pulling = {"nodeSelector": {"pool": "h100"}, "imagePullSecrets": [{"name": "r"}]}
    with_secret = make_job(podTemplate=pulling)
    assert pod_spec_hash(with_secret.spec) != pod_spec_hash(job.spec)


def test_a_spec_hashes_as_it_did_in_earlier_versions() -> None:
    """An upgrade of the operator must not make every running gang look out of date (SpecChanged, and a
    gang being created released): a new field of the hashed parts needs a default of None, which leaves
    the hash of a spec that does not set it as it was. These are the hashes earlier versions gave."""
    spec = {
        "command": ["torchrun"],
        "args": ["train.py"],
        "checkpoint": {"claimName": "ckpt"},
        "env": [{"name": "A", "value": "1"}],
        "podTemplate": {"nodeSelector": {"pool": "h100"}},
    }
    assert pod_spec_hash(make_job(**spec).spec) == "318b78d4b48f51d9"
    assert pod_spec_hash(make_job().spec) == "087280be3e89a1b2"


@pytest.mark.parametrize(("checkpoint", "key"), [({}, "ml/ckpt/"), ({"subPath": "run-1/"}, "ml/ckpt/run-1")])
def test_the_scheduler_reads_the_checkpoint_directory_a_trainer_pod_mounts(
    checkpoint: dict[str, Any], key: str
) -> None:
    job = make_job(**GPU_JOB, checkpoint={"claimName": "ckpt", **checkpoint})
    pod = build_pod(job, 0, "n0", attempt=0)
    pod["metadata"]["uid"] = "uid-0"
    pod["spec"]["nodeName"] = "n0"  # bound
    pod["status"] = {"phase": "Running"}
    usage = pod_usage(pod)
    assert usage is not None
    # The same key the job's own request holds the directory by.
    assert usage.checkpoint == key == gang_request(job, ("ml", "llama"), {}).checkpoint
    assert pod_usage({**pod, "spec": {**pod["spec"], "volumes": []}}).checkpoint is None  # type: ignore[union-attr]
    assert usage.resident is False
    owner = [{"kind": "DaemonSet", "controller": True}]
    daemon = {**pod, "metadata": {**pod["metadata"], "ownerReferences": owner}}
    assert pod_usage(daemon).resident is True  # type: ignore[union-attr]
    # Whose rank it is: the controlling object's uid (not a mere owner's).
    owners = [{"kind": "ConfigMap", "uid": "u-cm"}, {"kind": "TrainJob", "uid": "u-job", "controller": True}]
    assert pod_usage({**pod, "metadata": {**pod["metadata"], "ownerReferences": owners}}).owner == "u-job"  # type: ignore[union-attr]
    assert usage.owner is None
