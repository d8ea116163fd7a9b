"""The localnode agent: a Node whose pods run as processes of this machine.

It wires the parts together: ``node`` (registration and heartbeat), ``claims`` (the local
StorageClass), ``forwarder`` (the API server at the bridge address), ``server`` (the kubelet log
endpoint) and one ``worker`` thread per pod. One thread watches every pod of the cluster: its own pods
to run, the others for the /etc/hosts of its pods. The pure parts live in ``podspec`` (what to launch)
and ``status`` (what to report).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import threading
import urllib.parse
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from largo.dev.localnode import network
from largo.dev.localnode.claims import ClaimProvisioner
from largo.dev.localnode.forwarder import ApiForwarder
from largo.dev.localnode.mountpoints import MountPoints
from largo.dev.localnode.node import NODE_LABEL, NodeConfig, NodeRegistration, detect_gpus
from largo.dev.localnode.server import KubeletServer
from largo.dev.localnode.worker import PodWorker

logger = logging.getLogger("largo.localnode")

JSON = dict[str, Any]
__all__ = ["NODE_LABEL", "Agent", "NodeConfig", "detect_gpus", "parse_network"]


class Agent:
    def __init__(self, node: NodeConfig) -> None:
        self.node = node
        self.api = config.new_client_from_config(config_file=str(node.kubeconfig))  # type: ignore[no-untyped-call]
        # JSON-shaped bodies throughout, as the API takes them; the typed models add nothing here.
        self.core: Any = client.CoreV1Api(self.api)
        self.stopping = threading.Event()
        self.pods: dict[str, JSON] = {}  # every pod of the cluster, by uid
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.addresses = network.AddressPool(node.net.pod_cidr, reserved={node.net.gateway.ip})
        self.mount_points = MountPoints(node.mount_registry)
        self.forwarder: ApiForwarder | None = None
        self.api_port = 0
        self.kubelet: KubeletServer | None = None
        self.registration = NodeRegistration(node, self.api, self.stopping, self._kubelet_port)
        self.claims = ClaimProvisioner(self.api, node.claims_dir, self.stopping)

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> None:
        network.ensure_bridge(self.node.net)
        for leftover in network.list_sandboxes(network.node_prefix(self.node.name)):
            network.delete_sandbox(leftover)
        upstream = urllib.parse.urlsplit(self.api.configuration.host)
        self.forwarder = ApiForwarder(
            (str(self.node.net.gateway.ip), 0), (upstream.hostname or "127.0.0.1", upstream.port or 443)
        )
        self.api_port = self.forwarder.server_address[1]
        threading.Thread(target=self.forwarder.serve_forever, name="api-forwarder", daemon=True).start()
        node = self.node
        if node.serving_cert is not None and node.serving_key is not None and node.client_ca is not None:
            self.kubelet = KubeletServer(
                (str(node.net.gateway.ip), 0),
                node.logs_dir,
                self.container_running,
                self.stopping,
                node.serving_cert,
                node.serving_key,
                node.client_ca,
            )
            threading.Thread(target=self.kubelet.serve_forever, name="kubelet-server", daemon=True).start()
        self.registration.register()
        self.claims.ensure_storage_class()
        threading.Thread(target=self.registration.heartbeat, name="heartbeat", daemon=True).start()
        threading.Thread(target=self.claims.run, name="provisioner", daemon=True).start()
        logger.info("node %s ready; pods get %s", self.node.name, self.node.net.pod_cidr)
        try:
            self._watch_pods()
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stopping.set()

    def shutdown(self) -> None:
        """Stops every pod (SIGTERM, its grace, SIGKILL) and removes what the node created on the host."""
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.request_stop()
        for worker in workers:
            worker.join(timeout=60)
        for server in (self.forwarder, self.kubelet):
            if server is not None:
                server.shutdown()
                server.server_close()
        network.remove_bridge_if_unused(self.node.net)
        shutil.rmtree(self.node.state_dir, ignore_errors=True)

    def _kubelet_port(self) -> int:
        return self.kubelet.server_address[1] if self.kubelet else 0

    # -- pods ------------------------------------------------------------------------------------

    def _watch_pods(self) -> None:
        resource_version = ""
        while not self.stopping.is_set():
            try:
                if not resource_version:
                    response = self.core.list_pod_for_all_namespaces(_preload_content=False)
                    listed = json.loads(response.data)
                    with self.lock:
                        self.pods = {p["metadata"]["uid"]: p for p in listed["items"]}
                    resource_version = listed["metadata"]["resourceVersion"]
                    self._sync()
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                    self.core.list_pod_for_all_namespaces,
                    resource_version=resource_version,
                    timeout_seconds=5,
                    allow_watch_bookmarks=True,
                )
                for event in stream:
                    raw = event["raw_object"]
                    resource_version = raw["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    uid = raw["metadata"]["uid"]
                    with self.lock:
                        if event["type"] == "DELETED":
                            self.pods.pop(uid, None)
                        else:
                            self.pods[uid] = raw
                    self._sync()
                    if self.stopping.is_set():
                        break
            except ApiException as error:
                if error.status == 410:
                    resource_version = ""
                    continue
                logger.warning("pod watch failed: %s", error)
                self.stopping.wait(1.0)
            except Exception as error:  # keep the node alive through API server restarts
                logger.warning("pod watch failed: %s", error)
                resource_version = ""
                self.stopping.wait(1.0)

    def _sync(self) -> None:
        """Starts a worker for each new pod of this node, tells the others what changed, and refreshes
        the hosts files of its pods."""
        with self.lock:
            mine = {
                uid: pod for uid, pod in self.pods.items() if pod["spec"].get("nodeName") == self.node.name
            }
            for uid, pod in mine.items():
                worker = self.workers.get(uid)
                if worker is None:
                    if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                        continue  # finished before this agent started: nothing to run
                    worker = self.workers[uid] = PodWorker(self, pod)
                    worker.start()
                else:
                    worker.update(pod)
            for uid, worker in list(self.workers.items()):
                if uid not in mine:
                    worker.request_stop(gone=True)
                if not worker.is_alive() and worker.finished:
                    del self.workers[uid]
            peers = list(self.pods.values())
            workers = list(self.workers.values())
        for worker in workers:
            worker.refresh_hosts(peers)

    def container_running(self, namespace: str, pod: str, container: str) -> bool:
        with self.lock:
            workers = [w for w in self.workers.values() if (w.namespace, w.name) == (namespace, pod)]
        return any(
            state.name == container and state.state == "running" for w in workers for state in w.states
        )

    def snapshot(self) -> list[JSON]:
        with self.lock:
            return list(self.pods.values())


def parse_network(bridge: str, gateway: str, pod_cidr: str) -> network.BridgeNetwork:
    return network.BridgeNetwork(bridge, ipaddress.IPv4Interface(gateway), ipaddress.IPv4Network(pod_cidr))
