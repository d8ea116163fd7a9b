"""All-or-nothing gang admission with strict priority ordering.

A gang is admitted only when every pod fits at once. Jobs are considered in order (priority, then
arrival, then key); the first job that does not fit blocks everything behind it, so a stream of
small jobs can never starve a large one. Jobs that could not fit even in an empty cluster (one
with only its DaemonSets' and static pods) are reported and skipped instead, because waiting for them
would block the queue forever.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from largo.sched.inventory import POD_SLOTS, Usage, free_by_node
from largo.sched.quantity import format_resource
from largo.sched.types import (
    BLOCKING_EFFECTS,
    CPU,
    GPU,
    Decision,
    GangRequest,
    NodeInfo,
    Placement,
    Waiting,
    WaitReason,
    describe_checkpoint,
)

Free = Mapping[str, Mapping[str, int]]
_NO_FREE: Mapping[str, int] = {}


def _tolerated(node: NodeInfo, request: GangRequest) -> bool:
    return all(
        any(t.tolerates(taint) for t in request.tolerations)
        for taint in node.taints
        if taint.effect in BLOCKING_EFFECTS
    )


def _selected(node: NodeInfo, request: GangRequest) -> bool:
    return all(node.labels.get(k) == v for k, v in request.node_selector.items())


def _is_candidate(node: NodeInfo, request: GangRequest) -> bool:
    if not node.usable or not _selected(node, request) or not _tolerated(node, request):
        return False
    return request.required_topology_key is None or request.required_topology_key in node.labels


def _candidates(nodes: Sequence[NodeInfo], request: GangRequest) -> list[NodeInfo]:
    return [node for node in nodes if _is_candidate(node, request)]


def _room(free: Mapping[str, int], per_pod: Mapping[str, int], limit: int) -> int:
    """How many pods (at most ``limit``) fit into ``free``; an absent resource has 0 free."""
    room = limit
    for name, amount in per_pod.items():
        if amount > 0:
            room = min(room, free.get(name, 0) // amount)
            if room == 0:
                return 0
    return room


def _pack(candidates: Sequence[NodeInfo], free: Free, request: GangRequest) -> tuple[str, ...] | None:
    """Best-fit packing (below); an exclusive gang gets one pod per node and nodes without GPUs in use."""
    if request.exclusive:
        return _pack_exclusive(candidates, free, request)
    return _pack_shared(candidates, free, request)


def _fits_whole(node: NodeInfo, free: Free, request: GangRequest) -> bool:
    """No GPU of ``node`` is in use, and one pod of ``request`` fits it."""
    node_free = free.get(node.name, _NO_FREE)
    return node_free.get(GPU, 0) == node.allocatable.get(GPU, 0) and _room(node_free, request.per_pod, 1) == 1


def _pack_exclusive(
    candidates: Sequence[NodeInfo], free: Free, request: GangRequest
) -> tuple[str, ...] | None:
    """One pod on each of the smallest whole nodes that fit it (then cpu, then name)."""
    fitting = sorted(
        (free.get(node.name, _NO_FREE).get(GPU, 0), free.get(node.name, _NO_FREE).get(CPU, 0), node.name)
        for node in candidates
        if _fits_whole(node, free, request)
    )
    if len(fitting) < request.pod_count:
        return None
    return tuple(name for _gpu, _cpu, name in fitting[: request.pod_count])


def _pack_shared(candidates: Sequence[NodeInfo], free: Free, request: GangRequest) -> tuple[str, ...] | None:
    """Best-fit packing of identical pods, or None if the set cannot hold the whole gang.

    Pods go to the feasible node with the fewest free GPUs (then cpu, then name); a gang that asks
    for no GPU goes to nodes without GPUs first, so it takes no cpu a GPU node's GPUs will need
    when they are free again (a GPU node with none free ties with a CPU node otherwise). Placing a
    pod only lowers that node's key, so it stays the best choice until full: filling nodes one at a
    time in key order is the same as assigning pod by pod, and is exact for identical pods.
    """
    n = request.pod_count
    cpu_only = request.per_pod.get(GPU, 0) == 0
    rooms: list[tuple[bool, int, int, str, int]] = []
    total = 0
    for node in candidates:
        node_free = free.get(node.name, _NO_FREE)
        room = _room(node_free, request.per_pod, n)
        if room:
            gpu_node = cpu_only and node.allocatable.get(GPU, 0) > 0
            rooms.append((gpu_node, node_free.get(GPU, 0), node_free.get(CPU, 0), node.name, room))
            total += room
    if total < n:
        return None
    rooms.sort()
    assigned: list[str] = []
    for _gpu_node, _gpu, _cpu, name, room in rooms:
        take = min(room, n - len(assigned))
        assigned.extend([name] * take)
        if len(assigned) == n:
            break
    return tuple(assigned)


def _domains(candidates: Sequence[NodeInfo], key: str) -> dict[str, list[NodeInfo]]:
    domains: dict[str, list[NodeInfo]] = {}
    for node in candidates:
        value = node.labels.get(key)
        if value is not None:
            domains.setdefault(value, []).append(node)
    return domains


def _pack_one_domain(
    candidates: Sequence[NodeInfo], free: Free, request: GangRequest, key: str
) -> tuple[str, ...] | None:
    """Pack into the single domain that fits and leaves the fewest GPUs (then cpu, then name) free."""
    best: tuple[int, int, str] | None = None
    best_nodes: tuple[str, ...] | None = None
    n = request.pod_count
    for value, members in _domains(candidates, key).items():
        assigned = _pack(members, free, request)
        if assigned is None:
            continue
        gpu = sum(free.get(m.name, _NO_FREE).get(GPU, 0) for m in members) - n * request.per_pod.get(GPU, 0)
        cpu = sum(free.get(m.name, _NO_FREE).get(CPU, 0) for m in members) - n * request.per_pod.get(CPU, 0)
        score = (gpu, cpu, value)
        if best is None or score < best:
            best, best_nodes = score, assigned
    return best_nodes


def _place_among(candidates: Sequence[NodeInfo], free: Free, request: GangRequest) -> Placement | None:
    if request.required_topology_key is not None:
        assigned = _pack_one_domain(candidates, free, request, request.required_topology_key)
    elif request.preferred_topology_key is not None:
        assigned = _pack_one_domain(candidates, free, request, request.preferred_topology_key)
        if assigned is None:
            assigned = _pack(candidates, free, request)
    else:
        assigned = _pack(candidates, free, request)
    return None if assigned is None else Placement(key=request.key, nodes=assigned)


def place(nodes: Sequence[NodeInfo], free: Free, request: GangRequest) -> Placement | None:
    """Place every pod of ``request`` into ``free`` capacity, or return None.

    Candidates are usable nodes that match the node selector and whose NoSchedule/NoExecute taints
    are all tolerated. ``free`` maps node name to free resources; nodes missing from it have none.
    """
    return _place_among(_candidates(nodes, request), free, request)


def _pods(n: int) -> str:
    return f"{n} pod" if n == 1 else f"{n} pods"


def _why_no_candidates(nodes: Sequence[NodeInfo], request: GangRequest) -> str:
    unusable = unselected = untolerated = unlabeled = 0
    example_taint = ""
    for node in nodes:
        if not node.usable:
            unusable += 1
        elif not _selected(node, request):
            unselected += 1
        elif not _tolerated(node, request):
            untolerated += 1
            if not example_taint:
                taint = next(
                    t
                    for t in node.taints
                    if t.effect in BLOCKING_EFFECTS and not any(x.tolerates(t) for x in request.tolerations)
                )
                example_taint = f" (e.g. {taint.key}={taint.value}:{taint.effect})"
        else:
            unlabeled += 1
    parts = []
    if unusable:
        parts.append(f"{unusable} not ready or cordoned")
    if unselected:
        selector = ",".join(f"{k}={v}" for k, v in sorted(request.node_selector.items()))
        parts.append(f"{unselected} not matching nodeSelector {selector}")
    if untolerated:
        parts.append(f"{untolerated} with untolerated taints{example_taint}")
    if unlabeled:
        parts.append(f"{unlabeled} without label {request.required_topology_key}")
    detail = f": {', '.join(parts)}" if parts else ""
    return f"no node can run its pods (of {len(nodes)} nodes{detail})"


def _explain(
    nodes: Sequence[NodeInfo], candidates: Sequence[NodeInfo], free: Free, request: GangRequest, word: str
) -> str:
    """Name the scarcest requested resource and how much room the best option has.

    ``word`` is "free" for the current cluster and "allocatable" for the empty one.
    """
    if not candidates:
        return _why_no_candidates(nodes, request)
    n = request.pod_count
    positive = sorted((name, amount) for name, amount in request.per_pod.items() if amount > 0)
    if not positive:  # pragma: no cover - a gang without requests fits on any candidate
        return f"needs {_pods(n)} with no resource requests"
    # The resource that on its own leaves room for the fewest pods is the one to talk about.
    short, per = min(
        positive,
        key=lambda item: sum(free.get(c.name, _NO_FREE).get(item[0], 0) // item[1] for c in candidates),
    )
    largest, largest_on = min(
        ((free.get(c.name, _NO_FREE).get(short, 0), c.name) for c in candidates),
        key=lambda item: (-item[0], item[1]),
    )
    head = f"needs {_pods(n)} x {format_resource(short, per)} {short}"
    if request.exclusive:
        head += ", each on a node with no GPU in use"
    largest_text = f"largest {word} {short}: {format_resource(short, largest)} on {largest_on}"

    def room_in(members: Sequence[NodeInfo]) -> int:
        if request.exclusive:
            return sum(1 for m in members if _fits_whole(m, free, request))
        return sum(_room(free.get(m.name, _NO_FREE), request.per_pod, n) for m in members)

    key = request.required_topology_key
    if key is None:
        return f"{head}; {largest_text}; room for {min(room_in(candidates), n)} of {n} pods"
    best_room, best_value = min(
        ((min(n, room_in(members)), value) for value, members in _domains(candidates, key).items()),
        key=lambda item: (-item[0], item[1]),
    )
    return (
        f"{head} in one {key}; {largest_text}; best {key}={best_value} has room for {best_room} of {n} pods"
    )


def schedule(
    nodes: Sequence[NodeInfo],
    usage: Usage,
    queue: Sequence[GangRequest],
    checkpoints_in_use: Mapping[str, str] | None = None,
    resident: Usage | None = None,
) -> Decision:
    """Decide which queued gangs start now and why the others wait.

    ``usage`` must already include gangs admitted earlier whose pods are not bound yet (the
    scheduler loop adds them, see ``controllers.scheduler.Scheduler.usage``); ``queue`` holds only
    gangs that are not admitted. ``checkpoints_in_use`` maps the checkpoint directory of each gang
    that holds one (admitted and not finished or suspended, or with pods still stopping) to that
    gang's key: another queued gang that writes the same directory waits for it without blocking
    the gangs behind it. ``resident`` is what pods that never leave their node hold (DaemonSets',
    static pods'; part of ``usage`` too): a gang that fits only where they are cannot ever fit, and
    were it taken for one that waits, it would block the queue for good.
    """
    in_use = dict(checkpoints_in_use or {})
    free = free_by_node(nodes, usage)
    empty = free_by_node(nodes, resident or {})
    beside = "; counted beside what DaemonSet and static pods hold" if any((resident or {}).values()) else ""
    ordered = sorted(queue, key=lambda r: (-r.priority, r.arrival, r.key))
    admitted: list[Placement] = []
    waiting: list[Waiting] = []
    blocker: str | None = None

    def wait(request: GangRequest, reason: WaitReason, message: str) -> None:
        ordered_so_far = sum(1 for w in waiting if w.position is not None)
        blocks_nobody = reason in (WaitReason.Unschedulable, WaitReason.CheckpointInUse)
        position = None if blocks_nobody else ordered_so_far + 1
        waiting.append(Waiting(request.key, position, reason, message))

    for request in ordered:
        candidates = _candidates(nodes, request)
        if _place_among(candidates, empty, request) is None:
            reason = _explain(nodes, candidates, empty, request, "allocatable")
            wait(request, WaitReason.Unschedulable, f"can never fit: {reason}{beside}")
            continue
        holder = in_use.get(request.checkpoint) if request.checkpoint is not None else None
        # A released or restarting gang holds its directory while it queues again: not against itself.
        if holder is not None and holder != request.key and request.checkpoint is not None:
            wait(
                request,
                WaitReason.CheckpointInUse,
                f"its checkpoint directory ({describe_checkpoint(request.checkpoint)}) is in use by "
                f"{holder}, which must stop first; give this job a checkpoint.subPath of its own to run "
                "beside it",
            )
            continue
        placement = _place_among(candidates, free, request)
        if blocker is not None:
            if placement is not None:
                wait(
                    request,
                    WaitReason.QueuedBehindHead,
                    f"fits now but queued behind {blocker}, the head of the queue, which does not fit yet",
                )
            else:
                reason = _explain(nodes, candidates, free, request, "free")
                wait(request, WaitReason.InsufficientCapacity, f"{reason}; queued behind {blocker}")
        elif placement is None:
            blocker = request.key
            wait(request, WaitReason.InsufficientCapacity, _explain(nodes, candidates, free, request, "free"))
        else:
            admitted.append(placement)
            if request.checkpoint is not None:
                in_use[request.checkpoint] = request.key
            for name in placement.nodes:
                node_free = free[name]
                for resource, amount in request.per_pod.items():
                    if resource in node_free:
                        node_free[resource] -= amount
                if request.exclusive:
                    # The node is the pod's: nothing else is placed there, not even a pod without GPUs.
                    for resource in (GPU, POD_SLOTS):
                        if resource in node_free:
                            node_free[resource] = 0
    return Decision(admitted=tuple(admitted), waiting=tuple(waiting))


# --- fragmentation -----------------------------------------------------------------------------------


def stranded_gpus(nodes: Sequence[NodeInfo], free: Free, request: GangRequest) -> int:
    """Free GPUs that ``request`` cannot use at all: on nodes it may not run on, or where not even one
    of its pods fits (an exclusive gang's: on nodes with a GPU in use). Capacity that exists but is in
    the wrong place for the job that waits first."""
    candidates = {node.name for node in _candidates(nodes, request)}
    stranded = 0
    for node in nodes:
        if not node.usable:
            continue
        node_free = free.get(node.name, _NO_FREE)
        # An exclusive gang's pod needs a node no GPU of which is in use (``_fits_whole``).
        if request.exclusive:
            fits = _fits_whole(node, free, request)
        else:
            fits = _room(node_free, request.per_pod, 1) > 0
        if node.name not in candidates or not fits:
            stranded += node_free.get(GPU, 0)
    return stranded


def largest_gang(nodes: Sequence[NodeInfo], free: Free, gpus_per_pod: int) -> int:
    """How many pods of ``gpus_per_pod`` GPUs would fit now, across all usable nodes (GPUs only)."""
    return sum(free.get(node.name, _NO_FREE).get(GPU, 0) // gpus_per_pod for node in nodes if node.usable)
