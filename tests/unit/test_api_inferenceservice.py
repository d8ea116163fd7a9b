"""The InferenceService API: the models' validation (the CEL rules' twins, same messages), the
generated CRD's /scale subresource, columns and rules, and the example a user copies first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from largo.api import crd
from largo.api.v1alpha1 import InferenceService, RuntimeType, validation_messages

REPO = Path(__file__).resolve().parents[2]


def service(**spec: Any) -> InferenceService:
    body = {"metadata": {"name": "chat", "namespace": "ns"}, "spec": {"model": {"claimName": "w"}, **spec}}
    return InferenceService.from_body(body)


def refusal(**spec: Any) -> str:
    with pytest.raises(pydantic.ValidationError) as error:
        service(**spec)
    return "; ".join(validation_messages(error.value))


def test_defaults_are_one_largo_replica_of_one_pod() -> None:
    spec = service().spec
    assert (spec.replicas, spec.nodes_per_replica, spec.runtime.type) == (1, 1, RuntimeType.LARGO)
    assert (spec.rollout.max_surge, spec.rollout.max_unavailable) == (1, 0)
    assert spec.autoscaling is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"model": {}}, "spec.model: set exactly one of claimName or fromTrainJob"),
        ({"model": {"claimName": "w", "fromTrainJob": {"name": "j"}}}, "set exactly one of claimName"),
        ({"model": {"fromTrainJob": {"name": "j"}, "path": "x"}}, "spec.model.path is a directory inside"),
        ({"runtime": {"type": "custom"}}, "spec.runtime.image is required when spec.runtime.type is custom"),
        ({"runtime": {"port": 9400}}, "spec.runtime.port must not be 9400 (the metrics page)"),
        ({"runtime": {"port": 29500}}, "or 29500 (the pipeline's rendezvous)"),
        ({"podTemplate": {"labels": {"largo.dev/replica": "spoofed"}}}, "must not use largo's own keys"),
        ({"runtime": {"type": "vllm"}}, "must be at least 1 with spec.runtime.type vllm"),
        (
            {"runtime": {"type": "vllm"}, "resourcesPerNode": {"nvidia.com/gpu": 0}},
            "must be at least 1 with spec.runtime.type vllm",
        ),
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas must be <= spec.autoscaling"),
        ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "cannot both be 0"),
        ({"resourcesPerNode": {"nvidia.com/gpu": "1.5"}}, "must be a whole non-negative number"),
        # The scheduler counts every service's requests in each pass: what it could not count is refused.
        ({"resourcesPerNode": {"memory": -1}}, "spec.resourcesPerNode['memory']: negative quantity"),
        ({"resourcesPerNode": {"memory": "-1Gi"}}, "spec.resourcesPerNode['memory'] is not a valid"),
        ({"resourcesPerNode": {"cpu": "10E"}}, "spec.resourcesPerNode['cpu']: quantity '10E' for cpu is"),
        ({"env": [{"name": "LARGO_MEMBER", "value": "3"}]}, "are reserved"),
        ({"replicas": -1}, "replicas"),
        ({"model": {"claimName": "w", "path": "../other-model"}}, "spec.model.path must not contain '..'"),
        ({"model": {"claimName": "w", "path": "a/../../b"}}, "spec.model.path must not contain '..'"),
        (
            {"podTemplate": {"volumeMounts": [{"name": "v", "mountPath": "/model/"}]}},
            "must not mount over /model, where the model is mounted",
        ),
        (
            {
                "runtime": {"type": "vllm", "port": 6379},
                "nodesPerReplica": 2,
                "resourcesPerNode": {"nvidia.com/gpu": 1},
            },
            "spec.runtime.port must not be 6379 with spec.runtime.type vllm",
        ),
    ],
)
def test_bad_specs_are_refused_with_the_field_named(spec: dict[str, Any], message: str) -> None:
    assert message in refusal(**spec)


def test_a_long_or_malformed_name_is_refused() -> None:
    for name, message in (("x" * 46, "at most 45 characters"), ("9lives", "DNS-1035 label")):
        body = {"metadata": {"name": name}, "spec": {"model": {"claimName": "w"}}}
        with pytest.raises(pydantic.ValidationError) as error:
            InferenceService.from_body(body)
        assert message in str(error.value)


def test_the_crd_has_scale_columns_and_the_rules_messages() -> None:
    generated = crd.build_crd(crd.INFERENCE_SERVICE)
    assert generated["metadata"]["name"] == "inferenceservices.largo.dev"
    names = generated["spec"]["names"]
    assert names["shortNames"] == ["infsvc"]
    assert names["categories"] == ["largo", "all"]
    (version,) = generated["spec"]["versions"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready",
        "URL",
        "Model",
        "Reason",
        "Age",
    ]
    text = yaml.safe_dump(version["schema"])
    for message in (
        "set exactly one of claimName or fromTrainJob",
        "spec.runtime.image is required when spec.runtime.type is custom",
        "spec.autoscaling.minReplicas must be <= spec.autoscaling.maxReplicas",
        "cannot both be 0",
    ):
        assert message in text
    # Structural: OpenAPI v3.0's boolean exclusive bounds, never JSON Schema's numeric ones.
    bounds = {
        path: node["exclusiveMinimum"]
        for path, node in crd.iter_schemas(version["schema"]["openAPIV3Schema"])
        if "exclusiveMinimum" in node
    }
    assert bounds == {".spec.autoscaling.target": True}


def test_the_committed_crd_is_the_generated_one() -> None:
    committed = (REPO / "crds" / crd.INFERENCE_SERVICE.filename).read_text()
    assert committed == crd.render_crd(crd.INFERENCE_SERVICE)


def test_the_example_is_valid() -> None:
    body = yaml.safe_load((REPO / "examples" / "inferenceservice-vllm.yaml").read_text())
    parsed = InferenceService.from_body(body)
    assert parsed.spec.runtime.type is RuntimeType.VLLM
    assert parsed.spec.nodes_per_replica == 2


def test_ray_s_port_is_free_for_a_vllm_replica_of_one_pod() -> None:
    """Ray starts only for a replica of several pods: one pod may serve on 6379."""
    body = {
        "metadata": {"name": "chat", "namespace": "ml"},
        "spec": {
            "model": {"claimName": "w"},
            "runtime": {"type": "vllm", "port": 6379},
            "resourcesPerNode": {"nvidia.com/gpu": 1},
        },
    }
    assert InferenceService.from_body(body).spec.runtime.port == 6379
