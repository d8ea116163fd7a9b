"""TrainJob model: defaults, aliases and the validators that mirror the CRD's CEL rules."""

from __future__ import annotations

from typing import Any

import pytest
from largo.api.v1alpha1 import (
    Backend,
    ConditionType,
    FailurePolicy,
    Phase,
    Reason,
    TrainJob,
    TrainJobSpec,
    TrainJobStatus,
    validation_messages,
)
from largo.api.v1alpha1 import trainjob as tj
from pydantic import ValidationError


def body(name: str = "llama", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "largo.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"image": "trainer:1", **spec},
    }


def errors(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        TrainJob.model_validate(raw)
    return validation_messages(info.value)


def test_defaults() -> None:
    job = TrainJob.model_validate(body())
    spec = job.spec
    assert spec.num_nodes == 1
    assert spec.procs_per_node == "auto"
    assert spec.backend is Backend.AUTO
    assert spec.env == []
    assert spec.resources_per_node == {}
    assert spec.checkpoint is None
    assert spec.failure_policy == FailurePolicy(
        backoff_limit=3, permanent_exit_codes=[], retryable_exit_codes=[]
    )
    assert spec.suspend is False
    assert spec.scheduling.priority == 0
    assert spec.scheduling.queue == "default"
    assert spec.scheduling.topology_key is None
    assert spec.scheduling.scheduler_name is None
    assert spec.active_deadline_seconds is None
    assert spec.ttl_seconds_after_finished is None
    assert job.status is None


def test_checkpoint_defaults_path() -> None:
    job = TrainJob.model_validate(body(checkpoint={"claimName": "ckpt"}))
    assert job.spec.checkpoint is not None
    assert job.spec.checkpoint.path == "/checkpoints"


def test_round_trip_by_alias() -> None:
    raw = body(
        numNodes=4,
        procsPerNode=2,
        resourcesPerNode={"nvidia.com/gpu": 8, "cpu": "16", "memory": "64Gi"},
        backend="nccl",
        env=[
            {"name": "FOO", "value": "1"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        ],
        checkpoint={"claimName": "ckpt", "path": "/ckpt", "subPath": "llama"},
        failurePolicy={
            "backoffLimit": 5,
            "permanentExitCodes": [1, 2],
            "retryableExitCodes": [137],
        },
        activeDeadlineSeconds=3600,
        ttlSecondsAfterFinished=0,
        suspend=True,
        scheduling={
            "priority": 10,
            "queue": "research",
            "topologyKey": "topology.kubernetes.io/block",
        },
        podTemplate={
            "nodeSelector": {"pool": "h100"},
            "tolerations": [{"key": "x", "operator": "Exists"}],
        },
    )
    job = TrainJob.model_validate(raw)
    assert job.spec.num_nodes == 4
    assert job.spec.failure_policy.retryable_exit_codes == [137]
    assert job.spec.scheduling.topology_key == "topology.kubernetes.io/block"
    out = job.to_body()
    for key, value in raw["spec"].items():
        assert out["spec"][key] == value or key in (
            "failurePolicy",
            "scheduling",
            "podTemplate",
            "checkpoint",
        )
    assert out["spec"]["scheduling"]["queue"] == "research"
    assert out["spec"]["checkpoint"] == {
        "claimName": "ckpt",
        "path": "/ckpt",
        "subPath": "llama",
    }
    assert TrainJob.model_validate(out) == job


def test_populate_by_name() -> None:
    spec = TrainJobSpec(image="x", num_nodes=2, procs_per_node=4)
    assert spec.model_dump(by_alias=True)["numNodes"] == 2


def test_from_body_accepts_mapping_views() -> None:
    from types import MappingProxyType

    job = TrainJob.from_body(MappingProxyType(body(numNodes=2)))
    assert job.spec.num_nodes == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"numNodes": 0}, "spec.numNodes"),
        ({"numNodes": 1025}, "spec.numNodes"),
        ({"procsPerNode": "foo"}, tj.MSG_PROCS_PER_NODE),
        ({"procsPerNode": "8"}, tj.MSG_PROCS_PER_NODE),
        ({"procsPerNode": 0}, tj.MSG_PROCS_PER_NODE),
        ({"resourcesPerNode": {"nvidia.com/gpu": "0.5"}}, tj.MSG_GPU_WHOLE),
        ({"resourcesPerNode": {"nvidia.com/gpu": 0.5}}, tj.MSG_GPU_WHOLE),
        ({"resourcesPerNode": {"nvidia.com/gpu": -1}}, tj.MSG_GPU_WHOLE),
        ({"resourcesPerNode": {"nvidia.com/gpu": "500m"}}, tj.MSG_GPU_WHOLE),
        ({"resourcesPerNode": {"memory": "lots"}}, "not a valid quantity"),
        # What the scheduler could not count is refused here, not met by every scheduling pass.
        ({"resourcesPerNode": {"memory": -1}}, "spec.resourcesPerNode['memory']: negative quantity"),
        ({"resourcesPerNode": {"memory": "-1Gi"}}, "spec.resourcesPerNode['memory'] is not a valid quantity"),
        ({"resourcesPerNode": {"cpu": "10E"}}, "spec.resourcesPerNode['cpu']: quantity '10E' for cpu is out"),
        ({"resourcesPerNode": {"nvidia.com/gpu": "99999999999999999999"}}, "out of range"),
        ({"backend": "mpi"}, "spec.backend"),
        ({"env": [{"name": "PET_NNODES", "value": "2"}]}, tj.MSG_RESERVED_ENV),
        ({"env": [{"name": "LARGO_FOO", "value": "2"}]}, tj.MSG_RESERVED_ENV),
        ({"env": [{"name": "WORLD_SIZE", "value": "2"}]}, tj.MSG_RESERVED_ENV),
        ({"env": [{"name": "MASTER_ADDR", "value": "x"}]}, tj.MSG_RESERVED_ENV),
        ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "unique"),
        (
            {"env": [{"name": "A", "value": "1", "valueFrom": {}}]},
            tj.MSG_ENV_VALUE_EXCLUSIVE,
        ),
        (
            {
                "failurePolicy": {
                    "permanentExitCodes": [1, 3],
                    "retryableExitCodes": [3],
                }
            },
            tj.MSG_EXIT_CODE_OVERLAP,
        ),
        ({"failurePolicy": {"permanentExitCodes": [256]}}, "permanentExitCodes"),
        ({"failurePolicy": {"permanentExitCodes": [1, 1]}}, "duplicates"),
        ({"failurePolicy": {"backoffLimit": -1}}, "backoffLimit"),
        ({"failurePolicy": {"disruptions": "Sometimes"}}, "disruptions"),
        ({"checkpoint": {"claimName": "c", "subPath": "../x"}}, "must not contain '..'"),
        ({"podTemplate": {"labels": {"largo.dev/exclusive-node": "true"}}}, "largo's own keys"),
        ({"podTemplate": {"volumes": [{"name": "largo-dshm", "emptyDir": {}}]}}, "named like largo's own"),
        (
            {
                "checkpoint": {"claimName": "c"},
                "podTemplate": {"volumeMounts": [{"name": "v", "mountPath": "/checkpoints/"}]},
            },
            "must not mount over spec.checkpoint.path",
        ),
        ({"activeDeadlineSeconds": 0}, "activeDeadlineSeconds"),
        ({"ttlSecondsAfterFinished": -1}, "ttlSecondsAfterFinished"),
        ({"checkpoint": {"claimName": "c", "path": "relative"}}, "path"),
        ({"unknownField": 1}, "unknownField"),
        ({"scheduling": {"queue": "Bad Queue"}}, "queue"),
        # Kubernetes' own formats of what goes to the pods: refused here, not by each pod creation.
        ({"resourcesPerNode": {"cpu": "1e1.5"}}, "not a valid quantity"),
        ({"resourcesPerNode": {"bad key": "1"}}, "'bad key' is not a resource name"),
        ({"env": [{"name": "A=B", "value": "1"}]}, "spec.env.0.name"),
        ({"podTemplate": {"serviceAccountName": "Trainer"}}, "serviceAccountName"),
        ({"podTemplate": {"priorityClassName": "high priority"}}, "priorityClassName"),
        ({"podTemplate": {"labels": {"bad key!": "x"}}}, "podTemplate.labels: 'bad key!' is not a valid key"),
        ({"podTemplate": {"labels": {"team": "a b"}}}, "'a b' is not a valid label value"),
        ({"podTemplate": {"labels": {"team": "x" * 64}}}, "is not a valid label value"),
        ({"podTemplate": {"annotations": {"/x": "anything"}}}, "'/x' is not a valid key"),
        ({"podTemplate": {"labels": {"app\n": "x"}}}, "is not a valid key"),
        ({"podTemplate": {"labels": {"app": "web\n"}}}, "is not a valid label value"),
        ({"podTemplate": {"labels": {"Example.com/app": "x"}}}, "is not a valid key"),
    ],
)
def test_spec_rules(spec: dict[str, Any], message: str) -> None:
    messages = errors(body(**spec))
    assert any(message in m for m in messages), messages


