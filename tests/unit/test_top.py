"""`largo top`'s plain output on a known cluster state."""

from __future__ import annotations

from typing import Any

from largo.controllers.state import JobEntry, PodUsage, job_entry
from largo.metrics import Snapshot
from largo.sched.types import NodeInfo
from largo.top import render

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
            ("gpu-a", PodUsage("p", {GPU: 4}, ("team-a", "llm"), 0, 0)),
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
