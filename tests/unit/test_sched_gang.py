"""Gang placement and strict-order admission."""

from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest
from largo.sched.gang import place, schedule
from largo.sched.inventory import POD_SLOTS, add_usage, free_by_node
from largo.sched.types import (
    Decision,
    GangRequest,
    NodeInfo,
    Placement,
    Taint,
    Toleration,
    Waiting,
    WaitReason,
    checkpoint_key,
)

GPU = "nvidia.com/gpu"
GI = 2**30


def node(
    name: str,
    gpu: int = 8,
    cpu: int = 64_000,
    labels: Mapping[str, str] | None = None,
    taints: tuple[Taint, ...] = (),
    ready: bool = True,
    unschedulable: bool = False,
) -> NodeInfo:
    return NodeInfo(
        name,
        {"cpu": cpu, "memory": 512 * GI, GPU: gpu},
        dict(labels or {}),
        taints,
        ready,
        unschedulable,
    )


def gang(
    key: str,
    pods: int = 1,
    gpu: int = 8,
    cpu: int = 1000,
    priority: int = 0,
    arrival: float = 0.0,
    **extra: object,
) -> GangRequest:
    return GangRequest(key, priority, arrival, pods, {"cpu": cpu, GPU: gpu}, **extra)  # type: ignore[arg-type]


def by_key(decision: Decision) -> dict[str, Waiting]:
    return {w.key: w for w in decision.waiting}


def admitted(decision: Decision) -> dict[str, tuple[str, ...]]:
    return {p.key: p.nodes for p in decision.admitted}


def free_of(nodes: Sequence[NodeInfo]) -> dict[str, dict[str, int]]:
    return free_by_node(nodes, {})


# --- place -----------------------------------------------------------------------------------------


def test_place_single_pod() -> None:
    nodes = [node("a"), node("b")]
    assert place(nodes, free_of(nodes), gang("ns/j")) == Placement("ns/j", ("a",))


def test_place_shares_node_and_groups_ranks() -> None:
    nodes = [node("a"), node("b")]
    result = place(nodes, free_of(nodes), gang("ns/j", pods=4, gpu=4))
    assert result is not None
    assert result.nodes == ("a", "a", "b", "b")


def test_place_none_when_gang_does_not_fit() -> None:
    nodes = [node("a"), node("b")]
    assert place(nodes, free_of(nodes), gang("ns/j", pods=3, gpu=6)) is None


@pytest.mark.parametrize(
    ("per_pod", "fits"),
    [
        ({"example.com/fpga": 1}, False),  # absent resource: zero free
        ({"example.com/fpga": 0}, True),  # zero request always fits
        ({GPU: 0, "cpu": 0}, True),
        ({"cpu": 64_000}, True),
        ({"cpu": 64_001}, False),
        ({"memory": 512 * GI}, True),
        ({"memory": 512 * GI + 1}, False),
    ],
)
def test_place_resource_comparison(per_pod: dict[str, int], fits: bool) -> None:
    nodes = [node("a")]
    request = GangRequest("ns/j", 0, 0.0, 1, per_pod)
    assert (place(nodes, free_of(nodes), request) is not None) is fits


def test_place_zero_request_fits_on_overcommitted_node() -> None:
    nodes = [node("a")]
    free = free_by_node(nodes, {"a": {"cpu": 100_000, GPU: 9}})
    assert place(nodes, free, GangRequest("ns/j", 0, 0.0, 2, {GPU: 0})) == Placement("ns/j", ("a", "a"))
    assert place(nodes, free, GangRequest("ns/j", 0, 0.0, 1, {GPU: 1})) is None


def test_place_node_missing_from_free_has_nothing() -> None:
    nodes = [node("a"), node("b")]
    free = {"b": {GPU: 8, "cpu": 64_000}}
    assert place(nodes, free, gang("ns/j")) == Placement("ns/j", ("b",))


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (node("a", ready=False), "not ready"),
        (node("a", unschedulable=True), "cordoned"),
        (node("a", labels={"pool": "cpu"}), "selector mismatch"),
        (node("a", labels={}), "selector label missing"),
        (
            node(
                "a",
                labels={"pool": "gpu"},
                taints=(Taint("dedicated", "infra", "NoSchedule"),),
            ),
            "NoSchedule",
        ),
        (
            node(
                "a",
                labels={"pool": "gpu"},
                taints=(Taint("dedicated", "infra", "NoExecute"),),
            ),
            "NoExecute",
        ),
    ],
)
def test_place_excludes_ineligible_nodes(bad: NodeInfo, why: str) -> None:
    good = node("z", gpu=8, labels={"pool": "gpu"})
    nodes = [bad, good]
    request = gang("ns/j", pods=1, gpu=4, node_selector={"pool": "gpu"})
    result = place(nodes, free_of(nodes), request)
    assert result == Placement("ns/j", ("z",)), why
    # With only the bad node there is no placement at all.
    assert place([bad], free_of([bad]), request) is None, why


