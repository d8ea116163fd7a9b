"""`largo top`'s plain output on a known cluster state."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kubernetes import client
from largo.controllers.state import JobEntry, PodUsage, job_entry
from largo.metrics import Snapshot, node_gpus
from largo.policy.conditions import parse_timestamp
from largo.sched.types import NodeInfo
from largo.top import BAR_WIDTH, _bar, render, snapshot_from_cluster

GPU = "nvidia.com/gpu"


def _job(name: str, gpus: int, pods: int, **status: Any) -> JobEntry:
    return job_entry(
        {
            "metadata": {"name": name, "namespace": "team-a", "uid": name, "resourceVersion": "1"},
            "spec": {"image": "i", "numNodes": pods, "resourcesPerNode": {GPU: gpus}},
            "status": status,
        }
    )


def test_plain_output_shows_nodes_queues_the_queue_and_running_jobs() -> None:
    snapshot = Snapshot(
        nodes=[NodeInfo("gpu-a", {GPU: 8}), NodeInfo("gpu-b", {GPU: 8})],
        pods=[
            ("gpu-a", PodUsage("p", {GPU: 4}, ("team-a", "llm"), 0, 0, owner="llm")),
            ("gpu-b", PodUsage("x", {GPU: 2})),
        ],
        jobs=[
            _job(
                "llm",
                4,
                1,
                phase="Running",
                attempt=0,
                nodes="1/1",
                placement={"attempt": 0, "nodes": ["gpu-a"]},
                progress={"summary": "42% 420/1000 loss 2.310"},
            ),
            _job(
                "big",
                8,
                2,
                phase="Queued",
                queue={"position": 1, "reason": "InsufficientCapacity", "message": "needs 2 pods x 8"},
            ),
        ],
    )
    screen = render(snapshot).splitlines()
    assert screen[0] == (
        "GPUs: 6/16 held (38%), stranded for the head of the queue: 10, "
        "pods that fit now: 10 of 1 GPU, 5 of 2 GPUs, 2 of 4 GPUs, 0 of 8 GPUs"
    )
    assert "gpu-a                    [####....]" in screen[3]
    assert screen[3].split()[-3:] == ["4", "0", "4"]
    assert "[++......]" in screen[4]
    assert screen[4].split()[-3:] == ["0", "2", "6"]
    queue_row = next(line for line in screen if line.startswith("team-a "))
    assert queue_row.split() == ["team-a", "default", "20", "4", "16", "1"]
    queued = next(line for line in screen if line.startswith("team-a/big"))
    assert queued.split()[1] == "1"
    assert "InsufficientCapacity: needs 2 pods x 8" in queued
    running = next(line for line in screen if line.startswith("team-a/llm"))
    assert running.split()[1:3] == ["Running", "1/1"]
    assert running.endswith("42% 420/1000 loss 2.310")
    assert screen[-1] == "TrainJobs: Queued 1, Running 1"


def _node(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {}},
        "spec": {},
        "status": {
            "allocatable": {"cpu": "32", GPU: "8", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


class _Core:
    api_client = client.ApiClient()

    def list_node(self) -> Any:
        return SimpleNamespace(items=[_node("a"), _node("b")])

    def list_pod_for_all_namespaces(self) -> Any:
        return SimpleNamespace(items=[])


class _Custom:
    def __init__(self, items: dict[str, list[dict[str, Any]]]) -> None:
        self.items = items

    def list_cluster_custom_object(self, group: str, version: str, plural: str) -> dict[str, Any]:
        return {"items": self.items.get(plural, [])}


def test_a_serving_group_s_admitted_gpus_are_held_as_in_the_metrics() -> None:
    """A group placed on a, its pod not bound yet: its GPUs are largo's, not free, and it queues with the
    jobs (the same numbers as the metrics, which read InferenceServices too)."""
    service = {
        "apiVersion": "largo.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": "team-b", "uid": "u", "resourceVersion": "3"},
        "spec": {"model": {"claimName": "w"}, "nodesPerReplica": 1, "resourcesPerNode": {GPU: 8}},
        "status": {
            "phase": "Progressing",
            "groups": [
                {"replica": 0, "revision": "r", "attempt": 0, "nodes": ["a"]},
                {"replica": 1, "revision": "r", "attempt": 0, "nodes": [], "queue": {"position": 1}},
            ],
        },
    }
    snapshot = snapshot_from_cluster(_Core(), _Custom({"inferenceservices": [service]}))
    assert node_gpus(snapshot)["a"] == {"allocatable": 8, "largo": 8, "other": 0, "free": 0}
    screen = render(snapshot).splitlines()
    assert screen[0].startswith("GPUs: 8/16 held (50%), stranded for the head of the queue: 0,")
    queue_row = next(line for line in screen if line.startswith("team-b "))
    assert queue_row.split() == ["team-b", "default", "16", "8", "8", "1"]
    queued = next(line for line in screen if line.startswith("team-b/chat#r1"))
    assert queued.split()[1] == "1"


def test_a_node_holding_more_than_it_offers_keeps_its_bar_width() -> None:
    """A GPU marked unhealthy under a running pod: held passes allocatable; the row stays aligned."""
    over = _bar({"allocatable": 4, "largo": 8, "other": 0})
    assert over == "[####]"
    assert len(_bar({"allocatable": 64, "largo": 80, "other": 3})) == BAR_WIDTH + 2


def test_a_job_in_its_restart_back_off_shows_back_off_not_new() -> None:
    """A released gang in its back-off has no status.queue (the scheduler leaves it be): it showed New,
    a job never looked at, where largo_queue_length says BackOff."""
    after = "2027-01-15T09:00:00Z"
    released = _job("failed", 8, 1, phase="Queued", reason="PodFailed", attempt=1, nextAdmissionTime=after)
    now = parse_timestamp("2027-01-15T08:30:00Z")
    snapshot = Snapshot(nodes=[NodeInfo("a", {GPU: 8})], pods=[], jobs=[released], now=now)
    (line,) = [line for line in render(snapshot).splitlines() if line.startswith("team-a/failed")]
    assert line.split()[-1] == "BackOff", line
