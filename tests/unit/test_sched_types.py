"""Toleration semantics and value-type validation."""

import pytest
from largo.sched.types import GangRequest, NodeInfo, Taint, Toleration, WaitReason, node_health

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


GRACE = 60.0
NOW = 1_800_000_000.0


def test_a_node_not_ready_is_lost_only_after_the_grace_period() -> None:
    ready = NodeInfo("ready", {})
    blip = NodeInfo("blip", {}, ready=False, not_ready_since=NOW - 10)
    down = NodeInfo("down", {}, ready=False, not_ready_since=NOW - GRACE)
    # An administrator's out-of-service taint means shut down: lost at once, even if still Ready.
    shut = NodeInfo("shut", {}, out_of_service=True)
    # Not Ready since an unknown time: lost at once, as before the grace period existed.
    unknown = NodeInfo("unknown", {}, ready=False)
    nodes = {node.name: node for node in (ready, blip, down, shut, unknown)}
    health = node_health([*nodes, "gone"], nodes.get, NOW, GRACE)
    assert health.lost == {"down", "shut", "unknown", "gone"}
    # Not Ready or out of service is no place for new pods, lost or not.
    assert health.unusable == {"blip", "down", "shut", "unknown", "gone"}
    assert health.lost_at == {"blip": NOW + 50}
    assert health.recheck_after(NOW) == 50
    assert health.recheck_after(NOW + 70) == 0  # overdue: at once
    assert node_health(["ready"], nodes.get, NOW, GRACE).recheck_after(NOW) is None


def test_a_zero_grace_period_loses_a_node_as_soon_as_it_is_not_ready() -> None:
    blip = NodeInfo("blip", {}, ready=False, not_ready_since=NOW)
    health = node_health(["blip"], {"blip": blip}.get, NOW, 0.0)
    assert health.lost == {"blip"}
    assert health.lost_at == {}
    assert blip.lost_at(GRACE) == NOW + GRACE
    assert NodeInfo("ready", {}).lost_at(GRACE) is None