def test_reserved_env_message_names_the_reserved_set() -> None:
    (message,) = errors(body(env=[{"name": "RANK", "value": "0"}]))
    for name in (
        "PET_",
        "LARGO_",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
    ):
        assert name in message


def test_unreserved_lookalikes_are_allowed() -> None:
    job = TrainJob.model_validate(
        body(env=[{"name": "MY_RANK", "value": "0"}, {"name": "PETS", "value": "1"}])
    )
    assert [e.name for e in job.spec.env] == ["MY_RANK", "PETS"]


def test_whole_gpus_accepted() -> None:
    for gpus in (0, 8, "8"):
        job = TrainJob.model_validate(body(resourcesPerNode={"nvidia.com/gpu": gpus}))
        assert job.spec.resources_per_node["nvidia.com/gpu"] == gpus


def test_name_too_long() -> None:
    assert TrainJob.model_validate(body(name="a" * 50)).metadata.name == "a" * 50
    (message,) = errors(body(name="a" * 51))
    assert message == tj.MSG_NAME_TOO_LONG
    assert "50" in message


@pytest.mark.parametrize("name", ["1job", "Job", "job.v1", "job-"])
def test_name_must_be_dns_1035_label(name: str) -> None:
    assert errors(body(name=name)) == [tj.MSG_NAME_FORMAT]


