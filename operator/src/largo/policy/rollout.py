"""How an InferenceService's replica groups move to a new revision, or to a new count: a pure function
of the groups it has, how many it wants, and the revision it wants them at.

A replica group is several pods admitted and restarted together, so it is also the unit of a rollout:
a group is never half old and half new. When the spec's pod-relevant parts change (a new
``revision``), groups are replaced Deployment-style: new groups are added within ``max_surge`` extra
groups, old ones are removed only while the ready groups stay within ``max_unavailable`` of
``desired``, so the service keeps serving through the change. A new group takes traffic only once it
is ready, which is why an old group waits for its replacement to be ready before it goes. The same
function plans a plain scale up or down, and a scale change in the middle of a rollout.

The rules, in the order they apply:
- ``desired == 0`` (scale to zero): every group is retired at once, whatever its state.
- Stalled: when a group at the new revision has been restarted after failures at least
  ``stall_after_restarts`` times, the new pods keep failing and more of them will not help. The step
  creates nothing, so the old groups keep serving, and says which group failed how often. The
  service stays as it is until the spec changes again (the failing group is then an old, not-ready
  group and goes first) or the caller replaces the group. A scale-down still frees GPUs while
  stalled, as a Deployment's does: groups go until no more than ``desired + max_surge`` are left in
  all (the rollout's own bound, so a stall alone retires nothing) and no fewer than ``desired``
  besides the failing ones (kept: they say why, and one retired would only be built again),
  not-ready first, then old before new, then the highest replica id.
- Never more than ``desired + max_surge`` groups in all, counting groups not yet ready and groups
  retired in this very step (they hold their GPUs while they drain). A plain scale-up, with no old
  groups, creates up to ``desired`` at once: the surge limits rollouts, not growth.
- A retirement never takes the ready groups below ``desired - max_unavailable`` (nor further below,
  when they already are, during a scale-up); retiring a group that is not ready costs nothing and is
  always allowed. Old-revision groups go first, not-ready before ready, then the highest replica id
  first; then, when more groups are at the new revision than ``desired`` (a scale-down), the surplus
  goes, not-ready first, then the highest replica id.
- Past its deadline: a group at the new revision not ready for ``progress_deadline`` seconds (since
  its admission, or since it last was ready: an image that cannot be pulled, a readiness that never
  passes or was lost for good, nothing that restarts it) stalls the step the same way, as a
  Deployment's progressDeadlineSeconds.
- ``max_surge == max_unavailable == 0`` could never replace a group, so ``max_unavailable`` is taken
  as 1, as a Deployment refuses both zero.

A step is what to do now; the caller applies it (new groups at the new revision, retired groups
drained then deleted) and calls again on what it then observes. The answer depends only on the
arguments, not on the order of ``groups``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GroupState:
    """One replica group as observed now."""

    replica: int
    # The hash of the pod-relevant spec the group was built from.
    revision: str
    # Every pod of the group running and ready (for ``minReadySeconds`` where it applies: available).
    ready: bool
    # Times the group was restarted after a failure since it was created.
    failed_restarts: int = 0
    # Seconds since the group was admitted, while it is not ready yet (0 when ready or still queued).
    unready_for: float = 0.0
    # Ready now, though not yet for ``minReadySeconds`` (``ready`` False): it serves, so it goes after
    # the groups that do not.
    serving: bool = False
    # Admitted to nodes (its pods exist or are being made); False while it waits in the queue.
    placed: bool = True


@dataclass(frozen=True, slots=True)
class RolloutStep:
    """What to do now, and the numbers behind it."""

    # New groups of the target revision to add now.
    create: int
    # Replica ids of groups to remove now (drain, then delete), in the order chosen.
    retire: tuple[int, ...]
    # Groups at the target revision, as observed.
    updated: int
    # Ready groups of any revision, as observed.
    ready: int
    stalled: bool
    # CamelCase: RolloutComplete, RollingOut, ScalingUp, ScalingDown, WaitingForReady, RolloutStalled.
    reason: str
    message: str


def _serves(group: GroupState) -> bool:
    return group.ready or group.serving


def _retire_order(groups: Sequence[GroupState]) -> list[GroupState]:
    """Not-ready before ready (a group that serves, not yet for minReadySeconds, between the two), one
    still queued before one placed (loading: its nodes and its load so far are not thrown away, as a
    Deployment scales down unscheduled pods first), then the highest replica id first."""
    return sorted(groups, key=lambda group: (group.ready, _serves(group), group.placed, -group.replica))


def _ids(replicas: Sequence[int]) -> str:
    return "[" + ", ".join(str(replica) for replica in replicas) + "]"


def plan_rollout(
    groups: Sequence[GroupState],
    desired: int,
    revision: str,
    max_surge: int,
    max_unavailable: int,
    stall_after_restarts: int = 3,
    progress_deadline: float | None = None,
    rolling_out: bool = False,
) -> RolloutStep:
    """The next step towards ``desired`` ready groups, all at ``revision``; see the module for the
    rules. ``rolling_out``: a rollout is under way though no old group is left (every one was retired
    before its replacement was ready: ``max_unavailable`` allowed it), so it is said to be one until
    the groups are ready. Raises ValueError on negative counts, ``stall_after_restarts < 1`` or a
    replica id that appears twice."""
    if desired < 0 or max_surge < 0 or max_unavailable < 0:
        raise ValueError("desired, max_surge and max_unavailable must be >= 0")
    if stall_after_restarts < 1:
        raise ValueError("stall_after_restarts must be >= 1")
    replicas = [group.replica for group in groups]
    if len(set(replicas)) != len(replicas):
        raise ValueError(f"a replica id appears more than once in {_ids(sorted(replicas))}")
    new = [group for group in groups if group.revision == revision]
    old = [group for group in groups if group.revision != revision]
    updated = len(new)
    ready = sum(1 for group in groups if group.ready)
    total = len(groups)

    if desired == 0:
        retire = tuple(group.replica for group in (*_retire_order(old), *_retire_order(new)))
        if not retire:
            return RolloutStep(0, (), 0, 0, False, "RolloutComplete", "scaled to zero: no groups left")
        message = f"scaling to zero: retiring {len(retire)} group(s) {_ids(retire)}, {ready} of them ready"
        return RolloutStep(0, retire, updated, ready, False, "ScalingDown", message)

    counts = f"{updated}/{desired} groups updated, {ready} ready, {total} in all"

    def stalled(reason: str, stuck: Sequence[GroupState], worst: GroupState, why: str) -> RolloutStep:
        message = f"group {worst.replica} at revision {revision} {why}: rollout stalled with {counts}"
        stuck_ids = {group.replica for group in stuck}
        others = [group for group in groups if group.replica not in stuck_ids]

        def keeps(group: GroupState) -> tuple[bool, bool, bool, int]:
            return group.ready, _serves(group), group.revision == revision, -group.replica

        order = sorted(others, key=keeps)
        # Only what a scale-down put above the rollout's own bound goes, never the surge it made.
        excess = min(len(others) - desired, len(groups) - (desired + max_surge))
        retire = tuple(group.replica for group in order[: max(excess, 0)])
        if retire:
            message += f"; scaling down: retiring {_ids(retire)}"
        return RolloutStep(0, retire, updated, ready, True, reason, f"{message}; the others stay as they are")

    failing = [group for group in new if group.failed_restarts >= stall_after_restarts]
    if failing:
        worst = min(failing, key=lambda group: (-group.failed_restarts, group.replica))
        why = f"was restarted after failures {worst.failed_restarts} times (limit {stall_after_restarts})"
        return stalled("RolloutStalled", failing, worst, why)
    late = [g for g in new if progress_deadline is not None and g.unready_for >= progress_deadline]
    if late:
        worst = min(late, key=lambda group: (-group.unready_for, group.replica))
        why = f"has not been ready for progressDeadlineSeconds ({progress_deadline:g}s)"
        return stalled("ProgressDeadlineExceeded", late, worst, why)

    if max_surge == 0 and max_unavailable == 0:
        max_unavailable = 1
    most = desired + max_surge
    floor = max(desired - max_unavailable, 0)

    # Ready groups that may go while the rest stay at or above the floor.
    spare = ready - floor
    surplus = _retire_order(new)[: max(updated - desired, 0)]
    chosen: list[int] = []
    for group in (*_retire_order(old), *surplus):
        if group.ready:
            if spare <= 0:
                continue
            spare -= 1
        chosen.append(group.replica)
    retire = tuple(chosen)
    # Counted before this step's retirements: a retired group holds its place until it is gone.
    create = max(0, min(most - total, desired - updated))

    numbers = f"{updated}/{desired} groups at revision {revision}, {ready} ready, {total} in all"
    if create or retire:
        action = f"creating {create}, retiring {_ids(retire)}"
    else:
        action = "waiting for groups to become ready"
    bounds = f"(at most {most} in all, at least {floor} ready)"
    if old or (rolling_out and (create or retire or ready < desired)):
        reason, message = "RollingOut", f"{numbers} {bounds}: {action}"
    elif create:
        reason, message = "ScalingUp", f"{numbers}: {action}"
    elif retire:
        reason, message = "ScalingDown", f"{numbers}: {action}"
    elif ready < desired:
        reason, message = "WaitingForReady", f"{numbers}: {action}"
    else:
        reason, message = "RolloutComplete", f"{numbers}: nothing to do"
    return RolloutStep(create, retire, updated, ready, False, reason, message)
