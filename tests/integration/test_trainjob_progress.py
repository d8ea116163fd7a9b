"""The training pods' identity may report progress and nothing else; whatever it reports, the job's
lifecycle goes on. The identity is the demo's: the default ServiceAccount with the Role of
examples/trainjob-demo.yaml, authenticated with a token from the TokenRequest API, as a pod would be."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException
from largo.dev.cluster import LocalCluster, NodePool, wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "largo.dev", "v1alpha1", "trainjobs"
DEMO = Path(__file__).resolve().parents[2] / "examples" / "trainjob-demo.yaml"
EXIT_ANNOTATION = "kwok.largo.dev/exit-code"


def _demo_rbac(namespace: str, api: client.ApiClient) -> None:
    """The demo's Role and RoleBinding, exactly as the example file has them."""
    rbac = client.RbacAuthorizationV1Api(api)
    for document in yaml.safe_load_all(DEMO.read_text()):
        if document["kind"] == "Role":
            rbac.create_namespaced_role(namespace, document)
        elif document["kind"] == "RoleBinding":
            rbac.create_namespaced_role_binding(namespace, document)


def _trainer_client(api: client.ApiClient, namespace: str) -> client.ApiClient:
    """A client that authenticates as the pods' ServiceAccount, with a TokenRequest token."""
    core = client.CoreV1Api(api)
    token = core.create_namespaced_service_account_token(
        "default", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    admin = api.configuration
    configuration = client.Configuration()
    configuration.host = admin.host
    configuration.ssl_ca_cert = admin.ssl_ca_cert
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(configuration)


def _forbidden(call: Callable[[], Any]) -> bool:
    try:
        call()
    except ApiException as error:
        return error.status == 403
    return False


def test_the_trainer_identity_reports_progress_and_nothing_else(
    api: client.ApiClient, namespace: str, operator: Any, gpu_pool: NodePool, cluster: LocalCluster
) -> None:
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    _demo_rbac(namespace, api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": "demo"},
        "spec": {
            "image": "trainer:test",
            "command": ["python", "train.py"],
            "numNodes": 2,
            "resourcesPerNode": {"nvidia.com/gpu": 8},
            "podTemplate": {"nodeSelector": dict(gpu_pool.labels), "terminationGracePeriodSeconds": 1},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def status() -> dict[str, Any]:
        job: Any = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo")
        return dict(job.get("status") or {})

    def condition(type_: str) -> dict[str, Any]:
        return next((c for c in status().get("conditions") or [] if c["type"] == type_), {})

    wait_for(lambda: status().get("phase") == "Running", 90, "demo Running", operator.assert_alive)
    placement = status()["placement"]

    trainer = _trainer_client(api, namespace)
    as_trainer = client.CustomObjectsApi(trainer)
    trainer_core = client.CoreV1Api(trainer)
    forged = {
        "phase": {"status": {"phase": "Succeeded"}},
        "placement": {"status": {"placement": {"attempt": 0, "nodes": ["elsewhere", "elsewhere"]}}},
        "conditions": {"status": {"conditions": [{"type": "Complete", "status": "True"}]}},
    }
    for field, patch in forged.items():
        assert _forbidden(
            lambda patch=patch: as_trainer.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, "demo", patch
            )
        ), f"the trainer identity could write status.{field}"
    assert _forbidden(
        lambda: as_trainer.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "demo", {"spec": {"numNodes": 1}}
        )
    )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "someone-else"}})
    assert _forbidden(
        lambda: trainer_core.patch_namespaced_config_map("someone-else", namespace, {"data": {"x": "y"}})
    )
    assert status()["placement"] == placement

    def report(raw: str) -> None:
        trainer_core.patch_namespaced_config_map("demo-progress", namespace, {"data": {"progress": raw}})

    good = {
        "step": 10,
        "totalSteps": 100,
        "percent": 10,
        "loss": 2.5,
        "updatedAt": "2030-01-01T00:00:00Z",
        "summary": "10% 10/100 loss 2.500",
    }
    report(json.dumps(good))

    def reported_step() -> Any:
        return (status().get("progress") or {}).get("step")

    wait_for(lambda: reported_step() == 10, 60, "the good report", operator.assert_alive)

    garbage = {
        "updatedAt": json.dumps({**good, "step": 20, "updatedAt": "last tuesday"}),
        "step": json.dumps({**good, "step": "twenty"}),
        "larger than": "x" * 1_000_000,
    }
    for says, raw in garbage.items():
        report(raw)
        wait_for(
            lambda says=says: (
                condition("ProgressReported").get("status") == "False"
                and says in condition("ProgressReported").get("message", "")
            ),
            60,
            f"a refusal naming {says}",
            operator.assert_alive,
        )
        assert reported_step() == 10  # the last good report stays
        assert status()["phase"] == "Running"
    described = cluster.kubectl("describe", "trainjob", "demo", "-n", namespace).stdout
    assert "InvalidProgressReport" in described

    # The lifecycle goes on: the pods finish and the job succeeds, garbage and all.
    for pod in core.list_namespaced_pod(namespace, label_selector="largo.dev/job-name=demo").items:
        core.patch_namespaced_pod(
            pod.metadata.name, namespace, {"metadata": {"annotations": {EXIT_ANNOTATION: "0"}}}
        )
    wait_for(lambda: status().get("phase") == "Succeeded", 90, "demo Succeeded", operator.assert_alive)
