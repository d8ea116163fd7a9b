"""One pod on a localnode node: a thread that prepares its sandbox and volumes, runs its init and
main containers with the restart policy, probes them, reports status, and tears everything down."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from largo.dev.localnode import network, podspec
from largo.dev.localnode import status as pod_status
from largo.dev.processes import kill_leftovers, terminate_group

if TYPE_CHECKING:
    from largo.dev.localnode.agent import Agent

logger = logging.getLogger("largo.localnode")

JSON = dict[str, Any]
_POLL_SECONDS = 0.2


def _exit_code(returncode: int) -> int:
    """A signal death as a shell and the kubelet report it: 128 + signal."""
    return 128 - returncode if returncode < 0 else returncode


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
                node = self.agent.node
                resolv = podspec.resolv_conf(self.pod, node.cluster_dns, node.cluster_domain, _host_resolv())
                network.create_sandbox(node.net, self.sandbox, address, hosts, resolv)
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
            ":".join(
                [
                    str(Path(sys.executable).parent),
                    *self.agent.node.extra_path,
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                ]
            ),
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
            kill_leftovers(process)
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
                kill_leftovers(process)
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


def _host_resolv() -> str:
    try:
        return Path("/etc/resolv.conf").read_text()
    except OSError:
        return ""
