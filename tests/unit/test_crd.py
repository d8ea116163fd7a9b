"""CRD generator: structural schema, CEL rules, printer columns and drift against crds/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from largo.api import crd

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "crds" / crd.FILENAME


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    return crd.build_crd()


@pytest.fixture(scope="module")
def schema(generated: dict[str, Any]) -> dict[str, Any]:
    (version,) = generated["spec"]["versions"]
    result: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return result


def spec_props(schema: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = schema["properties"]["spec"]["properties"]
    return props


def rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_crd_identity(generated: dict[str, Any]) -> None:
    assert generated["apiVersion"] == "apiextensions.k8s.io/v1"
    assert generated["metadata"]["name"] == "trainjobs.largo.dev"
    spec = generated["spec"]
    assert spec["group"] == "largo.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "plural": "trainjobs",
        "singular": "trainjob",
        "kind": "TrainJob",
        "listKind": "TrainJobList",
        "shortNames": ["tj"],
        "categories": ["largo", "all"],
    }
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


def test_printer_columns(generated: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in generated["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Nodes"] == {
        **columns["Nodes"],
        "jsonPath": ".status.nodes",
        "type": "string",
    }
    assert columns["GPUs"]["jsonPath"] == ".status.gpus"
    assert columns["GPUs"]["type"] == "integer"
    assert columns["Restarts"]["jsonPath"] == ".status.restarts"
    assert columns["Progress"]["jsonPath"] == ".status.progress.summary"
    assert columns["Progress"]["priority"] == 0
    assert columns["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }


def test_printer_columns_point_at_schema_fields(schema: dict[str, Any], generated: dict[str, Any]) -> None:
    for column in generated["spec"]["versions"][0]["additionalPrinterColumns"]:
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] == "metadata":
            continue  # the API server's own fields
        node = schema
        for part in parts:
            node = node["properties"][part]


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    text = json.dumps(schema)
    assert "$ref" not in text
    assert "$defs" not in text
    assert '"title"' not in text
    assert '"const"' not in text
    assert '"null"' not in text
    for path, node in crd.iter_schemas(schema):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            if "anyOf" in node:
                assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        if "|" in path:  # the int-or-string alternatives themselves
            continue
        assert "anyOf" not in node, path
        assert node.get("type") in {
            "object",
            "array",
            "string",
            "integer",
            "number",
            "boolean",
        }, path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        if node["type"] == "object" and path != ".metadata":
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), path
        if "default" in node:
            assert node["default"] is not None, path


def test_top_level_shape(schema: dict[str, Any]) -> None:
    assert schema["type"] == "object"
    assert schema["required"] == ["spec"]
    assert schema["properties"]["metadata"] == {"type": "object", "properties": {"name": {"type": "string"}}}
    assert schema["properties"]["apiVersion"] == {"type": "string"}
    assert schema["properties"]["kind"] == {"type": "string"}
    assert schema["properties"]["spec"]["required"] == ["image"]
    assert schema["properties"]["status"]["type"] == "object"


def test_every_rule_has_a_message_naming_its_field(schema: dict[str, Any]) -> None:
    seen = 0
    for path, node in crd.iter_schemas(schema):
        for rule in node.get("x-kubernetes-validations", []):
            seen += 1
            assert set(rule) <= {"rule", "message", "reason", "fieldPath"}, path
            assert rule["message"].startswith(("spec.", "metadata.name")), (path, rule)
            # The field the API server names: the rule's own, or the one its fieldPath points at.
            named = f"{path}{rule.get('fieldPath', '')}".rstrip(".")
            field = named.rsplit(".", 1)[-1].rstrip("[]")
            assert field in rule["message"] or named == ".spec.env[]", (path, rule)
            if "fieldPath" in rule:
                node_at = node
                for part in rule["fieldPath"].strip(".").split("."):
                    node_at = node_at["properties"][part]  # points at a field the schema has
    assert seen >= 12


def test_cel_rules_present(schema: dict[str, Any]) -> None:
    props = spec_props(schema)
    assert "self.metadata.name.size() <= 50" in rules(schema)
    assert any("oldSelf" in r for r in rules(props["scheduling"]))
    for field in ("numNodes", "procsPerNode", "resourcesPerNode", "image", "backend"):
        assert "self == oldSelf" in rules(props[field]), field
    for field in ("suspend", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert "oldSelf" not in json.dumps(props[field]), field
    assert any("'auto'" in r for r in rules(props["procsPerNode"]))
    assert any("nvidia.com/gpu" in r for r in rules(props["resourcesPerNode"]))
    env_rule = rules(props["env"])[0]
    assert "startsWith('PET_')" in env_rule
    assert "startsWith('LARGO_')" in env_rule
    assert "'WORLD_SIZE'" in env_rule
    assert any("retryableExitCodes" in r for r in rules(props["failurePolicy"]))


def test_lists_and_strings_in_rules_are_bounded(schema: dict[str, Any]) -> None:
    props = spec_props(schema)
    assert props["env"]["maxItems"] == 256
    assert props["env"]["items"]["properties"]["name"]["maxLength"] == 253
    assert props["resourcesPerNode"]["maxProperties"] == 32
    for field in ("permanentExitCodes", "retryableExitCodes"):
        assert props["failurePolicy"]["properties"][field]["maxItems"] == 256
    assert props["image"]["maxLength"] > 0
    assert props["scheduling"]["properties"]["topologyKey"]["maxLength"] > 0


def test_special_field_shapes(schema: dict[str, Any]) -> None:
    props = spec_props(schema)
    assert props["procsPerNode"]["x-kubernetes-int-or-string"] is True
    assert props["procsPerNode"]["default"] == "auto"
    quantity = props["resourcesPerNode"]["additionalProperties"]
    assert quantity["x-kubernetes-int-or-string"] is True
    assert props["backend"]["enum"] == ["auto", "nccl", "gloo"]
    assert props["backend"]["default"] == "auto"
    assert props["numNodes"]["minimum"] == 1
    assert props["numNodes"]["maximum"] == 1024
    assert props["failurePolicy"]["default"] == {}
    assert props["failurePolicy"]["properties"]["backoffLimit"]["default"] == 3
    assert props["scheduling"]["default"] == {}
    assert props["checkpoint"]["properties"]["path"]["default"] == "/checkpoints"
    assert props["env"]["x-kubernetes-list-type"] == "map"
    template = props["podTemplate"]["properties"]
    for field in ("tolerations", "volumes", "volumeMounts"):
        assert template[field]["items"]["x-kubernetes-preserve-unknown-fields"] is True
    assert template["securityContext"]["x-kubernetes-preserve-unknown-fields"] is True
    status = schema["properties"]["status"]["properties"]
    # Progress is typed: the API server itself refuses a status.progress of the wrong shape.
    progress = status["progress"]
    assert "x-kubernetes-preserve-unknown-fields" not in progress
    assert progress["properties"]["updatedAt"]["format"] == "date-time"
    assert progress["properties"]["summary"]["maxLength"] == 200
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert status["phase"]["enum"][0] == "Queued"
    assert status["startTime"]["format"] == "date-time"


def test_render_is_deterministic() -> None:
    first = crd.render_crd()
    assert first == crd.render_crd()
    assert first.startswith("# Generated by `make crds` from operator/src/largo/api/v1alpha1. Do not edit.\n")
    assert yaml.safe_load(first) == crd.build_crd()


def test_committed_crd_matches_generator() -> None:
    assert COMMITTED.read_text() == crd.render_crd(), "crds/ is stale: run `make crds`"


def test_cli_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main(["--out", str(tmp_path), "--check"]) == 1
    assert crd.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "trainjobs.largo.dev.yaml").read_text() == crd.render_crd()
    assert crd.main(["--out", str(tmp_path), "--check"]) == 0
    target = tmp_path / "trainjobs.largo.dev.yaml"
    target.write_text(target.read_text().replace("shortNames:\n    - tj", "shortNames:\n    - tx"))
    capsys.readouterr()
    assert crd.main(["--out", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "-    - tx" in out
    assert "+    - tj" in out


def test_kubectl_explain_shows_defaults_ranges_and_immutability(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert spec["numNodes"]["description"].endswith("(default 1; 1..1024; immutable)")
    assert spec["image"]["description"].endswith("immutable)")
    assert "default 3; 0..10000" in spec["failurePolicy"]["properties"]["backoffLimit"]["description"]
    assert "one of auto, nccl, gloo" in spec["backend"]["description"]