def test_status_round_trip_and_tolerates_unknown_fields() -> None:
    raw = {
        "phase": "Running",
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "PodsRunning",
                "lastTransitionTime": "2025-01-02T03:04:05Z",
                "observedGeneration": 1,
            }
        ],
        "podCounts": {"running": 2},
        "nodes": "2/2",
        "gpus": 16,
        "restarts": 0,
        "attempt": 0,
        "placement": {"nodes": ["n1", "n2"]},
        "progress": {
            "summary": "10% 10/100",
            "step": 10,
            "totalSteps": 100,
            "percent": 10,
            "updatedAt": "2025-01-02T03:04:05Z",
        },
        "fieldFromTheFuture": True,
    }
    status = TrainJobStatus.model_validate(raw)
    assert status.phase is Phase.RUNNING
    assert status.pod_counts is not None
    assert status.pod_counts.pending == 0
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["conditions"][0]["lastTransitionTime"] == "2025-01-02T03:04:05Z"
    assert dumped["progress"]["step"] == 10
    assert dumped["progress"]["updatedAt"] == "2025-01-02T03:04:05Z"
    assert dumped["progress"]["stale"] is False
    assert "fieldFromTheFuture" not in dumped


def test_constants_are_str_enums() -> None:
    assert str(ConditionType.ADMITTED) == "Admitted"
    assert str(Reason.BACKOFF_LIMIT_EXCEEDED) == "BackoffLimitExceeded"
    assert isinstance(Reason.PERMANENT_EXIT_CODE, str)
    assert {p.value for p in Phase} == {
        "Queued",
        "Starting",
        "Running",
        "Restarting",
        "Suspending",
        "Succeeded",
        "Failed",
        "Suspended",
    }


@pytest.mark.parametrize(
    ("spec", "accepted"),
    [
        ({"numNodes": 2, "procsPerNode": 2, "parallelism": {"tensor": 2, "pipeline": 2}}, True),
        (
            {"numNodes": 2, "procsPerNode": 2, "parallelism": {"tensor": 4}},
            True,
        ),  # across pods: slow, allowed
        ({"numNodes": 1, "procsPerNode": 2, "parallelism": {"tensor": 4}}, False),
        ({"numNodes": 3, "resourcesPerNode": {"nvidia.com/gpu": "2"}, "parallelism": {"pipeline": 3}}, True),
        ({"numNodes": 1, "resourcesPerNode": {"nvidia.com/gpu": 8}, "parallelism": {"pipeline": 3}}, False),
        ({"numNodes": 1, "parallelism": {"tensor": 2}}, False),  # 'auto' without GPUs: one process
        ({"numNodes": 2, "parallelism": {"pipeline": 2}}, True),
    ],
)
def test_parallelism_must_divide_the_jobs_processes(spec: dict[str, Any], accepted: bool) -> None:
    if accepted:
        job = TrainJob.model_validate(body(**spec))
        assert job.spec.parallelism.tensor * job.spec.parallelism.pipeline > 1
    else:
        assert errors(body(**spec)) == [tj.MSG_PARALLELISM_DIVIDES]


def test_parallelism_defaults_to_plain_data_parallelism() -> None:
    parallelism = TrainJob.model_validate(body()).spec.parallelism
    assert (parallelism.tensor, parallelism.pipeline) == (1, 1)
    assert "tensor" in errors(body(parallelism={"tensor": 0}))[0]


@pytest.mark.parametrize(
    "spec",
    [
        {"resourcesPerNode": {"cpu": "1e3", "memory": "2E+1", "example.com/fpga": "1", "hugepages-2Mi": "1"}},
        {"env": [{"name": "my.var-1", "value": "1"}, {"name": "with space", "value": "2"}]},
        {"podTemplate": {"serviceAccountName": "trainer.ml", "priorityClassName": "high"}},
        {"podTemplate": {"labels": {"app.kubernetes.io/name": "x", "empty": "", "a": "A.b-c_D"}}},
        {"podTemplate": {"annotations": {"example.com/note": "any text at all, = and spaces"}}},
        {"podTemplate": {"annotations": {"Example.com/Owner": "x"}}},  # checked in lower case
    ],
)
def test_kubernetes_formats_that_are_valid_are_taken(spec: dict[str, Any]) -> None:
    TrainJob.model_validate(body(**spec))
