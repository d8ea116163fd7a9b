"""Random clusters, usage and queues, seeded: the inputs of the scheduler's invariant tests and of
bench/gang_schedule.py (pure, no I/O)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from largo.sched.types import GangRequest, NodeInfo, Taint, Toleration

GPU = "nvidia.com/gpu"
GI = 2**30


def cluster(rng: random.Random, count: int = 200) -> list[NodeInfo]:
    nodes = []
    for i in range(count):
        gpu = rng.choice([0, 4, 8, 8, 8])
        taints = (Taint("nvidia.com/gpu", "present", "NoSchedule"),) if gpu and rng.random() < 0.5 else ()
        nodes.append(
            NodeInfo(
                name=f"node-{i:03d}",
                allocatable={
                    "cpu": rng.choice([32_000, 64_000, 96_000]),
                    "memory": 512 * GI,
                    GPU: gpu,
                },
                labels={"rack": f"r{i % 10}", "pool": "gpu" if gpu else "cpu"},
                taints=taints,
                ready=rng.random() > 0.05,
                unschedulable=rng.random() < 0.05,
            )
        )
    return nodes


def usage_for(rng: random.Random, nodes: Sequence[NodeInfo]) -> dict[str, dict[str, int]]:
    usage: dict[str, dict[str, int]] = {}
    for n in nodes:
        if rng.random() < 0.4:
            usage[n.name] = {
                GPU: rng.randint(0, n.allocatable[GPU]),
                "cpu": rng.randint(0, n.allocatable["cpu"]),
                "memory": rng.randint(0, 256) * GI,
            }
    return usage


def queue_for(rng: random.Random, count: int = 50) -> list[GangRequest]:
    queue = []
    for i in range(count):
        gpu = rng.choice([0, 1, 2, 4, 8])
        topo = rng.choice([None, "required", "preferred"])
        queue.append(
            GangRequest(
                key=f"ns/job-{i:02d}",
                priority=rng.choice([0, 0, 10, 100]),
                arrival=float(rng.randint(0, 1000)),
                pod_count=rng.choice([1, 2, 4, 8, 16, 32]),
                per_pod={
                    "cpu": rng.choice([500, 4000, 16_000]),
                    "memory": rng.choice([1, 32, 128]) * GI,
                    GPU: gpu,
                },
                node_selector={"pool": "gpu"} if gpu and rng.random() < 0.5 else {},
                tolerations=(Toleration("nvidia.com/gpu", "Exists"),) if rng.random() < 0.7 else (),
                required_topology_key="rack" if topo == "required" else None,
                preferred_topology_key="rack" if topo == "preferred" else None,
            )
        )
    return queue