def test_place_prefer_no_schedule_taint_is_ignored() -> None:
    nodes = [node("a", taints=(Taint("spot", "true", "PreferNoSchedule"),))]
    assert place(nodes, free_of(nodes), gang("ns/j")) == Placement("ns/j", ("a",))


@pytest.mark.parametrize(
    ("tolerations", "fits"),
    [
        ((), False),
        (
            (Toleration("nvidia.com/gpu", "Exists"),),
            False,
        ),  # second taint still untolerated
        (
            (Toleration("nvidia.com/gpu", "Exists"), Toleration("team", "Equal", "ml")),
            True,
        ),
        ((Toleration(None, "Exists"),), True),
        (
            (
                Toleration("nvidia.com/gpu", "Exists"),
                Toleration("team", "Equal", "web"),
            ),
            False,
        ),
    ],
)
def test_place_requires_all_blocking_taints_tolerated(
    tolerations: tuple[Toleration, ...], fits: bool
) -> None:
    taints = (
        Taint("nvidia.com/gpu", "present", "NoSchedule"),
        Taint("team", "ml", "NoExecute"),
    )
    nodes = [node("a", taints=taints)]
    request = gang("ns/j", tolerations=tolerations)
    assert (place(nodes, free_of(nodes), request) is not None) is fits


def test_place_packs_onto_fullest_node() -> None:
    nodes = [node("a"), node("b"), node("c")]
    free = free_by_node(nodes, {"b": {GPU: 6}, "c": {GPU: 2}})
    # b has 2 free, c has 6 free, a has 8 free: a 2-GPU pod goes to b, keeping a whole.
    assert place(nodes, free, gang("ns/j", gpu=2)) == Placement("ns/j", ("b",))
    # Three 2-GPU pods: b (2 free) takes one, then c (6 free) takes two.
    assert place(nodes, free, gang("ns/j", pods=3, gpu=2)) == Placement("ns/j", ("b", "c", "c"))


def test_place_tie_break_by_cpu_then_name() -> None:
    nodes = [node("a", cpu=32_000), node("b", cpu=16_000), node("c", cpu=16_000)]
    assert place(nodes, free_of(nodes), gang("ns/j", gpu=8)) == Placement("ns/j", ("b",))


def test_place_cpu_only_job_avoids_gpu_nodes() -> None:
    nodes = [node("gpu-1", gpu=8), node("cpu-1", gpu=0)]
    assert place(nodes, free_of(nodes), gang("ns/j", gpu=0, cpu=4000)) == Placement("ns/j", ("cpu-1",))


def test_place_cpu_only_job_avoids_gpu_nodes_whose_gpus_are_all_busy() -> None:
    """No GPU free there ties with a CPU node: the cpu it took is what the GPUs need once free."""
    nodes = [node("gpu-1", gpu=8, cpu=64_000), node("cpu-1", gpu=0, cpu=96_000)]
    free = free_of(nodes)
    free["gpu-1"] = {**free["gpu-1"], GPU: 0, "cpu": 32_000}  # its GPUs all busy
    assert place(nodes, free, gang("ns/j", gpu=0, cpu=4000)) == Placement("ns/j", ("cpu-1",))


# --- topology --------------------------------------------------------------------------------------


def racks() -> list[NodeInfo]:
    return [
        node("r1-a", labels={"rack": "r1"}),
        node("r1-b", labels={"rack": "r1"}),
        node("r2-a", labels={"rack": "r2"}),
        node("r2-b", labels={"rack": "r2"}),
        node("r2-c", labels={"rack": "r2"}),
        node("loose", labels={}),
    ]


def test_required_topology_keeps_gang_in_one_rack() -> None:
    nodes = racks()
    result = place(nodes, free_of(nodes), gang("ns/j", pods=2, gpu=8, required_topology_key="rack"))
    # r1 is the best fit: it is left with 0 free GPUs, r2 would keep 8.
    assert result == Placement("ns/j", ("r1-a", "r1-b"))


