"""Invariants of admission on a large random cluster (its speed is measured in bench/gang_schedule.py)."""

import random

import pytest
from largo.sched.gang import place, schedule
from largo.sched.inventory import free_by_node
from largo.sched.synthetic import cluster, queue_for, usage_for
from largo.sched.types import (
    BLOCKING_EFFECTS,
    GangRequest,
    NodeInfo,
    WaitReason,
)

GPU = "nvidia.com/gpu"


def eligible(node: NodeInfo, request: GangRequest) -> bool:
    return (
        node.usable
        and all(node.labels.get(k) == v for k, v in request.node_selector.items())
        and all(
            any(t.tolerates(taint) for t in request.tolerations)
            for taint in node.taints
            if taint.effect in BLOCKING_EFFECTS
        )
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_large_cluster_invariants(seed: int) -> None:
    rng = random.Random(seed)
    nodes = cluster(rng)
    usage = usage_for(rng, nodes)
    queue = queue_for(rng)
    by_name = {n.name: n for n in nodes}
    by_key = {r.key: r for r in queue}

    decision = schedule(nodes, usage, queue)

    # Every job is answered exactly once.
    keys = [p.key for p in decision.admitted] + [w.key for w in decision.waiting]
    assert sorted(keys) == sorted(by_key)
    ordered = [w.position for w in decision.waiting if w.reason is not WaitReason.Unschedulable]
    assert ordered == list(range(1, len(ordered) + 1))
    assert all(w.position is None for w in decision.waiting if w.reason is WaitReason.Unschedulable)

    # Capacity is never exceeded on any node, for any resource.
    used = {name: dict(resources) for name, resources in usage.items()}
    for placement in decision.admitted:
        request = by_key[placement.key]
        assert len(placement.nodes) == request.pod_count
        for name in placement.nodes:
            assert eligible(by_name[name], request)
            for resource, amount in request.per_pod.items():
                used.setdefault(name, {})[resource] = used.get(name, {}).get(resource, 0) + amount
        if request.required_topology_key:
            assert len({by_name[n].labels["rack"] for n in placement.nodes}) == 1
        # Pods on one node hold consecutive ranks.
        seen: list[str] = []
        for name in placement.nodes:
            if not seen or seen[-1] != name:
                assert name not in seen
                seen.append(name)
    # Background usage is drawn within allocatable, so the total must stay within it everywhere.
    for node in nodes:
        for resource, amount in used.get(node.name, {}).items():
            assert amount <= node.allocatable.get(resource, 0), (node.name, resource)

    # Order: admitted jobs are a prefix of the non-unschedulable order, up to the first blocker.
    order = sorted(queue, key=lambda r: (-r.priority, r.arrival, r.key))
    reasons = {w.key: w.reason for w in decision.waiting}
    admitted_keys = {p.key for p in decision.admitted}
    blocked = False
    empty = free_by_node(nodes, {})
    for request in order:
        if reasons.get(request.key) is WaitReason.Unschedulable:
            assert place(nodes, empty, request) is None
            continue
        assert place(nodes, empty, request) is not None
        if blocked:
            assert request.key not in admitted_keys
            assert reasons[request.key] in (
                WaitReason.InsufficientCapacity,
                WaitReason.QueuedBehindHead,
            )
        elif request.key not in admitted_keys:
            assert reasons[request.key] is WaitReason.InsufficientCapacity
            blocked = True
    assert decision.admitted, "the random cluster should admit something"


def test_strict_capacity_when_usage_is_within_allocatable() -> None:
    rng = random.Random(7)
    nodes = cluster(rng)
    queue = queue_for(rng)
    decision = schedule(nodes, {}, queue)
    by_key = {r.key: r for r in queue}
    used: dict[str, dict[str, int]] = {}
    for placement in decision.admitted:
        for name in placement.nodes:
            for resource, amount in by_key[placement.key].per_pod.items():
                used.setdefault(name, {})[resource] = used.get(name, {}).get(resource, 0) + amount
    assert used
    for node in nodes:
        for resource, amount in used.get(node.name, {}).items():
            assert amount <= node.allocatable.get(resource, 0), (node.name, resource)


def test_deterministic() -> None:
    rng = random.Random(11)
    nodes = cluster(rng)
    usage = usage_for(rng, nodes)
    queue = queue_for(rng)
    first = schedule(nodes, usage, queue)
    second = schedule(list(nodes), usage, list(reversed(queue)))
    assert first == second
    assert first == schedule(nodes, usage, queue)
