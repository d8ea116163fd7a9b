"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok, with fake GPU nodes declared in a small spec.

Every wait polls a real readiness signal (``/readyz``, ``/healthz``, node ``Ready``) against a deadline;
every process and temporary directory is removed on exit, after a failure too.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from largo.dev import pki as pki_module
from largo.dev import service_network
from largo.dev import tools as tools_module
from largo.dev.processes import terminate_group

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_VALUE = "fake"
# Upstream kwok stages used as they ship: nodes become Ready and keep their leases fresh; pods are
# created, become ready and are removed on deletion.
_KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/general/pod-create.yaml",
    "pod/general/pod-ready.yaml",
    "pod/general/pod-delete.yaml",
)
_SERVICE_CIDR = "10.0.0.0/24"
_PORT_TAKEN = "address already in use"
_START_ATTEMPTS = 3


class ClusterError(RuntimeError):
    """The local cluster could not start or lost a component."""


@dataclass(frozen=True, slots=True)
class NodePool:
    """A group of identical fake nodes run by kwok."""

    count: int
    name_prefix: str = "gpu-node"
    cpu: str = "64"
    memory: str = "512Gi"
    gpus: int = 8
    pods: int = 110
    labels: Mapping[str, str] = field(default_factory=dict)
    # Nodes are spread over racks of this many nodes: the topology label largo keeps gangs inside.
    nodes_per_rack: int = 0
    # Other extended resources the nodes declare, e.g. {"rdma/hca": "1"} for an RDMA adapter.
    extended: Mapping[str, str] = field(default_factory=dict)

    def node_names(self) -> list[str]:
        return [f"{self.name_prefix}-{index}" for index in range(self.count)]

    def manifests(self) -> list[dict[str, Any]]:
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods), **self.extended}
        if self.gpus:
            capacity["nvidia.com/gpu"] = str(self.gpus)
        out = []
        for index, name in enumerate(self.node_names()):
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **self.labels,
            }
            if self.nodes_per_rack:
                labels["topology.largo.dev/rack"] = f"rack-{index // self.nodes_per_rack}"
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": labels,
                        "annotations": {KWOK_NODE_ANNOTATION: KWOK_NODE_VALUE},
                    },
                    "spec": {},
                    "status": {"capacity": capacity, "allocatable": capacity},
                }
            )
        return out


@dataclass(frozen=True, slots=True)
class LocalNodePool:
    """Nodes run by localnode agents: their pods are real processes (docs/localnode.md). Needs root."""

    count: int
    name_prefix: str = "local-node"
    cpu: str = "2"
    memory: str = "16Gi"
    gpus: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)

    def node_names(self) -> list[str]:
        return [f"{self.name_prefix}-{index}" for index in range(self.count)]


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    node_pools: Sequence[NodePool] = (NodePool(count=2),)
    local_nodes: Sequence[LocalNodePool] = ()


_handed_out: set[int] = set()


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A port nothing listens on, for a server started next. It is drawn from below the kernel's
    ephemeral range: a port bind(0) gives comes from that range, where any outgoing connection of any
    process may take it as its local port before the server binds it. Never the same port twice in
    one process."""
    ephemeral = _ephemeral_ports()
    below = range(max(1024, ephemeral.start - 16384), ephemeral.start)
    for _ in range(200):
        port = below.start + secrets.randbelow(len(below)) if below else 0
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
        if chosen not in _handed_out:
            _handed_out.add(chosen)
            return chosen
    raise ClusterError("no free port below the ephemeral range")


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, check: Callable[[], None] | None = None
) -> None:
    """Polls ``condition`` until it holds; ``check`` raises early when waiting has become pointless."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if check is not None:
            check()
        if condition():
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


@dataclass
class _Component:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    grace: float = 10.0


def _pod_network() -> tuple[str, str]:
    """A bridge name and a /16 pod network no other interface of the host uses, for this cluster."""
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=False).stdout
    used += subprocess.run(["ip", "-o", "route"], capture_output=True, text=True, check=False).stdout
    for second in random.sample(range(64, 128), 64):
        if not re.search(rf"(^|\s)10\.{second}\.", used, re.MULTILINE):
            return f"largo{uuid.uuid4().hex[:6]}", f"10.{second}.0.1/16"
    raise ClusterError("no free 10.x.0.0/16 network for localnode pods")