def test_required_topology_chooses_domain_that_fits() -> None:
    nodes = racks()
    result = place(nodes, free_of(nodes), gang("ns/j", pods=3, gpu=8, required_topology_key="rack"))
    assert result == Placement("ns/j", ("r2-a", "r2-b", "r2-c"))


def test_required_topology_fails_although_cluster_fits() -> None:
    nodes = racks()
    free = free_by_node(nodes, {"r2-a": {GPU: 8}})
    request = gang("ns/j", pods=3, gpu=8, required_topology_key="rack")
    assert place(nodes, free, request) is None
    # Without the constraint the same gang fits across racks.
    assert place(nodes, free, gang("ns/j", pods=3, gpu=8)) is not None


def test_required_topology_skips_nodes_without_label() -> None:
    nodes = [node("loose"), node("r1-a", gpu=4, labels={"rack": "r1"})]
    assert place(nodes, free_of(nodes), gang("ns/j", gpu=8, required_topology_key="rack")) is None
    assert place(nodes, free_of(nodes), gang("ns/j", gpu=4, required_topology_key="rack")) == Placement(
        "ns/j", ("r1-a",)
    )


def test_required_topology_domain_tie_broken_by_name() -> None:
    nodes = [node("x", labels={"rack": "r9"}), node("y", labels={"rack": "r3"})]
    assert place(nodes, free_of(nodes), gang("ns/j", required_topology_key="rack")) == Placement(
        "ns/j", ("y",)
    )


def test_preferred_topology_uses_one_rack_when_possible() -> None:
    nodes = racks()
    result = place(
        nodes,
        free_of(nodes),
        gang("ns/j", pods=2, gpu=8, preferred_topology_key="rack"),
    )
    assert result == Placement("ns/j", ("r1-a", "r1-b"))


def test_preferred_topology_falls_back_across_racks() -> None:
    nodes = racks()
    free = free_by_node(nodes, {"r2-a": {GPU: 8}})
    result = place(nodes, free, gang("ns/j", pods=4, gpu=8, preferred_topology_key="rack"))
    # No rack has four free nodes, so equal nodes are filled in name order across racks.
    assert result == Placement("ns/j", ("loose", "r1-a", "r1-b", "r2-b"))


# --- schedule --------------------------------------------------------------------------------------


def test_two_twelve_gpu_jobs_on_two_nodes() -> None:
    nodes = [node("node-a"), node("node-b")]
    decision = schedule(
        nodes,
        {},
        [gang("ns/first", 2, 6, arrival=1.0), gang("ns/second", 2, 6, arrival=2.0)],
    )
    assert admitted(decision) == {"ns/first": ("node-a", "node-b")}
    waiting = by_key(decision)["ns/second"]
    assert waiting.position == 1
    assert waiting.reason is WaitReason.InsufficientCapacity
    assert "6 nvidia.com/gpu" in waiting.message
    assert "largest free nvidia.com/gpu: 2" in waiting.message
    assert "room for 0 of 2 pods" in waiting.message


def test_higher_priority_later_arrival_goes_first() -> None:
    nodes = [node("a")]
    decision = schedule(
        nodes,
        {},
        [gang("ns/old", arrival=1.0), gang("ns/urgent", priority=10, arrival=99.0)],
    )
    assert admitted(decision) == {"ns/urgent": ("a",)}
    assert by_key(decision)["ns/old"].reason is WaitReason.InsufficientCapacity


def test_arrival_then_key_order() -> None:
    nodes = [node("a")]
    queue = [
        gang("ns/b", arrival=5.0),
        gang("ns/c", arrival=4.0),
        gang("ns/a", arrival=5.0),
    ]
    decision = schedule(nodes, {}, queue)
    assert admitted(decision) == {"ns/c": ("a",)}
    assert [(w.key, w.position) for w in decision.waiting] == [("ns/a", 1), ("ns/b", 2)]


def test_unschedulable_does_not_block_smaller_job() -> None:
    nodes = [node("a"), node("b")]
    queue = [
        gang("ns/huge", pods=3, gpu=8, priority=5),
        gang("ns/small", pods=1, gpu=8),
    ]
    decision = schedule(nodes, {}, queue)
    assert admitted(decision) == {"ns/small": ("a",)}
    huge = by_key(decision)["ns/huge"]
    assert huge.reason is WaitReason.Unschedulable
    assert huge.position is None  # it blocks nobody: no place in the order
    assert "never" in huge.message
    assert "room for 2 of 3 pods" in huge.message


