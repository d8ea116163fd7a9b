"""The Node object of a localnode agent: registration, status and the heartbeat (Lease and Ready)."""

from __future__ import annotations

import datetime
import logging
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from largo.dev.localnode import network
from largo.dev.localnode import status as pod_status

logger = logging.getLogger("largo.localnode")

JSON = dict[str, Any]
NODE_LABEL = "largo.dev/localnode"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    kubeconfig: Path
    state_dir: Path  # pods' volumes and launch files, removed on stop
    logs_dir: Path  # container logs, kept until the cluster goes
    claims_dir: Path  # one directory per PersistentVolumeClaim, shared by the nodes of a cluster
    net: network.BridgeNetwork
    capacity: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)
    mount_registry: Path = Path("/run/largo-localnode/mountpoints.json")
    # TLS for the kubelet endpoint (``kubectl logs``); without them the node serves no logs.
    serving_cert: Path | None = None
    serving_key: Path | None = None
    client_ca: Path | None = None
    # Directories put before the host's in every container's PATH: the host's "installed packages"
    # beyond the virtualenv (the cluster passes its tools' bin, where the router's HAProxy is).
    extra_path: tuple[str, ...] = ()
    # The cluster's DNS server for pods with dnsPolicy ClusterFirst; without it they resolve nothing.
    cluster_dns: str | None = None
    cluster_domain: str = "cluster.local"


def detect_gpus() -> int:
    """GPUs the host really has, as ``nvidia-smi -L`` lists them; 0 without the driver."""
    if shutil.which("nvidia-smi") is None:
        return 0
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))


class NodeRegistration:
    """Registers the Node and keeps it Ready: its Lease in kube-node-lease and its status."""

    def __init__(
        self,
        config: NodeConfig,
        api: client.ApiClient,
        stopping: threading.Event,
        kubelet_port: Callable[[], int],
    ) -> None:
        self.config = config
        self.api = api
        self.core: Any = client.CoreV1Api(api)
        self.stopping = stopping
        self.kubelet_port = kubelet_port
        self.ready_since = pod_status.timestamp(time.time())

    def _node_status(self) -> JSON:
        now = pod_status.timestamp(time.time())
        capacity = dict(self.config.capacity)
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": str(self.config.net.gateway.ip)},
                {"type": "Hostname", "address": self.config.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port()}},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "localnode is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": self.ready_since,
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "osImage": "localnode (processes on the host)",
                "kernelVersion": platform.release(),
                "kubeletVersion": "localnode",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "localnode://processes",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def register(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.config.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            NODE_LABEL: "true",
            **self.config.labels,
        }
        body = {
            "metadata": {"name": self.config.name, "labels": labels},
            "spec": {"podCIDR": str(self.config.net.pod_cidr)},
        }
        try:
            self.core.create_node(body)
        except ApiException as error:
            if error.status != 409:
                raise
            self.core.patch_node(self.config.name, {"metadata": {"labels": labels}})
        self.core.patch_node_status(self.config.name, {"status": self._node_status()})

    def heartbeat(self) -> None:
        coordination: Any = client.CoordinationV1Api(self.api)
        while not self.stopping.is_set():
            # The client re-serializes times with isoformat(), which drops a zero fraction, and a
            # Lease's MicroTime must carry one.
            micro = datetime.datetime.now(datetime.UTC)
            micro = micro.replace(microsecond=micro.microsecond or 1)
            lease = {
                "metadata": {"name": self.config.name, "namespace": "kube-node-lease"},
                "spec": {
                    "holderIdentity": self.config.name,
                    "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": micro,
                },
            }
            try:
                try:
                    coordination.patch_namespaced_lease(self.config.name, "kube-node-lease", lease)
                except ApiException as error:
                    if error.status != 404:
                        raise
                    coordination.create_namespaced_lease("kube-node-lease", lease)
                self.core.patch_node_status(self.config.name, {"status": self._node_status()})
            except Exception as error:  # the next beat tries again; a node must not die of a blip
                logger.warning("heartbeat failed: %s", error)
            self.stopping.wait(HEARTBEAT_SECONDS)
