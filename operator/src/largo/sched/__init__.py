"""largo.sched: pure gang-scheduling decisions (no I/O; all state comes in as arguments)."""

from largo.sched.gang import place, schedule
from largo.sched.inventory import (
    add_usage,
    free_by_node,
    node_info,
    pod_holds_resources,
    pod_requests,
    taints_from,
    tolerations_from,
    usage_by_node,
)
from largo.sched.quantity import format_resource, parse_quantity, parse_resource, parse_resources
from largo.sched.types import (
    Decision,
    GangRequest,
    NodeInfo,
    Placement,
    Taint,
    Toleration,
    Waiting,
    WaitReason,
)

__all__ = [
    "Decision",
    "GangRequest",
    "NodeInfo",
    "Placement",
    "Taint",
    "Toleration",
    "WaitReason",
    "Waiting",
    "add_usage",
    "format_resource",
    "free_by_node",
    "node_info",
    "parse_quantity",
    "parse_resource",
    "parse_resources",
    "place",
    "pod_holds_resources",
    "pod_requests",
    "schedule",
    "taints_from",
    "tolerations_from",
    "usage_by_node",
]
