"""The demo TrainJob end to end on localnode nodes: real trainer processes, a real gloo process group
across two pods in two network namespaces, checkpoints on the claim's directory, a gang restart that
resumes from them, and deletion that leaves nothing behind on the host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from largo.dev.cluster import ClusterError, LocalCluster, wait_for
from largo.dev.localnode import network
from largo.dev.operator_process import OperatorProcess
from largo.dev.prometheus import DASHBOARD, PrometheusServer, dashboard_queries, publish_operator

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trainjob-demo.yaml"
GROUP, VERSION, PLURAL = "largo.dev", "v1alpha1", "trainjobs"


class Demo:
    """The example's objects in a namespace of the test's own, with the trainer's flags adjusted."""

    def __init__(self, cluster: LocalCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.namespace = f"e2e-{uuid.uuid4().hex[:6]}"
        self.core.create_namespace({"metadata": {"name": self.namespace}})
        wait_for(self._has_default_account, 60, "the namespace's default ServiceAccount")
        self.phases: list[str] = []
        self.operator: OperatorProcess | None = None

    def _has_default_account(self) -> bool:
        accounts = self.core.list_namespaced_service_account(self.namespace).items
        return any(a.metadata.name == "default" for a in accounts)

    def apply(self, args: list[str], **spec: Any) -> str:
        documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
        job = next(d for d in documents if d["kind"] == "TrainJob")
        job["spec"]["args"] = args
        job["spec"].update(spec)
        path = self.workdir / f"{self.namespace}.yaml"
        path.write_text(yaml.safe_dump_all(documents))
        self.cluster.kubectl("apply", "-n", self.namespace, "-f", str(path))
        return str(job["metadata"]["name"])

    def job(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return found

    def wait(
        self, name: str, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 240
    ) -> None:
        def check() -> bool:
            job = self.job(name)
            phase = job.get("status", {}).get("phase", "")
            if phase and (not self.phases or self.phases[-1] != phase):
                self.phases.append(phase)
            return condition(job)

        try:
            wait_for(check, timeout, what, self.cluster.assert_running)
        except ClusterError as error:
            raise AssertionError(f"{error}\n{self.describe(name)}") from None

    def describe(self, name: str) -> str:
        """What a failed wait shows: the job's status, its pods' states and the operator's last lines."""
        pods = [
            (
                p.metadata.name,
                p.spec.node_name,
                p.status.phase,
                p.metadata.deletion_timestamp,
                [(c.state.to_dict(), c.restart_count) for c in p.status.container_statuses or []],
            )
            for p in self.pods(name)
        ]
        operator_log = (self.cluster.workdir / "operator.log").read_text(errors="replace")[-3000:]
        status = self.job(name).get("status")
        return f"phases {self.phases}\nstatus {status}\npods {pods}\noperator:\n{operator_log}"

    def wait_phase(self, name: str, *phases: str) -> None:
        self.wait(name, lambda job: job.get("status", {}).get("phase") in phases, f"{name} in {phases}")

    def pods(self, name: str) -> list[Any]:
        selector = f"largo.dev/job-name={name}"
        return list(self.core.list_namespaced_pod(self.namespace, label_selector=selector).items)

    def events(self, name: str) -> list[tuple[str, str]]:
        selector = f"involvedObject.name={name},involvedObject.kind=TrainJob"
        items = self.core.list_namespaced_event(self.namespace, field_selector=selector).items
        return [(event.reason, event.message) for event in items]

    def log(self, pod: str) -> str:
        candidates = sorted(
            (self.cluster.localnode_dir / "logs").glob(f"{self.namespace}_{pod}_*/trainer/*.log")
        )
        return "\n".join(p.read_text(errors="replace") for p in candidates)

    def checkpoints(self) -> list[str]:
        claim = self.cluster.localnode_dir / "claims" / self.namespace / "demo-checkpoints"
        return sorted(p.name for p in claim.glob("step-*.pt"))


@pytest.fixture
def demo(local_cluster: LocalCluster, local_operator: OperatorProcess, tmp_path: Path) -> Iterator[Demo]:
    demo = Demo(local_cluster, tmp_path)
    demo.operator = local_operator
    yield demo
    demo.core.delete_namespace(demo.namespace)


def sandboxes(cluster: LocalCluster) -> set[str]:
    names = set()
    for node in cluster.local_node_names:
        names.update(network.list_sandboxes(network.node_prefix(node)))
    return names


def training_pids() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"largo.runtime.train" in command:
                found.add(int(entry.name))
    return found


def test_demo_job_trains_across_two_pods_and_succeeds(demo: Demo) -> None:
    name = demo.apply(
        ["--steps", "120", "--checkpoint-every", "40", "--log-every", "20", "--report-every-seconds", "2"]
    )
    demo.wait_phase(name, "Succeeded", "Failed")
    assert demo.phases[-1] == "Succeeded", demo.phases
    assert demo.phases.index("Running") > 0, demo.phases  # admitted (Queued or Starting) before it ran
    status = demo.job(name)["status"]
    assert status["restarts"] == 0
    assert status["progress"]["step"] == 120

    pods = sorted(demo.pods(name), key=lambda p: p.metadata.name)
    assert [p.status.phase for p in pods] == ["Succeeded", "Succeeded"]
    assert len({p.spec.node_name for p in pods}) == 2
    for pod in pods:
        assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    # Each pod had its own address on the pod network: two network namespaces, one process group.
    rank0, rank1 = demo.log(f"{name}-node-0"), demo.log(f"{name}-node-1")
    assert "process group up: gloo, rank 0 of 4 on host demo-node-0" in rank0
    assert "rank 2 of 4 on host demo-node-1" in rank1
    assert '"step": 120' in rank0
    assert demo.checkpoints() == ["step-000000040.pt", "step-000000080.pt", "step-000000120.pt"]


def test_a_job_with_tensor_and_pipeline_parallelism_trains_across_two_pods_and_succeeds(demo: Demo) -> None:
    # 2 pods x 2 processes: each pod one pipeline stage, each stage 2-way tensor parallel within its pod.
    name = demo.apply(
        ["--steps", "30", "--checkpoint-every", "15", "--log-every", "5", "--report-every-seconds", "2"],
        parallelism={"tensor": 2, "pipeline": 2},
    )
    demo.wait_phase(name, "Succeeded", "Failed")
    assert demo.phases[-1] == "Succeeded", demo.phases
    status = demo.job(name)["status"]
    assert status["progress"]["step"] == 30
    assert status["progress"]["loss"] > 0
    first_stage, last_stage = demo.log(f"{name}-node-0"), demo.log(f"{name}-node-1")
    assert "layout pipeline 2 x data 1 x tensor 2" in first_stage
    assert '"step": 30' in last_stage  # the loss is known, and reported, where the last stage runs
    assert '"step"' not in first_stage
    reporting = [
        pod.metadata.name
        for pod in demo.pods(name)
        if (pod.metadata.labels or {}).get("largo.dev/reporting") == "true"
    ]
    assert reporting == [f"{name}-node-1"]  # what Prometheus scrapes is where the loss is
    assert demo.checkpoints() == ["step-000000015.pt", "step-000000030.pt"]


def test_prometheus_finds_the_trainer_and_reads_its_throughput_and_network(demo: Demo) -> None:
    """A real Prometheus discovers rank 0 through the API server (pod role, the annotations largo sets)
    and the operator through its EndpointSlice, reads the running trainer's throughput, the share of
    a step in the all-reduce and its bytes, and every panel of the dashboard shows something."""
    assert demo.operator is not None
    publish_operator(demo.core.api_client, demo.namespace, demo.operator.metrics_url)
    prometheus = PrometheusServer(demo.cluster.tools, demo.cluster.kubeconfig, [demo.namespace])
    prometheus.start()
    try:
        # Long enough to be running while it is scraped; the namespace's deletion ends it.
        name = demo.apply(["--steps", "100000", "--checkpoint-every", "50", "--log-every", "10"])
        where = f'job="largo-trainers", namespace="{demo.namespace}", trainjob="{name}"'

        def reading(metric: str) -> float:
            return prometheus.value(f"max(largo_train_{metric}{{{where}}})") or 0.0

        wait_for(
            lambda: reading("tokens_per_second") > 0 and reading("allreduce_bytes_per_step") > 0,
            180,
            "the trainer's series in Prometheus",
            prometheus.assert_alive,
        )
        assert 0 < reading("collective_share") <= 1
        assert reading("step") > 0

        def checkpointed(job: dict[str, Any]) -> bool:
            return "checkpointedAt" in job.get("status", {}).get("progress", {})

        # The same run's checkpoints reach the job's status, and the operator's checkpoint age.
        demo.wait(name, checkpointed, "a checkpoint in the job's progress")
        age = f'largo_trainjob_checkpoint_age_seconds{{trainjob="{name}"}}'
        wait_for(lambda: prometheus.value(age) is not None, 60, "the checkpoint age from the operator")
        # The serving row is shown by tests/e2e/test_localnode_serving.py.
        rows = {"GPUs", "Jobs", "Training", "Operator"}
        for query in dashboard_queries(json.loads(DASHBOARD.read_text()), rows):
            assert prometheus.query(query), f"dashboard query returns nothing: {query}"
    finally:
        prometheus.stop()


def test_killed_trainer_process_restarts_the_gang_from_its_checkpoint(demo: Demo) -> None:
    name = demo.apply(
        ["--steps", "240", "--checkpoint-every", "20", "--log-every", "20", "--report-every-seconds", "2"]
    )
    demo.wait(name, lambda job: job.get("status", {}).get("progress", {}).get("step", 0) >= 60, "step 60")
    assert demo.checkpoints(), "a checkpoint before the kill"
    # Kill one training worker of rank 1's pod, as the OOM killer would.
    pod = next(p for p in demo.pods(name) if p.metadata.name == f"{name}-node-1")
    sandbox = next(s for s in sandboxes(demo.cluster) if s.endswith(pod.metadata.uid[:8]))
    in_pod = set(network.sandbox_pids(sandbox)) & training_pids()
    workers = [pid for pid in in_pod if _parent(pid) in in_pod]
    assert workers, f"no trainer worker found in {sandbox}"
    os.kill(workers[0], signal.SIGKILL)

    demo.wait_phase(name, "Succeeded", "Failed")
    status = demo.job(name)["status"]
    assert status["phase"] == "Succeeded", demo.describe(name)
    assert status["restarts"] == 1
    # Whichever pod noticed first (the killed worker's, or its peer's whose collective broke) fails.
    restart_events = [message for reason, message in demo.events(name) if reason == "PodFailed"]
    assert restart_events, demo.events(name)
    assert "restarting the whole gang (restart 1)" in restart_events[0], restart_events
    rank0 = demo.log(f"{name}-node-0")
    assert "resumed from checkpoint of step" in rank0
    assert '"step": 240' in rank0


def test_deleting_a_running_job_leaves_no_process_namespace_or_mount(demo: Demo) -> None:
    name = demo.apply(["--steps", "5000", "--checkpoint-every", "50", "--report-every-seconds", "2"])
    demo.wait(name, lambda job: job.get("status", {}).get("progress", {}).get("step", 0) >= 10, "training")
    ours = {
        s for s in sandboxes(demo.cluster) if any(s.endswith(p.metadata.uid[:8]) for p in demo.pods(name))
    }
    assert len(ours) == 2
    pids = set().union(*(network.sandbox_pids(s) for s in ours))
    assert pids & training_pids()

    demo.custom.delete_namespaced_custom_object(GROUP, VERSION, demo.namespace, PLURAL, name)
    wait_for(lambda: not demo.pods(name), 120, "the job's pods to be gone", demo.cluster.assert_running)
    wait_for(lambda: not (ours & sandboxes(demo.cluster)), 60, "the pods' network namespaces to be gone")
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not [s for s in ours if Path("/etc/netns", s).exists()]
    assert not Path("/checkpoints").exists()
    host_mounts = Path("/proc/self/mountinfo").read_text()
    assert "/checkpoints" not in host_mounts
    assert str(demo.cluster.localnode_dir / "claims") not in host_mounts
    veths = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert not [s for s in ours if network.host_veth(s) in veths]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
