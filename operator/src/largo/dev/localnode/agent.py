"""The localnode agent: registers a Node, keeps its Lease fresh and runs the pods bound to it.

One thread watches every pod of the cluster (its own pods to run, the others for the /etc/hosts of its
pods); one thread per pod runs that pod's containers; one thread heart-beats. The pure parts live in
``podspec`` (what to launch) and ``status`` (what to report).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import platform
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from largo.dev.localnode import network, podspec
from largo.dev.localnode import status as pod_status
from largo.dev.localnode.mountpoints import MountPoints
from largo.dev.localnode.server import KubeletServer
from largo.dev.processes import terminate_group

logger = logging.getLogger("largo.localnode")

JSON = dict[str, Any]
NODE_LABEL = "largo.dev/localnode"
STORAGE_CLASS = "largo-local"
PROVISIONER = "largo.dev/localnode"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0
PROVISION_SECONDS = 1.0
_POLL_SECONDS = 0.2


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


def detect_gpus() -> int:
    """GPUs the host really has, as ``nvidia-smi -L`` lists them; 0 without the driver."""
    if shutil.which("nvidia-smi") is None:
        return 0
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))


def _exit_code(returncode: int) -> int:
    """A signal death as a shell and the kubelet report it: 128 + signal."""
    return 128 - returncode if returncode < 0 else returncode


class ApiForwarder(socketserver.ThreadingTCPServer):
    """Makes the API server (on loopback) reachable from pods at the bridge address: the one Service a
    pod needs without kube-proxy. Each connection is piped both ways as raw bytes (TLS passes through)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        super().__init__(listen, _ForwardHandler)


class _ForwardHandler(socketserver.BaseRequestHandler):
    server: ApiForwarder

    def handle(self) -> None:
        with socket.create_connection(self.server.upstream, timeout=10) as upstream:
            upstream.settimeout(None)
            sockets = [self.request, upstream]
            while True:
                readable, _, _ = select.select(sockets, [], [], 60)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (upstream if source is self.request else self.request).sendall(data)


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
        self.ready_since = pod_status.timestamp(time.time())

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
        self._register()
        self._ensure_storage_class()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._provisioner, name="provisioner", daemon=True).start()
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

    # -- node ------------------------------------------------------------------------------------

    def _node_status(self) -> JSON:
        now = pod_status.timestamp(time.time())
        capacity = dict(self.node.capacity)
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": str(self.node.net.gateway.ip)},
                {"type": "Hostname", "address": self.node.name},
            ],
            "daemonEndpoints": {
                "kubeletEndpoint": {"Port": self.kubelet.server_address[1] if self.kubelet else 0}
            },
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

    def _register(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            NODE_LABEL: "true",
            **self.node.labels,
        }
        body = {
            "metadata": {"name": self.node.name, "labels": labels},
            "spec": {"podCIDR": str(self.node.net.pod_cidr)},
        }
        try:
            self.core.create_node(body)
        except ApiException as error:
            if error.status != 409:
                raise
            self.core.patch_node(self.node.name, {"metadata": {"labels": labels}})
        self.core.patch_node_status(self.node.name, {"status": self._node_status()})

    def _ensure_storage_class(self) -> None:
        storage: Any = client.StorageV1Api(self.api)
        body = {
            "metadata": {"name": STORAGE_CLASS},
            "provisioner": PROVISIONER,
            "volumeBindingMode": "Immediate",
            "reclaimPolicy": "Delete",
        }
        try:
            storage.create_storage_class(body)
        except ApiException as error:
            if error.status != 409:  # another node of the cluster made it first
                raise

    def _heartbeat(self) -> None:
        coordination: Any = client.CoordinationV1Api(self.api)
        while not self.stopping.is_set():
            # The client re-serializes times with isoformat(), which drops a zero fraction, and a
            # Lease's MicroTime must carry one.
            micro = datetime.datetime.now(datetime.UTC)
            micro = micro.replace(microsecond=micro.microsecond or 1)
            lease = {
                "metadata": {"name": self.node.name, "namespace": "kube-node-lease"},
                "spec": {
                    "holderIdentity": self.node.name,
                    "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": micro,
                },
            }
            try:
                try:
                    coordination.patch_namespaced_lease(self.node.name, "kube-node-lease", lease)
                except ApiException as error:
                    if error.status != 404:
                        raise
                    coordination.create_namespaced_lease("kube-node-lease", lease)
                self.core.patch_node_status(self.node.name, {"status": self._node_status()})
            except Exception as error:  # the next beat tries again; a node must not die of a blip
                logger.warning("heartbeat failed: %s", error)
            self.stopping.wait(HEARTBEAT_SECONDS)

    def _provisioner(self) -> None:
        while not self.stopping.wait(PROVISION_SECONDS):
            try:
                self._provision_claims()
                self._reclaim_volumes()
            except Exception as error:  # tried again next round
                logger.warning("claim provisioning failed: %s", error)

    def _reclaim_volumes(self) -> None:
        """Deletes released volumes of the class and their directories (reclaim policy Delete)."""
        for volume in self.core.list_persistent_volume(label_selector=f"{NODE_LABEL}=claim").items:
            if volume.status.phase != "Released" or volume.spec.host_path is None:
                continue
            shutil.rmtree(volume.spec.host_path.path, ignore_errors=True)
            with contextlib.suppress(ApiException):
                self.core.delete_persistent_volume(volume.metadata.name)

    def _provision_claims(self) -> None:
        """Binds pending claims of the ``largo-local`` class to a hostPath volume under the claims
        directory, as a local-path provisioner would."""
        for claim in self.core.list_persistent_volume_claim_for_all_namespaces().items:
            if claim.spec.storage_class_name != STORAGE_CLASS or claim.spec.volume_name:
                continue
            namespace, name = claim.metadata.namespace, claim.metadata.name
            path = self.node.claims_dir / namespace / name
            path.mkdir(parents=True, exist_ok=True)
            volume = {
                "metadata": {"name": f"pvc-{claim.metadata.uid}", "labels": {NODE_LABEL: "claim"}},
                "spec": {
                    "capacity": {"storage": (claim.spec.resources.requests or {}).get("storage", "1Gi")},
                    "accessModes": claim.spec.access_modes or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": STORAGE_CLASS,
                    "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                    "claimRef": {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "namespace": namespace,
                        "name": name,
                        "uid": claim.metadata.uid,
                    },
                },
            }
            with contextlib.suppress(ApiException):  # the other nodes of the cluster race for it
                self.core.create_persistent_volume(volume)

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