def test_unschedulable_when_pod_exceeds_every_node() -> None:
    nodes = [node("a", gpu=4), node("b", gpu=8)]
    decision = schedule(nodes, {"b": {GPU: 8}}, [gang("ns/big", gpu=16)])
    waiting = by_key(decision)["ns/big"]
    assert waiting.reason is WaitReason.Unschedulable
    assert "largest allocatable nvidia.com/gpu: 8 on b" in waiting.message


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([node("a", ready=False)], "1 not ready or cordoned"),
        ([node("a", unschedulable=True)], "1 not ready or cordoned"),
        (
            [node("a", taints=(Taint("dedicated", "infra", "NoSchedule"),))],
            "dedicated=infra:NoSchedule",
        ),
        ([node("a")], "without label rack"),
        ([], "of 0 nodes"),
    ],
)
def test_unschedulable_explains_filtering(nodes: list[NodeInfo], expected: str) -> None:
    decision = schedule(nodes, {}, [gang("ns/j", required_topology_key="rack")])
    waiting = by_key(decision)["ns/j"]
    assert waiting.reason is WaitReason.Unschedulable
    assert expected in waiting.message


def test_unschedulable_explains_selector() -> None:
    decision = schedule(
        [node("a", labels={"pool": "cpu"})],
        {},
        [gang("ns/j", node_selector={"pool": "gpu"})],
    )
    assert "1 not matching nodeSelector pool=gpu" in decision.waiting[0].message


def test_cordoned_node_capacity_is_not_offered() -> None:
    nodes = [node("a"), node("b", unschedulable=True), node("c", ready=False)]
    decision = schedule(nodes, {}, [gang("ns/j", pods=2, gpu=8)])
    assert decision.admitted == ()
    assert decision.waiting[0].reason is WaitReason.Unschedulable


def test_strict_blocking_small_job_waits_behind_big_job() -> None:
    nodes = [node("a"), node("b")]
    usage = {"a": {GPU: 4}}
    queue = [gang("ns/big", pods=2, gpu=8, priority=1), gang("ns/small", pods=1, gpu=2)]
    decision = schedule(nodes, usage, queue)
    assert decision.admitted == ()
    big, small = decision.waiting
    assert (big.key, big.position, big.reason) == (
        "ns/big",
        1,
        WaitReason.InsufficientCapacity,
    )
    assert (small.key, small.position, small.reason) == (
        "ns/small",
        2,
        WaitReason.QueuedBehindHead,
    )
    assert "ns/big" in small.message


def test_blocked_job_that_does_not_fit_either_is_insufficient() -> None:
    nodes = [node("a"), node("b")]
    usage = {"a": {GPU: 4}, "b": {GPU: 4}}
    queue = [
        gang("ns/big", pods=2, gpu=8, arrival=1),
        gang("ns/mid", pods=1, gpu=6, arrival=2),
    ]
    decision = schedule(nodes, usage, queue)
    mid = by_key(decision)["ns/mid"]
    assert mid.reason is WaitReason.InsufficientCapacity
    assert "queued behind ns/big" in mid.message


def test_jobs_ahead_of_blocker_are_admitted_and_later_unschedulable_still_reported() -> None:
    nodes = [node("a"), node("b")]
    queue = [
        gang("ns/one", gpu=8, arrival=1),
        gang("ns/blocked", pods=2, gpu=8, arrival=2),
        gang("ns/never", pods=1, gpu=9, arrival=3),
        gang("ns/tiny", pods=1, gpu=1, arrival=4),
    ]
    decision = schedule(nodes, {}, queue)
    assert admitted(decision) == {"ns/one": ("a",)}
    assert [(w.key, w.reason) for w in decision.waiting] == [
        ("ns/blocked", WaitReason.InsufficientCapacity),
        ("ns/never", WaitReason.Unschedulable),
        ("ns/tiny", WaitReason.QueuedBehindHead),
    ]
    assert [w.position for w in decision.waiting] == [1, None, 2]


def test_fragmentation_keeps_whole_node_for_later_big_pod() -> None:
    nodes = [node("a"), node("b")]
    usage = {"b": {GPU: 4}}
    queue = [gang("ns/small", gpu=4, arrival=1), gang("ns/whole", gpu=8, arrival=2)]
    decision = schedule(nodes, usage, queue)
    assert admitted(decision) == {"ns/small": ("b",), "ns/whole": ("a",)}
    assert decision.waiting == ()


