"""Conversion of raw Kubernetes dicts into scheduling inputs."""

import datetime
from typing import Any

import pytest
from largo.sched.gang import schedule
from largo.sched.inventory import (
    add_usage,
    free_by_node,
    node_info,
    noticed_not_ready,
    pod_holds_resources,
    pod_requests,
    resident,
    taints_from,
    tolerations_from,
    usage_by_node,
)
from largo.sched.types import GangRequest, NodeInfo, Taint, Toleration, WaitReason

GI = 2**30


def raw_node(name: str = "node-a", **overrides: Any) -> dict[str, Any]:
    node: dict[str, Any] = {
        "metadata": {"name": name, "labels": {"rack": "r1"}},
        "spec": {},
        "status": {
            "allocatable": {
                "cpu": "31500m",
                "memory": "250Gi",
                "nvidia.com/gpu": "8",
                "pods": "110",
            },
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": "True"},
            ],
        },
    }
    for key, value in overrides.items():
        node[key] = value
    return node


def test_node_info_ready_node() -> None:
    info = node_info(raw_node())
    assert info.name == "node-a"
    assert info.allocatable == {
        "cpu": 31500,
        "memory": 250 * GI,
        "nvidia.com/gpu": 8,
        "pods": 110,
    }
    assert info.labels == {"rack": "r1"}
    assert info.taints == ()
    assert info.ready
    assert not info.unschedulable
    assert info.usable


@pytest.mark.parametrize(
    "conditions",
    [
        [{"type": "Ready", "status": "False"}],
        [{"type": "Ready", "status": "Unknown"}],
        [{"type": "MemoryPressure", "status": "True"}],
        [],
        None,
    ],
)
def test_node_info_not_ready(conditions: Any) -> None:
    node = raw_node()
    node["status"]["conditions"] = conditions
    info = node_info(node)
    assert not info.ready
    assert not info.usable


def test_node_info_cordoned_and_tainted() -> None:
    node = raw_node(
        spec={
            "unschedulable": True,
            "taints": [
                {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
                {
                    "key": "node.kubernetes.io/unschedulable",
                    "effect": "NoSchedule",
                    "timeAdded": None,
                },
            ],
        }
    )
    info = node_info(node)
    assert info.unschedulable
    assert not info.usable
    assert info.taints == (
        Taint("nvidia.com/gpu", "present", "NoSchedule"),
        Taint("node.kubernetes.io/unschedulable", "", "NoSchedule"),
    )


def test_node_info_tolerates_missing_sections() -> None:
    info = node_info({"metadata": {"name": "bare"}})
    assert info == NodeInfo("bare", {}, {}, (), False, False)


def test_node_info_rejects_bad_quantity() -> None:
    node = raw_node()
    node["status"]["allocatable"]["nvidia.com/gpu"] = "eight"
    with pytest.raises(ValueError, match="eight"):
        node_info(node)


def test_taints_and_tolerations_from() -> None:
    assert taints_from(None) == ()
    assert tolerations_from(None) == ()
    assert tolerations_from(
        [
            {"operator": "Exists"},
            {"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoSchedule"},
            {"key": "dedicated", "value": "ml"},
            {
                "key": "x",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 30,
            },
        ]
    ) == (
        Toleration(None, "Exists", "", None),
        Toleration("gpu", "Equal", "yes", "NoSchedule"),
        Toleration("dedicated", "Equal", "ml", None),
        Toleration("x", "Exists", "", "NoExecute"),
    )


def container(
    requests: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    **extra: Any,
) -> Any:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    return {"name": "c", "resources": resources, **extra}


def pod(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "spec": spec, "status": {"phase": "Running"}}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param({"containers": [container()]}, {}, id="no-resources"),
        pytest.param(
            {
                "containers": [
                    container({"cpu": "500m", "memory": "1Gi"}),
                    container({"cpu": "1", "memory": "1Gi"}),
                ]
            },
            {"cpu": 1500, "memory": 2 * GI},
            id="sum-of-containers",
        ),
        pytest.param(
            {"containers": [container(limits={"cpu": "2", "nvidia.com/gpu": "8"})]},
            {"cpu": 2000, "nvidia.com/gpu": 8},
            id="limits-fallback",
        ),
        pytest.param(
            {"containers": [container({"cpu": "1"}, {"cpu": "4", "memory": "8Gi"})]},
            {"cpu": 1000, "memory": 8 * GI},
            id="request-wins-limit-fills-gaps",
        ),
        pytest.param(
            {
                "initContainers": [
                    container({"cpu": "4", "memory": "1Gi"}),
                    container({"memory": "6Gi"}),
                ],
                "containers": [
                    container({"cpu": "1", "memory": "2Gi"}),
                    container({"cpu": "1", "memory": "2Gi"}),
                ],
            },
            {"cpu": 4000, "memory": 6 * GI},
            id="init-container-max",
        ),
        pytest.param(
            {
                "initContainers": [container({"cpu": "100m"})],
                "containers": [container({"cpu": "2"})],
            },
            {"cpu": 2000},
            id="small-init-container",
        ),
        pytest.param(
            {
                "initContainers": [
                    container({"cpu": "500m", "memory": "1Gi"}, restartPolicy="Always"),
                    container({"cpu": "3"}),
                ],
                "containers": [container({"cpu": "1", "memory": "1Gi"})],
            },
            {"cpu": 3500, "memory": 2 * GI},
            id="sidecar-adds-to-app-and-later-init",
        ),
        pytest.param(
            {
                "containers": [container({"cpu": "1"})],
                "overhead": {"cpu": "250m", "memory": "120Mi"},
            },
            {"cpu": 1250, "memory": 120 * 2**20},
            id="overhead",
        ),
        pytest.param(
            {
                # PodLevelResources: the pod's cpu and memory requests stand for its containers'; what
                # it does not name (a GPU) is still theirs, and the overhead adds to both.
                "resources": {"requests": {"cpu": "24", "memory": "200Gi"}},
                "containers": [container({"cpu": "1", "nvidia.com/gpu": "2"})],
                "overhead": {"cpu": "250m"},
            },
            {"cpu": 24250, "memory": 200 * GI, "nvidia.com/gpu": 2},
            id="pod-level-requests",
        ),
        pytest.param({"containers": None, "initContainers": None}, {}, id="nulls"),
    ],
)
def test_pod_requests(spec: dict[str, Any], expected: dict[str, int]) -> None:
    assert pod_requests(pod(**spec)) == expected