class PodWorker(threading.Thread):
    """Runs one pod: sandbox, volumes, containers, probes and restarts, status, and deletion."""

    def __init__(self, agent: Agent, pod: JSON) -> None:
        super().__init__(name=f"pod-{pod['metadata']['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = pod["metadata"]["uid"]
        self.name: str = pod["metadata"]["name"]
        self.namespace: str = pod["metadata"]["namespace"]
        self.changed = threading.Event()
        self.stop_requested = False
        self.gone = False
        self.finished = False
        self.sandbox = network.sandbox_name(agent.node.name, self.uid)
        self.sandbox_up = False
        self.pod_ip = ""
        self.pod_dir = agent.node.state_dir / "pods" / self.uid
        self.log_dir = agent.node.logs_dir / f"{self.namespace}_{self.name}_{self.uid}"
        self.started_at = time.time()
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.init_states = [pod_status.ContainerState(c["name"]) for c in spec.get("initContainers") or []]
        self.states = [pod_status.ContainerState(c["name"]) for c in spec["containers"]]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.restart_at: dict[str, float] = {}
        self.readiness: dict[str, pod_status.ProbeTracker] = {}
        self.liveness: dict[str, pod_status.ProbeTracker] = {}
        self.init_failed = False
        self.last_reported: JSON | None = None
        self.volume_sources: dict[str, tuple[str, bool]] = {}
        self.refs = podspec.Referenced()

    # -- called from the agent's thread -------------------------------------------------------------

    def update(self, pod: JSON) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.stop_requested = True
        self.changed.set()

    def request_stop(self, gone: bool = False) -> None:
        self.stop_requested = True
        self.gone = self.gone or gone
        self.changed.set()

    def refresh_hosts(self, peers: list[JSON]) -> None:
        if self.sandbox_up and self.pod_ip:
            network.write_hosts(self.sandbox, podspec.hosts_file(self.pod, self.pod_ip, peers))

    # -- the pod's own thread ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            logger.exception("pod %s/%s: worker failed", self.namespace, self.name)
        finally:
            self._teardown()
            self.finished = True

    def _run(self) -> None:
        if self.pod["metadata"].get("deletionTimestamp"):
            self.stop_requested = True
        while not self.stop_requested and not self._prepare():
            self._report()
            self.changed.wait(2.0)
            self.changed.clear()
        if self.stop_requested:
            return
        self._report()
        for index, container in enumerate(self.pod["spec"].get("initContainers") or []):
            if not self._run_init(index, container):
                self._report()
                self._release_sandbox()
                self._wait_for_deletion()
                return
        while not self.stop_requested:
            self._step()
            self._report()
            phase = pod_status.pod_phase(self.restart_policy, self.states, self.init_failed)
            if pod_status.is_terminal(phase):
                self._release_sandbox()
                self._wait_for_deletion()
                return
            self.changed.wait(_POLL_SECONDS)
            self.changed.clear()
        self._terminate_all(podspec.grace_seconds(self.pod))

    def _wait_for_deletion(self) -> None:
        while not self.stop_requested:
            self.changed.wait(5.0)
            self.changed.clear()

    # -- preparation ----------------------------------------------------------------------------

    def _prepare(self) -> bool:
        """Sandbox and volumes; False to retry later (a ConfigMap may not exist yet)."""
        try:
            refs = self._fetch_referenced()
            if not self.sandbox_up:
                address = self.agent.addresses.allocate(self.uid)
                self.pod_ip = str(address)
                hosts = podspec.hosts_file(self.pod, self.pod_ip, self.agent.snapshot())
                network.create_sandbox(self.agent.node.net, self.sandbox, address, hosts)
                self.sandbox_up = True
            self._materialize_volumes(refs)
            self.refs = refs
            return True
        except podspec.PodSpecError as error:
            self._fail_all(error)
            return error.permanent and self._give_up(error)
        except (ApiException, network.NetworkError, OSError) as error:
            logger.warning("pod %s/%s: not ready to start: %s", self.namespace, self.name, error)
            self._fail_all(podspec.PodSpecError("CreateContainerConfigError", str(error)))
            return False

    def _give_up(self, error: podspec.PodSpecError) -> bool:
        now = time.time()
        self.states = [s.terminated(128, now, error.reason, error.message) for s in self.states]
        self._report()
        self._release_sandbox()
        self._wait_for_deletion()
        self.stop_requested = True
        return False

    def _fail_all(self, error: podspec.PodSpecError) -> None:
        self.states = [
            pod_status.ContainerState(
                s.name, reason=error.reason, message=error.message, restart_count=s.restart_count
            )
            for s in self.states
        ]

    def _fetch_referenced(self) -> podspec.Referenced:
        config_maps, secrets, token = podspec.referenced_names(self.pod)
        found_maps: dict[str, Mapping[str, str]] = {}
        found_secrets: dict[str, Mapping[str, bytes]] = {}
        for name in config_maps:
            with contextlib.suppress(ApiException):
                found_maps[name] = self.agent.core.read_namespaced_config_map(name, self.namespace).data or {}
        for name in secrets:
            with contextlib.suppress(ApiException):
                secret = self.agent.core.read_namespaced_secret(name, self.namespace)
                found_secrets[name] = podspec.decode_secret(secret.data)
        issued = None
        if token:
            account = self.pod["spec"].get("serviceAccountName", "default")
            request = {
                "spec": {
                    "expirationSeconds": 3607,
                    "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
                }
            }
            issued = self.agent.core.create_namespaced_service_account_token(
                account, self.namespace, request
            ).status.token
        return podspec.Referenced(found_maps, found_secrets, issued)

    def _materialize_volumes(self, refs: podspec.Referenced) -> None:
        volumes_dir = self.pod_dir / "volumes"
        for volume in self.pod["spec"].get("volumes") or []:
            plan = podspec.plan_volume(self.pod, volume, refs)
            if plan.kind == "tmpfs":
                self.volume_sources[plan.name] = ("", True)
                continue
            if plan.kind == "host":
                path = Path(plan.host_path)
                if (volume["hostPath"].get("type") or "") in ("DirectoryOrCreate", ""):
                    path.mkdir(parents=True, exist_ok=True)
            elif plan.kind == "claim":
                path = self._claim_path(plan.claim)
            else:
                path = volumes_dir / plan.name
                path.mkdir(parents=True, exist_ok=True)
            for relative, (content, mode) in plan.files.items():
                target = path / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                target.chmod(mode)
            self.volume_sources[plan.name] = (str(path), False)

    def _claim_path(self, claim: str) -> Path:
        """The bound volume's hostPath when it has one, else the claim's directory of the cluster."""
        bound = self.agent.core.read_namespaced_persistent_volume_claim(claim, self.namespace)
        if bound.spec.volume_name:
            volume = self.agent.core.read_persistent_volume(bound.spec.volume_name)
            if volume.spec.host_path is not None:
                path = Path(volume.spec.host_path.path)
                path.mkdir(parents=True, exist_ok=True)
                return path
        path = self.agent.node.claims_dir / self.namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- containers -----------------------------------------------------------------------------

    def _container_specs(self) -> dict[str, JSON]:
        spec = self.pod["spec"]
        return {c["name"]: c for c in [*(spec.get("initContainers") or []), *spec["containers"]]}

    def _launch(self, container: JSON, restart_count: int) -> subprocess.Popen[bytes]:
        pod = {
            **self.pod,
            "status": {
                **(self.pod.get("status") or {}),
                "podIP": self.pod_ip,
                "hostIP": str(self.agent.node.net.gateway.ip),
            },
        }
        base = podspec.pod_base_env(
            pod,
            str(self.agent.node.net.gateway.ip),
            self.agent.api_port,
            f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        env = podspec.container_env(pod, container, self.refs, base)
        argv = podspec.container_argv(container, env)
        mounts = podspec.container_mounts(container, self.volume_sources)
        targets = [(m.target, bool(m.source) and Path(m.source).is_file()) for m in mounts]
        self.agent.mount_points.acquire(self.uid, targets)
        launch = {
            "hostname": podspec.pod_hostname(pod),
            "mounts": [
                {"source": m.source, "target": m.target, "read_only": m.read_only, "tmpfs": m.tmpfs}
                for m in mounts
            ],
            "working_dir": container.get("workingDir") or "/",
            "argv": argv,
            "env": env,
        }
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        launch_file = self.pod_dir / f"launch-{container['name']}.json"
        launch_file.write_text(json.dumps(launch))
        launch_file.chmod(0o600)
        log = self.log_dir / container["name"] / f"{restart_count}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            return subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.sandbox,
                    sys.executable,
                    "-m",
                    "largo.dev.localnode.sandbox",
                    str(launch_file),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _start(self, index: int, container: JSON) -> None:
        state = self.states[index]
        try:
            self.processes[state.name] = self._launch(container, state.restart_count)
        except podspec.PodSpecError as error:
            self.states[index] = state.terminated(128, time.time(), error.reason, error.message)
            return
        now = time.time()
        self.states[index] = state.running(now)
        for kind, trackers in (("readinessProbe", self.readiness), ("livenessProbe", self.liveness)):
            if container.get(kind):
                trackers[state.name] = pod_status.ProbeTracker(container[kind], started_at=now)
        if not container.get("readinessProbe"):
            self.states[index] = dataclasses.replace(self.states[index], ready=True)

    def _run_init(self, index: int, container: JSON) -> bool:
        """Runs an init container to completion, restarting it unless the policy is Never."""
        while not self.stop_requested:
            state = self.init_states[index]
            try:
                process = self._launch(container, state.restart_count)
            except podspec.PodSpecError as error:
                self.init_states[index] = state.terminated(128, time.time(), error.reason, error.message)
                self.init_failed = True
                return False
            self.init_states[index] = state.running(time.time())
            self._report()
            while process.poll() is None and not self.stop_requested:
                self.changed.wait(_POLL_SECONDS)
                self.changed.clear()
            if self.stop_requested:
                terminate_group(process, podspec.grace_seconds(self.pod))
                return False
            code = _exit_code(process.returncode)
            self.init_states[index] = self.init_states[index].terminated(code, time.time())
            if code == 0:
                return True
            if self.restart_policy == "Never":
                self.init_failed = True
                return False
            self.init_states[index] = self.init_states[index].restarting()
            self._report()
            self.changed.wait(pod_status.backoff_seconds(self.init_states[index].restart_count - 1))
        return False

    def _step(self) -> None:
        """Starts what should run, notices exits, runs probes."""
        specs = self._container_specs()
        now = time.time()
        for index, state in enumerate(self.states):
            process = self.processes.get(state.name)
            if state.state == "waiting" and now >= self.restart_at.get(state.name, 0):
                self._start(index, specs[state.name])
            elif state.state == "running" and process is not None and process.poll() is not None:
                self._exited(index, _exit_code(process.returncode))
        self._probe(specs, now)

    def _exited(self, index: int, code: int, reason: str = "", message: str = "") -> None:
        state = self.states[index].terminated(code, time.time(), reason, message)
        self.processes.pop(state.name, None)
        self.readiness.pop(state.name, None)
        self.liveness.pop(state.name, None)
        if pod_status.should_restart(self.restart_policy, code):
            self.restart_at[state.name] = time.time() + pod_status.backoff_seconds(state.restart_count)
            state = state.restarting()
        self.states[index] = state

    def _probe(self, specs: Mapping[str, JSON], now: float) -> None:
        for index, state in enumerate(self.states):
            if state.state != "running":
                continue
            readiness = self.readiness.get(state.name)
            if readiness is not None and readiness.due(now):
                verdict = readiness.observe(self._check(readiness.probe, specs[state.name]), now)
                if verdict is not None:
                    self.states[index] = dataclasses.replace(state, ready=verdict)
            liveness = self.liveness.get(state.name)
            if liveness is None or not liveness.due(now):
                continue
            if liveness.observe(self._check(liveness.probe, specs[state.name]), now) is False:
                process = self.processes.get(state.name)
                if process is not None:
                    terminate_group(process, podspec.grace_seconds(self.pod))
                    message = "liveness probe failed: container will be restarted"
                    self._exited(index, _exit_code(process.returncode), "Error", message)

    def _check(self, probe: JSON, container: JSON) -> bool:
        """One probe run against the pod's address (HTTP, TCP) or inside its sandbox (exec)."""
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                action = probe["httpGet"]
                port = _port(action["port"], container)
                scheme = str(action.get("scheme", "HTTP")).lower()
                url = f"{scheme}://{self.pod_ip}:{port}{action.get('path', '/')}"
                request = urllib.request.Request(url)
                for header in action.get("httpHeaders") or []:
                    request.add_header(header["name"], header["value"])
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return 200 <= int(response.status) < 400
            if "tcpSocket" in probe:
                port = _port(probe["tcpSocket"]["port"], container)
                with socket.create_connection((self.pod_ip, port), timeout=timeout):
                    return True
            if "exec" in probe:
                command = ["ip", "netns", "exec", self.sandbox, *probe["exec"]["command"]]
                return (
                    subprocess.run(command, capture_output=True, timeout=timeout, check=False).returncode == 0
                )
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return False
        return False

    # -- stopping -------------------------------------------------------------------------------

    def _terminate_all(self, grace: int) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, process in list(self.processes.items()):
            remaining = max(deadline - time.monotonic(), 0)
            terminate_group(process, remaining, already_signalled=True)
            index = next(i for i, s in enumerate(self.states) if s.name == name)
            self.states[index] = self.states[index].terminated(_exit_code(process.returncode), time.time())
        self.processes.clear()

    def _release_sandbox(self) -> None:
        if self.sandbox_up:
            network.delete_sandbox(self.sandbox)
            self.sandbox_up = False
        self.agent.addresses.release(self.uid)
        self.agent.mount_points.release(self.uid)

    def _teardown(self) -> None:
        with contextlib.suppress(Exception):
            self._terminate_all(0)
        self._release_sandbox()
        shutil.rmtree(self.pod_dir, ignore_errors=True)
        if self.gone or not self.pod["metadata"].get("deletionTimestamp") or self.agent.stopping.is_set():
            return
        # The kubelet's last word: the pod's containers are gone, the API server may forget it.
        options = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid)
        )
        with contextlib.suppress(ApiException):
            self.agent.core.delete_namespaced_pod(self.name, self.namespace, body=options)

    def _report(self) -> None:
        status = pod_status.pod_status(
            self.pod,
            self.states,
            self.init_states,
            self.pod_ip if self.sandbox_up else "",
            str(self.agent.node.net.gateway.ip),
            self.started_at,
            time.time(),
            self.init_failed,
        )
        if status == self.last_reported:
            return
        try:
            self.agent.core.patch_namespaced_pod_status(self.name, self.namespace, {"status": status})
            self.last_reported = status
        except ApiException as error:
            if error.status == 404:
                self.request_stop(gone=True)
            else:
                logger.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, error)


def _port(port: int | str, container: JSON) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"no container port named {port!r}")


def parse_network(bridge: str, gateway: str, pod_cidr: str) -> network.BridgeNetwork:
    return network.BridgeNetwork(bridge, ipaddress.IPv4Interface(gateway), ipaddress.IPv4Network(pod_cidr))