def test_reservations_within_one_call() -> None:
    nodes = [node("a"), node("b")]
    queue = [gang(f"ns/j{i}", pods=1, gpu=6, arrival=float(i)) for i in range(3)]
    decision = schedule(nodes, {}, queue)
    assert admitted(decision) == {"ns/j0": ("a",), "ns/j1": ("b",)}
    assert by_key(decision)["ns/j2"].reason is WaitReason.InsufficientCapacity


def test_reservations_account_for_cpu_too() -> None:
    nodes = [node("a", cpu=4000)]
    queue = [
        gang("ns/x", gpu=1, cpu=3000, arrival=1),
        gang("ns/y", gpu=1, cpu=2000, arrival=2),
    ]
    decision = schedule(nodes, {}, queue)
    assert admitted(decision) == {"ns/x": ("a",)}
    waiting = by_key(decision)["ns/y"]
    assert waiting.reason is WaitReason.InsufficientCapacity
    assert "2 cpu" in waiting.message


def test_reserve_then_schedule_does_not_double_book() -> None:
    nodes = [node("a")]
    first = schedule(nodes, {}, [gang("ns/x", gpu=8)])
    (placement,) = first.admitted
    usage: dict[str, dict[str, int]] = {}
    for name in placement.nodes:  # as the scheduler loop reserves an admitted gang's unbound ranks
        add_usage(usage, name, {"cpu": 1000, GPU: 8})
    second = schedule(nodes, usage, [gang("ns/y", gpu=1)])
    assert second.admitted == ()
    assert second.waiting[0].reason is WaitReason.InsufficientCapacity


def test_topology_gang_blocks_when_no_rack_has_room() -> None:
    nodes = racks()
    usage = {"r1-a": {GPU: 8}, "r2-a": {GPU: 8}}
    queue = [
        gang("ns/ring", pods=3, gpu=8, required_topology_key="rack", arrival=1),
        gang("ns/one", arrival=2),
    ]
    decision = schedule(nodes, usage, queue)
    assert decision.admitted == ()
    ring, one = decision.waiting
    assert ring.reason is WaitReason.InsufficientCapacity
    assert "in one rack" in ring.message
    assert "best rack=r2 has room for 2 of 3 pods" in ring.message
    assert one.reason is WaitReason.QueuedBehindHead


def test_empty_queue() -> None:
    assert schedule([node("a")], {}, []) == Decision((), ())


def test_schedule_does_not_mutate_inputs() -> None:
    nodes = [node("a")]
    usage = {"a": {GPU: 1}}
    queue = [gang("ns/x", gpu=4)]
    schedule(nodes, usage, queue)
    assert usage == {"a": {GPU: 1}}
    assert nodes[0].allocatable[GPU] == 8


# --- exclusive nodes ---------------------------------------------------------------------------------


def test_an_exclusive_gang_gets_one_whole_node_per_pod() -> None:
    nodes = [node("a"), node("b"), node("c")]
    packed = schedule(nodes, {}, [gang("ns/packed", pods=2, gpu=4)])
    assert admitted(packed) == {"ns/packed": ("a", "a")}  # packing shares a node
    alone = schedule(nodes, {}, [gang("ns/alone", pods=2, gpu=4, exclusive=True)])
    assert admitted(alone) == {"ns/alone": ("a", "b")}


def test_an_exclusive_gang_skips_nodes_with_gpus_in_use_and_says_so() -> None:
    nodes = [node("a"), node("b")]
    decision = schedule(nodes, {"a": {GPU: 1}}, [gang("ns/x", pods=2, gpu=4, exclusive=True)])
    assert decision.admitted == ()
    (waiting,) = decision.waiting
    assert waiting.reason is WaitReason.InsufficientCapacity
    assert "each on a node with no GPU in use" in waiting.message
    assert "room for 1 of 2 pods" in waiting.message
    never = schedule([node("a")], {}, [gang("ns/y", pods=2, gpu=1, exclusive=True)])
    assert never.waiting[0].reason is WaitReason.Unschedulable  # one node can never host two


