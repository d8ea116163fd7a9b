"""The local control plane behaves as real Kubernetes: the base every other integration test stands on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from largo.dev import cluster as cluster_module
from largo.dev.cluster import ClusterError, ClusterSpec, LocalCluster, NodePool, wait_for

pytestmark = pytest.mark.integration


def _pod(name: str, gpus: int, node_selector: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": node_selector,
            "tolerations": [
                {
                    "key": "kwok.x-k8s.io/node",
                    "operator": "Exists",
                    "effect": "NoSchedule",
                }
            ],
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }


def test_version_reports_pinned_release(api: client.ApiClient) -> None:
    version = client.VersionApi(api).get_code()
    assert version.git_version.startswith("v1.36."), version.git_version
    assert version.minor == "36"


def test_a_failing_kubectl_says_what_it_was_told(cluster: LocalCluster) -> None:
    with pytest.raises(ClusterError, match=r"get no-such-kinds exited 1: .*doesn.t have a resource type"):
        cluster.kubectl("get", "no-such-kinds")
    assert cluster.kubectl("get", "no-such-kinds", check=False).returncode == 1


def test_custom_resource_lifecycle(api: client.ApiClient, namespace: str) -> None:
    group = f"g{uuid.uuid4().hex[:6]}.test.largo.dev"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer"}},
                                },
                                "status": {
                                    "type": "object",
                                    "properties": {"phase": {"type": "string"}},
                                },
                            },
                        }
                    },
                }
            ],
        },
    }
    extensions = client.ApiextensionsV1Api(api)
    extensions.create_custom_resource_definition(crd)

    def established() -> bool:
        conditions = extensions.read_custom_resource_definition(f"widgets.{group}").status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(established, 30, "CRD Established")
    custom = client.CustomObjectsApi(api)
    # Watching from the list's resourceVersion replays every change made after it, in order.
    since = custom.list_namespaced_custom_object(group, "v1", namespace, "widgets")["metadata"][
        "resourceVersion"
    ]
    custom.create_namespaced_custom_object(
        group,
        "v1",
        namespace,
        "widgets",
        {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 3},
        },
    )
    # Through the status subresource only the status changes, even when the patch also names spec.
    custom.patch_namespaced_custom_object_status(
        group,
        "v1",
        namespace,
        "widgets",
        "w",
        {"status": {"phase": "Ready"}, "spec": {"size": 99}},
    )
    stream = watch.Watch()
    events = stream.stream(
        custom.list_namespaced_custom_object,
        group,
        "v1",
        namespace,
        "widgets",
        resource_version=since,
        timeout_seconds=30,
    )
    seen: list[tuple[str, Any]] = []
    for event in events:
        seen.append((event["type"], event["object"].get("status", {}).get("phase")))
        if ("MODIFIED", "Ready") in seen:
            stream.stop()
    assert seen[0] == ("ADDED", None)
    assert ("MODIFIED", "Ready") in seen
    widget = custom.get_namespaced_custom_object(group, "v1", namespace, "widgets", "w")
    assert widget["spec"] == {"size": 3}
    assert widget["status"] == {"phase": "Ready"}
    extensions.delete_custom_resource_definition(f"widgets.{group}")


def test_gpu_pods_are_bound_by_the_real_scheduler(
    api: client.ApiClient, namespace: str, gpu_pool: NodePool
) -> None:
    core = client.CoreV1Api(api)
    selector = dict(gpu_pool.labels)
    core.create_namespaced_pod(namespace, _pod("fits", 2, selector))
    core.create_namespaced_pod(namespace, _pod("too-big", 9, selector))

    wait_for(
        lambda: core.read_namespaced_pod("fits", namespace).status.phase == "Running",
        60,
        "pod Running",
    )
    assert core.read_namespaced_pod("fits", namespace).spec.node_name in gpu_pool.node_names()

    def failed_scheduling() -> list[str]:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=too-big").items
        return [e.message for e in events if e.reason == "FailedScheduling"]

    wait_for(lambda: bool(failed_scheduling()), 60, "FailedScheduling event")
    assert "nvidia.com/gpu" in failed_scheduling()[0]
    pod = core.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None


def test_controllers_run_and_garbage_collect(api: client.ApiClient, namespace: str) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{"name": "main", "image": "nginx"}],
                    },
                },
            },
        },
    )

    def pods() -> list[Any]:
        return list(core.list_namespaced_pod(namespace, label_selector="app=web").items)

    wait_for(lambda: len(pods()) == 2, 60, "Deployment pods")
    wait_for(
        lambda: all(p.status.phase == "Running" for p in pods()),
        60,
        "Deployment pods Running",
    )
    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")
    wait_for(
        lambda: not apps.list_namespaced_replica_set(namespace).items,
        60,
        "ReplicaSet collected",
    )
    wait_for(lambda: not pods(), 60, "pods collected")


def _processes_under(path: Path) -> list[int]:
    """Processes whose command line names ``path``: every component of a cluster started there."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(int(entry.name))
    return found


def test_cli_starts_from_nothing_and_leaves_no_process(tmp_path: Path, cluster: LocalCluster) -> None:
    workdir = tmp_path / "dev"
    env = {**os.environ, "LARGO_TOOLS_DIR": str(cluster.tools.root)}
    largo = [sys.executable, "-m", "largo", "dev"]
    up = subprocess.run(
        [*largo, "up", "--detach", "--nodes", "1", "--workdir", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    try:
        components = _processes_under(workdir)
        # supervisor, etcd, kube-apiserver, controller-manager, scheduler, kwok
        assert len(components) >= 6, components
        status = subprocess.run(
            [*largo, "status", "--workdir", str(workdir)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "gpu-node-0" in status.stdout
        kubeconfig = (workdir / "ready").read_text()
        version = subprocess.run(
            [
                cluster.tools.path("kubectl"),
                "--kubeconfig",
                kubeconfig,
                "get",
                "--raw",
                "/version",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(version.stdout)["gitVersion"].startswith("v1.36.")
    finally:
        down = subprocess.run(
            [*largo, "down", "--workdir", str(workdir)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not _processes_under(workdir), 30, "every cluster process to exit")
    assert not (workdir / "cluster" / "etcd").exists()


def test_start_tries_again_when_a_chosen_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port found free may be taken before a component binds it: the start begins again on new ports."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([port])  # etcd's client port, the first pick, is already in use
        real = cluster_module.free_port
        monkeypatch.setattr(cluster_module, "free_port", lambda: next(picks, None) or real())
        attempts: list[int] = []
        start_once = LocalCluster._start

        def counted(self: LocalCluster, *args: Any) -> None:
            attempts.append(self.api_port)
            start_once(self, *args)

        monkeypatch.setattr(LocalCluster, "_start", counted)
        local = LocalCluster(ClusterSpec(node_pools=()))
        local.start()
        try:
            ready = local.kubectl("get", "--raw", "/readyz").stdout
        finally:
            local.stop()
    assert ready == "ok"
    assert len(attempts) == 2
    assert not local.workdir.exists()
