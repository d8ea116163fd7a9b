"""Toleration semantics and value-type validation."""

import pytest
from largo.sched.types import GangRequest, NodeInfo, Taint, Toleration, WaitReason

GPU_TAINT = Taint("nvidia.com/gpu", "present", "NoSchedule")


@pytest.mark.parametrize(
    ("toleration", "taint", "expected"),
    [
        (Toleration(None, "Exists"), GPU_TAINT, True),
        (Toleration(None, "Exists"), Taint("anything", "x", "NoExecute"), True),
        (Toleration("nvidia.com/gpu", "Exists"), GPU_TAINT, True),
        (Toleration("nvidia.com/gpu", "Exists", effect="NoSchedule"), GPU_TAINT, True),
        (Toleration("nvidia.com/gpu", "Exists", effect="NoExecute"), GPU_TAINT, False),
        (Toleration("nvidia.com/gpu", "Equal", "present"), GPU_TAINT, True),
        (Toleration("nvidia.com/gpu", "Equal", "absent"), GPU_TAINT, False),
        (
            Toleration("nvidia.com/gpu", value="present", effect="NoSchedule"),
            GPU_TAINT,
            True,
        ),
        (Toleration("other", "Exists"), GPU_TAINT, False),
        (
            Toleration("dedicated", "Equal", ""),
            Taint("dedicated", "", "NoSchedule"),
            True,
        ),
        (Toleration("dedicated"), Taint("dedicated", "ml", "NoSchedule"), False),
        (
            Toleration("nvidia.com/gpu", "", "present"),
            GPU_TAINT,
            True,
        ),  # empty operator means Equal
        (Toleration("nvidia.com/gpu", "Bogus", "present"), GPU_TAINT, False),
    ],
)
def test_tolerates(toleration: Toleration, taint: Taint, expected: bool) -> None:
    assert toleration.tolerates(taint) is expected


@pytest.mark.parametrize(
    ("ready", "unschedulable", "usable"),
    [
        (True, False, True),
        (False, False, False),
        (True, True, False),
        (False, True, False),
    ],
)
def test_node_usable(ready: bool, unschedulable: bool, usable: bool) -> None:
    node = NodeInfo("n", {"cpu": 1000}, {}, (), ready, unschedulable)
    assert node.usable is usable


def test_gang_request_rejects_empty_gang() -> None:
    with pytest.raises(ValueError, match="pod_count"):
        GangRequest("ns/a", 0, 0.0, 0, {"cpu": 1})


def test_gang_request_rejects_negative_request() -> None:
    with pytest.raises(ValueError, match="cpu"):
        GangRequest("ns/a", 0, 0.0, 1, {"cpu": -1})


def test_gang_request_defaults_are_independent() -> None:
    a = GangRequest("ns/a", 0, 0.0, 1, {})
    b = GangRequest("ns/b", 0, 0.0, 1, {})
    assert a.node_selector == {}
    assert a.node_selector is not b.node_selector


def test_wait_reason_is_string() -> None:
    assert WaitReason.Unschedulable == "Unschedulable"
    assert str(WaitReason.InsufficientCapacity) == "InsufficientCapacity"
    assert f"{WaitReason.QueuedBehindHead}" == "QueuedBehindHead"