class LocalCluster:
    """Starts and stops one local cluster. Use as a context manager, or call start() and stop()."""

    def __init__(self, spec: ClusterSpec | None = None, workdir: Path | None = None) -> None:
        self.spec = spec or ClusterSpec()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="largo-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = self.workdir / "kubeconfig"
        self._components: list[_Component] = []
        self._tools: tools_module.Tools | None = None
        self._service_network = False
        self._forwarding_before: str | None = None
        self._pki: pki_module.Pki | None = None
        self.api_port = 0
        self.local_node_names: list[str] = []
        self._pod_network: tuple[str, str] | None = None

    # -- public --------------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def pids(self) -> list[int]:
        return [component.process.pid for component in self._components]

    @property
    def pki(self) -> pki_module.Pki:
        if self._pki is None:
            raise ClusterError("cluster not started")
        return self._pki

    @property
    def tools(self) -> tools_module.Tools:
        if self._tools is None:
            raise ClusterError("cluster not started")
        return self._tools

    def start(self, tools: tools_module.Tools | None = None, timeout: float = 120.0) -> None:
        tools = tools or tools_module.ensure()
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._start(tools, timeout)
                return
            except ClusterError as error:
                # A port found free can be taken by another process before its component binds it:
                # start again on fresh ports, from a clean work directory.
                if _PORT_TAKEN not in str(error) or attempt == _START_ATTEMPTS:
                    self.stop()
                    raise
                self._halt()
                self.local_node_names.clear()
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir.mkdir(parents=True)
            except BaseException:
                self.stop()
                raise

    @property
    def localnode_dir(self) -> Path:
        """Where localnode keeps pods' volumes (state/), container logs (logs/) and claims (claims/)."""
        return self.workdir / "localnode"

    def stop(self) -> None:
        """Stops every component (reverse start order), then removes the work directory if ours."""
        self._halt()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _halt(self) -> None:
        for component in reversed(self._components):
            terminate_group(component.process, component.grace)
        self._components.clear()
        if self._service_network and self._tools is not None:
            # kube-proxy leaves its rules when it stops, as on a real node: remove them.
            service_network.cleanup(self._tools)
            service_network.restore_forwarding(self._forwarding_before)
            self._service_network = False
        self._sweep_pod_network()

    def service_network_leftovers(self) -> list[str]:
        """kube-proxy's nftables tables that still exist (none after stop())."""
        return service_network.kube_proxy_tables(self.tools) if self._tools is not None else []

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs kubectl on this cluster; with ``check``, a failure raises ClusterError with its stderr."""
        done = subprocess.run(
            [self.tools.path("kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            check=False,
            capture_output=True,
            text=True,
        )
        if check and done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def install_crds(self, directory: Path) -> None:
        """Applies every CRD in ``directory`` and waits until each is Established."""
        for path in sorted(directory.glob("*.yaml")):
            self.kubectl("apply", "--server-side", "-f", str(path))
            self.wait_established(yaml.safe_load(path.read_text())["metadata"]["name"])

    def wait_established(self, crd: str, timeout: float = 60.0) -> None:
        """Waits until CustomResourceDefinition ``crd`` is Established. Polled, not ``kubectl wait``: that
        fails at once on a CRD the API server has not yet given any condition."""
        established = '{.status.conditions[?(@.type=="Established")].status}'

        def done() -> bool:
            status = self.kubectl("get", f"crd/{crd}", "-o", f"jsonpath={established}", check=False)
            return status.stdout == "True"

        wait_for(done, timeout, f"CRD {crd} Established")

    def add_nodes(self, pool: NodePool, timeout: float = 60.0) -> list[str]:
        """Creates a pool of kwok nodes and waits until every one is Ready."""
        for manifest in pool.manifests():
            self._api("POST", "/api/v1/nodes", manifest)
        names = pool.node_names()
        wait_for(lambda: all(self._node_ready(name) for name in names), timeout, f"nodes {names} Ready")
        return names

    def assert_running(self) -> None:
        """Raises if any component has exited: a dead component must fail loudly, not hang a wait."""
        for component in self._components:
            code = component.process.poll()
            if code is not None:
                tail = component.log.read_text(errors="replace")[-3000:]
                raise ClusterError(f"{component.name} exited with {code}; log tail:\n{tail}")

    # -- start-up ------------------------------------------------------------------------------------

    def _start(self, tools: tools_module.Tools, timeout: float) -> None:
        self._tools = tools
        missing = tools.missing()
        if missing:
            raise ClusterError(f"tools missing in {tools.root}: {', '.join(missing)}")
        extra_ips: list[str] = []
        if self.spec.local_nodes:
            if os.geteuid() != 0:
                raise ClusterError("localnode nodes need root: they create network namespaces and mounts")
            self._pod_network = _pod_network()
            extra_ips.append(self._pod_network[1].split("/")[0])
        self._pki = pki = pki_module.generate(self.workdir / "pki", extra_ips)
        (self.workdir / "logs").mkdir(exist_ok=True)

        etcd_port, etcd_peer = free_port(), free_port()
        self.api_port = free_port()
        self._spawn(
            "etcd",
            [
                tools.path("etcd"),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        wait_for(
            lambda: http_ok(f"http://127.0.0.1:{etcd_port}/health"),
            timeout,
            "etcd health",
            self.assert_running,
        )

        self._spawn(
            "kube-apiserver",
            [
                tools.path("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.service_account_pub}",
                f"--service-account-signing-key-file={pki.service_account_key}",
                f"--service-cluster-ip-range={_SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                # `kubectl logs` of localnode pods: the API server calls the node's endpoint over TLS,
                # both sides with certificates of the cluster's CA.
                f"--kubelet-client-certificate={pki.kubelet_client_cert}",
                f"--kubelet-client-key={pki.kubelet_client_key}",
                f"--kubelet-certificate-authority={pki.ca_cert}",
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=0",
            ],
        )
        self._write_kubeconfig(pki)
        wait_for(lambda: self._api_ok("/readyz"), timeout, "kube-apiserver /readyz", self.assert_running)

        controller_port, scheduler_port = free_port(), free_port()
        delegated = [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
        ]
        self._spawn(
            "kube-controller-manager",
            [
                tools.path("kube-controller-manager"),
                *delegated,
                f"--secure-port={controller_port}",
                f"--root-ca-file={pki.ca_cert}",
                f"--service-account-private-key-file={pki.service_account_key}",
                f"--service-cluster-ip-range={_SERVICE_CIDR}",
                "--use-service-account-credentials=false",
                # Pods of a deleted node are removed soon, as on a real cluster with a short grace.
                "--terminated-pod-gc-threshold=100",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [tools.path("kube-scheduler"), *delegated, f"--secure-port={scheduler_port}"],
        )
        self._spawn("kwok", self._kwok_command(tools))
        for name, port in (("kube-controller-manager", controller_port), ("kube-scheduler", scheduler_port)):
            healthz = f"https://127.0.0.1:{port}/healthz"
            healthy = partial(http_ok, healthz, insecure=True)
            wait_for(healthy, timeout, f"{name} /healthz", self.assert_running)
        # The controller-manager's ServiceAccount controller must be working before pods can be created.
        wait_for(
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
            timeout,
            "the default ServiceAccount",
            self.assert_running,
        )
        for pool in self.spec.node_pools:
            self.add_nodes(pool, timeout)
        for local_pool in self.spec.local_nodes:
            self.add_local_nodes(local_pool, timeout)
        if self.local_node_names:
            self._start_service_network(tools, timeout)

    def _start_service_network(self, tools: tools_module.Tools, timeout: float) -> None:
        """kube-proxy and CoreDNS for the localnode pods (largo.dev.service_network)."""
        assert self._pod_network is not None
        gateway = self._pod_network[1]
        if not service_network.lock_free():
            raise ClusterError(
                "another local cluster with localnode nodes is running (its kube-proxy holds "
                f"{service_network.LOCK}): stop it first (largo dev down)"
            )
        if service_network.kube_proxy_tables(tools):
            service_network.cleanup(tools)  # what a killed cluster's kube-proxy left
        self._forwarding_before = service_network.enable_forwarding()
        self._service_network = True
        healthz, metrics = free_port(), free_port()
        command = service_network.kube_proxy_command(
            tools, self.kubeconfig, self.local_node_names[0], gateway, healthz, metrics
        )
        self._spawn("kube-proxy", command, env=service_network.tool_env(tools))
        wait_for(
            lambda: http_ok(f"http://127.0.0.1:{healthz}/healthz"),
            timeout,
            "kube-proxy /healthz",
            self.assert_running,
        )
        health, ready = free_port(), free_port()
        corefile = self.workdir / "Corefile"
        corefile.write_text(service_network.corefile(gateway.split("/")[0], self.kubeconfig, health, ready))
        self._spawn("coredns", [tools.path("coredns"), "-conf", str(corefile)])
        wait_for(
            lambda: http_ok(f"http://127.0.0.1:{ready}/ready"), timeout, "CoreDNS /ready", self.assert_running
        )

    def add_local_nodes(self, pool: LocalNodePool, timeout: float = 60.0) -> list[str]:
        """Starts one localnode agent per node of the pool and waits until each node is Ready."""
        if self._pod_network is None:
            raise ClusterError("this cluster was started without localnode nodes, so it has no pod network")
        bridge, gateway = self._pod_network
        second = gateway.split(".")[1]
        names = pool.node_names()
        for name in names:
            index = len(self.local_node_names) + 1
            self.local_node_names.append(name)
            command = [
                sys.executable,
                "-m",
                "largo",
                "dev",
                "localnode",
                f"--name={name}",
                f"--kubeconfig={self.kubeconfig}",
                f"--bridge={bridge}",
                f"--gateway={gateway}",
                f"--pod-cidr=10.{second}.{index}.0/24",
                f"--state-dir={self.localnode_dir / 'state' / name}",
                f"--logs-dir={self.localnode_dir / 'logs'}",
                f"--claims-dir={self.localnode_dir / 'claims'}",
                f"--cpu={pool.cpu}",
                f"--memory={pool.memory}",
                f"--gpus={pool.gpus}",
                f"--serving-cert={self.pki.kubelet_cert}",
                f"--serving-key={self.pki.kubelet_key}",
                f"--client-ca={self.pki.ca_cert}",
                f"--extra-path={self.tools.bin}",
                f"--cluster-dns={gateway.split('/')[0]}",
                f"--cluster-domain={service_network.CLUSTER_DOMAIN}",
                *(f"--label={k}={v}" for k, v in pool.labels.items()),
            ]
            # Stopping a node stops its pods first, each with its grace period.
            self._spawn(f"localnode-{name}", command, grace=90.0)
        wait_for(
            lambda: all(self._node_ready(name) for name in names),
            timeout,
            f"nodes {names} Ready",
            self.assert_running,
        )
        return names

    def pod_network_leftovers(self) -> list[str]:
        """Network namespaces of this cluster's localnode pods that still exist (none after stop())."""
        from largo.dev.localnode import network

        return [
            s for name in self.local_node_names for s in network.list_sandboxes(network.node_prefix(name))
        ]

    def _sweep_pod_network(self) -> None:
        """Whatever a killed localnode left: its pods' namespaces (and processes), then the bridge."""
        if self._pod_network is None:
            return
        from largo.dev.localnode import network

        for name in self.local_node_names:
            for sandbox in network.list_sandboxes(network.node_prefix(name)):
                network.delete_sandbox(sandbox)
        subprocess.run(["ip", "link", "del", self._pod_network[0]], capture_output=True, check=False)

    def _kwok_command(self, tools: tools_module.Tools) -> list[str]:
        configs = [tools.kwok_stages / stage for stage in _KWOK_STAGES]
        own = resources.files("largo.dev") / "stages" / "pod-exit.yaml"
        own_path = self.workdir / "largo-pod-exit.yaml"
        own_path.write_text(own.read_text())
        configs.append(own_path)
        return [
            tools.path("kwok"),
            f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}={KWOK_NODE_VALUE}",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.240.0.1",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{free_port()}",
            *(f"--config={config}" for config in configs),
        ]

    def _spawn(
        self, name: str, command: list[str], grace: float = 10.0, env: dict[str, str] | None = None
    ) -> None:
        log = self.workdir / "logs" / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Own process group: Ctrl-C in a terminal reaches us, and we stop components in order.
                start_new_session=True,
            )
        self._components.append(_Component(name, process, log, grace))

    def _write_kubeconfig(self, pki: pki_module.Pki) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "largo-local",
                    "cluster": {"server": self.server, "certificate-authority": str(pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "largo-admin",
                    "user": {
                        "client-certificate": str(pki.admin_cert),
                        "client-key": str(pki.admin_key),
                    },
                }
            ],
            "contexts": [
                {"name": "largo-local", "context": {"cluster": "largo-local", "user": "largo-admin"}}
            ],
            "current-context": "largo-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))

    # -- API helpers (stdlib only, so start-up needs no client configuration) --------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        assert self._pki is not None
        context = ssl.create_default_context(cafile=str(self._pki.ca_cert))
        context.load_cert_chain(str(self._pki.admin_cert), str(self._pki.admin_key))
        return context

    def _api(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, context=self._ssl_context(), timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read() or b"{}")
            return result

    def _api_ok(self, path: str) -> bool:
        request = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(request, context=self._ssl_context(), timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _node_ready(self, name: str) -> bool:
        try:
            node = self._api("GET", f"/api/v1/nodes/{name}")
        except (urllib.error.URLError, OSError):
            return False
        conditions = node.get("status", {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        # The node lifecycle controller lifts its not-ready taint a moment after Ready: until then the
        # scheduler refuses the node.
        taints = node.get("spec", {}).get("taints") or []
        return ready and not any(t.get("key", "").startswith("node.kubernetes.io/") for t in taints)


def http_ok(url: str, insecure: bool = False) -> bool:
    context = None
    if insecure:
        # Component health ports serve self-signed certificates; only liveness is read from them.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