def test_nothing_else_is_placed_beside_an_exclusive_pod_in_the_same_pass() -> None:
    nodes = [node("a"), node("b")]
    queue = [
        gang("ns/alone", pods=1, gpu=4, exclusive=True, arrival=1),
        gang("ns/small", pods=1, gpu=2, arrival=2),
        gang("ns/big", pods=1, gpu=8, arrival=3),
    ]
    decision = schedule(nodes, {}, queue)
    placed = admitted(decision)
    assert placed["ns/alone"] == ("a",)
    assert placed["ns/small"] == ("b",)  # not onto a's four free GPUs
    assert by_key(decision)["ns/big"].reason is WaitReason.InsufficientCapacity


def test_a_gang_without_gpus_is_not_placed_beside_an_exclusive_pod_in_the_same_pass() -> None:
    nodes = [replace(node("a"), allocatable={**node("a").allocatable, POD_SLOTS: 110})]
    queue = [
        GangRequest("ns/alone", 0, 1.0, 1, {"cpu": 1000, GPU: 4, POD_SLOTS: 1}, exclusive=True),
        GangRequest("ns/cpu", 0, 2.0, 1, {"cpu": 1000, POD_SLOTS: 1}),
    ]
    decision = schedule(nodes, {}, queue)
    assert admitted(decision) == {"ns/alone": ("a",)}
    assert by_key(decision)["ns/cpu"].reason is WaitReason.InsufficientCapacity
    # Without the exclusive gang the same node takes it.
    assert admitted(schedule(nodes, {}, queue[1:])) == {"ns/cpu": ("a",)}


# --- one gang per checkpoint directory -----------------------------------------------------------------

SHARED = checkpoint_key("ns", "ckpt", None)


def test_a_gang_whose_checkpoint_directory_is_in_use_waits_and_blocks_nobody() -> None:
    decision = schedule(
        [node("n0"), node("n1")],
        {},
        [gang("ns/sweep-2", checkpoint=SHARED), gang("ns/other", arrival=1.0)],
        {SHARED: "ns/sweep-1"},
    )
    assert admitted(decision) == {"ns/other": ("n0",)}
    waiting = by_key(decision)["ns/sweep-2"]
    assert waiting.reason is WaitReason.CheckpointInUse
    assert waiting.position is None  # it blocks nobody: "other" is the head of the order
    assert waiting.message == (
        "its checkpoint directory (claim ckpt) is in use by ns/sweep-1, which must stop first; give this "
        "job a checkpoint.subPath of its own to run beside it"
    )


def test_of_two_queued_gangs_writing_one_directory_only_the_first_is_admitted() -> None:
    decision = schedule(
        [node("n0"), node("n1")],
        {},
        [gang("ns/b", checkpoint=SHARED, arrival=2.0), gang("ns/a", checkpoint=SHARED, arrival=1.0)],
    )
    assert admitted(decision) == {"ns/a": ("n0",)}
    assert by_key(decision)["ns/b"].reason is WaitReason.CheckpointInUse
    assert "in use by ns/a" in by_key(decision)["ns/b"].message


def test_other_directories_claims_and_namespaces_do_not_wait() -> None:
    own = [
        checkpoint_key("ns", "ckpt", "run-1"),
        checkpoint_key("ns", "other-claim", None),
        checkpoint_key("team-b", "ckpt", None),
    ]
    queue = [gang(f"ns/j{i}", gpu=2, checkpoint=key) for i, key in enumerate(own)]
    decision = schedule([node("n0")], {}, queue, {SHARED: "ns/running"})
    assert sorted(admitted(decision)) == ["ns/j0", "ns/j1", "ns/j2"]


def test_a_checkpoint_directory_is_one_however_its_sub_path_is_written() -> None:
    assert checkpoint_key("ns", "c", "run-1/") == checkpoint_key("ns", "c", "./run-1") == "ns/c/run-1"
    assert checkpoint_key("ns", "c", "a//b/../run-1") == "ns/c/a/run-1"
    assert checkpoint_key("ns", "c", ".") == checkpoint_key("ns", "c", None) == "ns/c/"
    decision = schedule([node("n0")], {}, [gang("ns/b", checkpoint="ns/c/run-1")], {"ns/c/run-1": "ns/a"})
    assert "(claim c, subPath run-1)" in by_key(decision)["ns/b"].message


def test_a_gang_that_can_never_fit_is_told_so_before_it_waits_for_a_checkpoint() -> None:
    decision = schedule([node("n0")], {}, [gang("ns/huge", gpu=16, checkpoint=SHARED)], {SHARED: "ns/a"})
    assert by_key(decision)["ns/huge"].reason is WaitReason.Unschedulable