@pytest.mark.parametrize(
    ("phase", "deleting", "holds"),
    [
        ("Pending", False, True),
        ("Running", False, True),
        ("Running", True, True),
        ("Unknown", False, True),
        (None, False, True),
        ("Succeeded", False, False),
        ("Failed", False, False),
        ("Failed", True, False),
    ],
)
def test_pod_holds_resources(phase: str | None, deleting: bool, holds: bool) -> None:
    raw: dict[str, Any] = {"metadata": {}, "spec": {}, "status": {"phase": phase}}
    if deleting:
        raw["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert pod_holds_resources(raw) is holds


def bound_pod(node: str | None, phase: str, cpu: str, gpu: str = "0") -> dict[str, Any]:
    return {
        "metadata": {"name": "p"},
        "spec": {
            "nodeName": node,
            "containers": [container({"cpu": cpu, "nvidia.com/gpu": gpu})],
        },
        "status": {"phase": phase},
    }


def test_usage_by_node() -> None:
    pods = [
        bound_pod("a", "Running", "1", "4"),
        bound_pod("a", "Pending", "500m", "2"),
        bound_pod("a", "Succeeded", "8", "8"),
        bound_pod("b", "Failed", "8", "8"),
        bound_pod(None, "Pending", "8", "8"),
        bound_pod("c", "Running", "2"),
    ]
    assert usage_by_node(pods) == {
        "a": {"cpu": 1500, "nvidia.com/gpu": 6, "pods": 2},
        "c": {"cpu": 2000, "nvidia.com/gpu": 0, "pods": 1},
    }


def test_a_node_whose_pod_slots_are_taken_fits_no_gang_whatever_gpus_it_has_free() -> None:
    """Each bound pod takes one of the node's allocatable ``pods`` (as kube-scheduler counts them): 110
    running pods on a node of 110 leave no room for one more, 8 free GPUs or not."""
    node = node_info(
        {
            "metadata": {"name": "a"},
            "status": {
                "allocatable": {"nvidia.com/gpu": "8", "cpu": "64", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    )
    whole_node = {"nvidia.com/gpu": 8, "pods": 1}
    request = GangRequest(key="ns/j", priority=0, arrival=0.0, pod_count=1, per_pod=whole_node)
    full = usage_by_node([bound_pod("a", "Running", "100m") for _ in range(110)])
    assert schedule([node], full, [request]).admitted == ()
    assert [p.nodes for p in schedule([node], usage_by_node([]), [request]).admitted] == [("a",)]


def test_add_usage_mutates_in_place() -> None:
    usage: dict[str, dict[str, int]] = {"a": {"cpu": 1}}
    add_usage(usage, "a", {"cpu": 2, "memory": 5})
    add_usage(usage, "b", {"nvidia.com/gpu": 1})
    assert usage == {"a": {"cpu": 3, "memory": 5}, "b": {"nvidia.com/gpu": 1}}


def test_free_by_node() -> None:
    nodes = [
        NodeInfo("a", {"cpu": 8000, "nvidia.com/gpu": 8}, {}, (), True, False),
        NodeInfo("b", {"cpu": 4000}, {}, (), False, False),
    ]
    usage = {"a": {"cpu": 9000, "nvidia.com/gpu": 3, "memory": 7}, "ghost": {"cpu": 1}}
    assert free_by_node(nodes, usage) == {
        "a": {
            "cpu": 0,
            "nvidia.com/gpu": 5,
        },  # over-committed reads as 0, unknown resources dropped
        "b": {"cpu": 4000},
    }


def test_node_info_says_since_when_a_node_is_not_ready() -> None:
    node = raw_node()
    node["status"]["conditions"] = [
        {"type": "Ready", "status": "Unknown", "lastTransitionTime": "2027-01-15T08:00:00Z"}
    ]
    since = datetime.datetime(2027, 1, 15, 8, tzinfo=datetime.UTC).timestamp()
    assert node_info(node).not_ready_since == since
    # Ready: no time kept, whatever the condition's transition time (heartbeats do not change it).
    node["status"]["conditions"] = [
        {"type": "Ready", "status": "True", "lastTransitionTime": "2027-01-15T08:00:00Z"}
    ]
    assert node_info(node).not_ready_since is None
    # Not Ready without a time: unknown, and so lost at once (NodeInfo.lost_at).
    node["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    assert node_info(node).not_ready_since is None


def test_node_info_knows_an_out_of_service_node_by_its_taint() -> None:
    taint = {"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}
    shut = node_info(raw_node(spec={"taints": [taint]}))
    assert shut.ready
    assert shut.out_of_service
    # A gang whose pods tolerate every taint would be placed there and lost at once, again and again.
    assert not shut.usable
    other = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}
    assert not node_info(raw_node(spec={"taints": [other]})).out_of_service


def test_a_not_ready_time_is_never_later_than_when_the_operator_first_saw_it() -> None:
    """A kubelet stamps its Ready transitions with the node's clock: one running ahead would stretch
    the grace. An earlier time (the node was not Ready before the operator started) is kept."""
    node = raw_node()
    node["status"]["conditions"] = [
        {"type": "Ready", "status": "False", "lastTransitionTime": "2027-01-15T08:00:00Z"}
    ]
    stamped = datetime.datetime(2027, 1, 15, 8, tzinfo=datetime.UTC).timestamp()
    info = node_info(node)
    assert noticed_not_ready(info, stamped - 30).not_ready_since == stamped - 30  # its clock ahead
    assert noticed_not_ready(info, stamped + 30).not_ready_since == stamped
    node["status"]["conditions"] = [{"type": "Ready", "status": "False"}]  # no time: from first seen
    assert noticed_not_ready(node_info(node), stamped).not_ready_since == stamped
    ready = node_info(raw_node())
    assert noticed_not_ready(ready, stamped) is ready


def _owned(kind: str, controller: bool = True) -> dict[str, Any]:
    return {"metadata": {"ownerReferences": [{"kind": kind, "name": "x", "controller": controller}]}}


def _leaving(pod: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {**pod["metadata"], "deletionTimestamp": "2027-01-15T08:00:00Z"}}


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (_owned("DaemonSet"), True),
        (_owned("Node"), True),  # a static pod's mirror
        ({"metadata": {"annotations": {"kubernetes.io/config.mirror": "abc"}}}, True),
        (_owned("ReplicaSet"), False),
        (_owned("DaemonSet", controller=False), False),
        # Leaving (a DaemonSet's rolling update replaces it): what it holds is free once it is gone,
        # and its replacement counts then; both counted, a gang fitting beside one looked never to fit.
        (_leaving(_owned("DaemonSet")), False),
        ({"metadata": {}}, False),
        ({}, False),
    ],
)
def test_resident_pods_are_daemonsets_and_static_pods(pod: dict[str, Any], expected: bool) -> None:
    assert resident(pod) is expected


def test_a_gang_that_fits_only_where_daemonset_pods_are_never_fits_and_blocks_nobody() -> None:
    """A DaemonSet's pod takes 500m cpu of each node for good: a job that asks for the node's whole
    allocatable cpu can never run. Taken for one that waits, it held the queue's head forever."""
    nodes = [NodeInfo("a", {"cpu": 8000, "pods": 110})]
    daemon = {"a": {"cpu": 500, "pods": 1}}
    whole = GangRequest("ns/whole", 0, 1.0, 1, {"cpu": 8000, "pods": 1})
    small = GangRequest("ns/small", 0, 2.0, 1, {"cpu": 1000, "pods": 1})
    decision = schedule(nodes, daemon, [whole, small], resident=daemon)
    assert [p.key for p in decision.admitted] == ["ns/small"]
    (waiting,) = decision.waiting
    assert (waiting.key, waiting.reason, waiting.position) == ("ns/whole", WaitReason.Unschedulable, None)
    assert waiting.message.startswith("can never fit: ")
    assert "largest allocatable cpu: 7500m on a" in waiting.message
    assert "beside what DaemonSet and static pods hold" in waiting.message
    # Other pods come and go: what they hold does not make a gang one that never fits.
    blocked = schedule(nodes, daemon, [whole, small])
    assert blocked.admitted == ()
    assert {w.key: w.reason for w in blocked.waiting}["ns/whole"] is WaitReason.InsufficientCapacity
