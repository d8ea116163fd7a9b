"""Progress from a real runtime process reaches its TrainJob's status and `kubectl get`; a runtime that
stops reporting is shown as stale, not as frozen progress."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from largo.dev.cluster import LocalCluster, NodePool, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.runtime]

GROUP, VERSION, PLURAL = "largo.dev", "v1alpha1", "trainjobs"


def test_runtime_progress_reaches_the_trainjob_and_goes_stale(
    api: client.ApiClient,
    namespace: str,
    operator: Any,
    gpu_pool: NodePool,
    cluster: LocalCluster,
    tmp_path: Path,
) -> None:
    custom = client.CustomObjectsApi(api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": "reporting"},
        "spec": {
            "image": "trainer:test",
            "numNodes": 1,
            "resourcesPerNode": {"nvidia.com/gpu": 1},
            "podTemplate": {"nodeSelector": dict(gpu_pool.labels)},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def status() -> dict[str, Any]:
        job: Any = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "reporting")
        return dict(job.get("status") or {})

    wait_for(lambda: status().get("phase") == "Running", 90, "job Running", operator.assert_alive)

    # The kwok pod runs no process: rank 0 of the job is this local runtime, with the pod's identity.
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "LARGO_JOB_NAME": "reporting",
        "LARGO_JOB_NAMESPACE": namespace,
        "LARGO_PROGRESS_CONFIGMAP": "reporting-progress",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "largo.runtime.train",
        "--steps",
        "30",
        "--width",
        "32",
        "--context",
        "32",
    ]
    command += ["--batch-size", "4", "--report-every-seconds", "0.2", "--checkpoint-dir", str(tmp_path)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr

    wait_for(lambda: status().get("progress", {}).get("step") == 30, 60, "the last report")
    progress = status()["progress"]
    assert progress["totalSteps"] == 30
    assert progress["percent"] == 100
    assert progress["loss"] > 0
    assert progress["tokensPerSecond"] > 0
    assert progress["checkpointStep"] == 30  # the last step's, written on the writer thread
    # On a busy machine the 3 s stale limit may already have passed when it is read: then the summary
    # says so and keeps the last report's.
    last = progress["summary"].split("(last: ", 1)[-1] if progress["stale"] else progress["summary"]
    assert last.startswith("100% 30/30 loss ")
    shown = cluster.kubectl("get", "trainjob", "reporting", "-n", namespace).stdout
    assert "100% 30/30" in shown
    assert status()["phase"] == "Running"  # the operator's writes leave the runtime's field alone

    # The runtime is gone and the job still "runs": after the stale limit, the column says so.
    wait_for(
        lambda: status().get("progress", {}).get("stale") is True,
        60,
        "progress marked stale",
        operator.assert_alive,
    )
    assert status()["progress"]["summary"].startswith("stale: no report for")
    assert status()["progress"]["step"] == 30
