"""Rolling replica groups to a new revision, and scaling them, one step at a time. The simulated
rollouts apply each step as the controller would (created groups are seen not ready once, then ready;
retired groups vanish) and check the surge and availability bounds at every step."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import pytest
from largo.policy.rollout import GroupState, RolloutStep, plan_rollout

OLD, NEW = "rev-old", "rev-new"


def groups(revision: str, *replicas: int, ready: bool = True) -> list[GroupState]:
    return [GroupState(replica, revision, ready) for replica in replicas]


def by_revision(state: list[GroupState]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for group in sorted(state, key=lambda g: g.replica):
        found.setdefault(group.revision, []).append(group.replica)
    return found


def apply(state: list[GroupState], step: RolloutStep, revision: str) -> list[GroupState]:
    """Retired groups vanish; groups created at the step before are ready now; the new ones take the
    lowest free replica ids and are not ready yet."""
    kept = [group for group in state if group.replica not in step.retire]
    kept = [replace(group, ready=True) if group.revision == revision else group for group in kept]
    taken = {group.replica for group in kept}
    free = (replica for replica in itertools.count() if replica not in taken)
    return kept + [GroupState(next(free), revision, False) for _ in range(step.create)]


@dataclass
class Run:
    state: list[GroupState]
    steps: list[RolloutStep]
    seen: list[list[GroupState]]


def simulate(
    state: list[GroupState],
    desired: int,
    surge: int,
    unavailable: int,
    revision: str = NEW,
    max_steps: int = 40,
    floor: int | None = None,
) -> Run:
    """Plans and applies steps until the rollout is complete (or ``max_steps``), checking at each that
    a creation stays within desired + surge even counting the groups being retired, and that a
    retirement never takes the ready groups below ``floor`` (desired - unavailable unless given) or
    below where they were."""
    floor = desired - unavailable if floor is None else floor
    run = Run(state, [], [])
    for _ in range(max_steps):
        step = plan_rollout(run.state, desired, revision, surge, unavailable)
        run.steps.append(step)
        run.seen.append(run.state)
        if step.reason == "RolloutComplete":
            return run
        if step.create:
            assert len(run.state) + step.create <= desired + surge, step
        ready_before = sum(group.ready for group in run.state)
        ready_after = sum(group.ready for group in run.state if group.replica not in step.retire)
        assert ready_after >= min(floor, ready_before), step
        run.state = apply(run.state, step, revision)
    return run


def assert_complete(run: Run, desired: int, revision: str = NEW) -> None:
    assert run.steps[-1].reason == "RolloutComplete"
    assert len(run.state) == desired
    assert all(group.revision == revision and group.ready for group in run.state)
    assert run.steps[-1].updated == desired
    assert run.steps[-1].ready == desired


@pytest.mark.parametrize(("surge", "unavailable"), [(1, 0), (0, 1), (2, 1)])
def test_a_rollout_stays_within_surge_and_availability_and_completes(surge: int, unavailable: int) -> None:
    run = simulate(groups(OLD, 0, 1, 2, 3), 4, surge, unavailable)
    assert_complete(run, 4)
    for seen in run.seen:
        assert len(seen) <= 4 + surge
        assert sum(group.ready for group in seen) >= 4 - unavailable
    # It uses what it is allowed: the surge above desired, and the unavailability below.
    assert max(len(seen) for seen in run.seen) == 4 + surge
    assert min(sum(group.ready for group in seen) for seen in run.seen) == 4 - unavailable
    # Rolling, not all at once: old and new groups served side by side.
    assert any(OLD in by_revision(seen) and NEW in by_revision(seen) for seen in run.seen)
    # RollingOut while old groups remain; then at most the last new group coming up.
    for seen, step in zip(run.seen, run.steps, strict=True):
        if OLD in by_revision(seen):
            assert step.reason == "RollingOut", step
        else:
            assert step.reason in {"ScalingUp", "WaitingForReady", "RolloutComplete"}, step
    assert len(run.steps) <= 16


def test_an_old_group_goes_only_once_its_replacement_is_ready() -> None:
    first = plan_rollout(groups(OLD, 0, 1, 2, 3), 4, NEW, 1, 0)
    assert (first.create, first.retire) == (1, ())
    waiting = plan_rollout([*groups(OLD, 0, 1, 2, 3), GroupState(4, NEW, False)], 4, NEW, 1, 0)
    assert (waiting.create, waiting.retire) == (0, ())
    assert "waiting" in waiting.message
    replaced = plan_rollout([*groups(OLD, 0, 1, 2, 3), GroupState(4, NEW, True)], 4, NEW, 1, 0)
    assert (replaced.create, replaced.retire) == (0, (3,))
    assert (replaced.updated, replaced.ready, replaced.reason) == (1, 5, "RollingOut")
    assert "1/4" in replaced.message
    assert "5 ready" in replaced.message


def test_old_groups_go_first_not_ready_before_ready_then_highest_id() -> None:
    state = [
        *groups(OLD, 0, 2, 3),
        GroupState(1, OLD, False),
        *groups(NEW, 4, 5, 6),
    ]
    step = plan_rollout(state, 4, NEW, 0, 2)
    # Ready 6, floor 2: the not-ready old group, then the old ready ones from the highest id.
    assert step.retire == (1, 3, 2, 0)
    assert step.create == 0
    # With a floor of 5 only one ready group may go; the not-ready one goes anyway.
    step = plan_rollout(state, 4, NEW, 3, 0)
    assert step.retire == (1, 3, 2)
    assert step.create == 0
    # Scaling down mid-rollout: old groups before the surplus of new ones, even when the ready old one
    # takes the only room below the floor.
    state = [*groups(OLD, 0, 1), *groups(NEW, 2, 3, 4, ready=False), GroupState(5, NEW, True)]
    step = plan_rollout(state, 2, NEW, 1, 0)
    assert step.retire == (1, 4, 3)
    assert (step.create, step.reason) == (0, "RollingOut")


def test_plain_scale_up_creates_everything_at_once() -> None:
    step = plan_rollout(groups(NEW, 0, 1), 6, NEW, 1, 0)
    assert (step.create, step.retire, step.reason) == (4, (), "ScalingUp")
    assert plan_rollout([], 4, NEW, 0, 1).create == 4
    run = simulate(groups(NEW, 0, 1), 6, 0, 0, floor=2)
    assert_complete(run, 6)
    assert [step.reason for step in run.steps] == ["ScalingUp", "WaitingForReady", "RolloutComplete"]


def test_plain_scale_down_retires_not_ready_first_then_the_highest_ids() -> None:
    state = [*groups(NEW, 0, 1, 3, 4, 5), GroupState(2, NEW, False)]
    step = plan_rollout(state, 3, NEW, 1, 0)
    assert (step.create, step.retire, step.reason) == (0, (2, 5, 4), "ScalingDown")
    assert "6 in all" in step.message
    run = simulate(state, 3, 1, 0)
    assert_complete(run, 3)
    assert by_revision(run.state) == {NEW: [0, 1, 3]}


def test_scale_up_during_a_rollout() -> None:
    # Part way through a rollout to 4, the service is asked for 6.
    started = simulate(groups(OLD, 0, 1, 2, 3), 4, 1, 0, max_steps=4)
    assert OLD in by_revision(started.state)
    assert NEW in by_revision(started.state)
    run = simulate(started.state, 6, 1, 0, floor=4)
    assert_complete(run, 6)
    for seen in run.seen:
        assert len(seen) <= 7
        assert sum(group.ready for group in seen) >= 4
    assert run.steps[0].create > 0


def test_scale_down_during_a_rollout() -> None:
    started = simulate(groups(OLD, 0, 1, 2, 3), 4, 1, 0, max_steps=4)
    assert OLD in by_revision(started.state)
    run = simulate(started.state, 2, 1, 0)
    assert_complete(run, 2)
    for seen in run.seen:
        assert sum(group.ready for group in seen) >= 2
    # From the start of the rollout straight to fewer groups.
    step = plan_rollout(groups(OLD, 0, 1, 2, 3), 2, NEW, 1, 0)
    assert (step.create, step.retire) == (0, (3, 2))
    assert_complete(simulate(groups(OLD, 0, 1, 2, 3), 2, 1, 0), 2)


def test_a_rollout_whose_new_groups_keep_failing_stalls_and_keeps_the_old_groups() -> None:
    failing = GroupState(4, NEW, False, failed_restarts=3)
    state = [*groups(OLD, 0, 1, 2, 3), failing]
    # Without the failures this would retire an old ready group and create another new one.
    healthy = plan_rollout([*groups(OLD, 0, 1, 2, 3), replace(failing, failed_restarts=2)], 4, NEW, 2, 1)
    assert (healthy.create, healthy.retire, healthy.stalled) == (1, (3,), False)
    step = plan_rollout(state, 4, NEW, 2, 1)
    assert (step.create, step.retire, step.stalled, step.reason) == (0, (), True, "RolloutStalled")
    assert (step.updated, step.ready) == (1, 4)
    assert "group 4" in step.message
    assert "3 times" in step.message
    # Nor does it grow on a stalled revision.
    assert plan_rollout(state, 6, NEW, 2, 1).create == 0
    assert plan_rollout(state, 6, NEW, 2, 1).retire == ()
    # The limit is the caller's.
    assert not plan_rollout(state, 4, NEW, 2, 1, stall_after_restarts=4).stalled
    # The worst group is named.
    worse = [*state, GroupState(5, NEW, False, failed_restarts=7)]
    assert "group 5" in plan_rollout(worse, 4, NEW, 2, 1).message


def test_a_stalled_rollout_still_scales_down_and_keeps_the_failing_group() -> None:
    """The autoscaler (or a user) asks for fewer groups while the new revision keeps failing: the GPUs
    of the groups beyond ``desired`` are freed, not held until the spec changes again."""
    state = [
        *groups(OLD, 0, 1, 2),
        GroupState(3, OLD, False),
        GroupState(4, NEW, True),
        GroupState(5, NEW, False, failed_restarts=3),
        GroupState(6, NEW, False, failed_restarts=5),
    ]
    # Seven groups, two wanted with a surge of two: the old not-ready one, then old before new.
    step = plan_rollout(state, 2, NEW, 2, 1)
    assert (step.create, step.retire, step.stalled, step.reason) == (0, (3, 2, 1), True, "RolloutStalled")
    assert "group 6" in step.message
    assert "retiring [3, 2, 1]" in step.message
    # Applied, the step after it retires nothing more, and the failing groups still say why.
    after = plan_rollout([g for g in state if g.replica not in step.retire], 2, NEW, 2, 1)
    assert (after.create, after.retire, after.stalled) == (0, (), True)
    # At the count it has, a stalled rollout retires nothing: the old groups keep serving.
    assert plan_rollout(state, 5, NEW, 2, 1).retire == ()
    # Nor does it trim the surge the rollout made: a ready new group and one still loading beside
    # the failing one, all within desired + maxSurge.
    surged = [*groups(OLD, 0, 1, 2), GroupState(3, NEW, True), GroupState(4, NEW, False, failed_restarts=3)]
    assert plan_rollout(surged, 3, NEW, 2, 1).retire == ()
    loading = [*groups(OLD, 0, 1), GroupState(3, NEW, False), GroupState(4, NEW, False, failed_restarts=3)]
    assert plan_rollout(loading, 2, NEW, 2, 1).retire == ()
    # A group late past its deadline is kept the same way; the scale-down leaves desired + maxSurge.
    late = [*groups(OLD, 0, 1, 2, 3), GroupState(4, NEW, False, unready_for=900)]
    deadline = plan_rollout(late, 1, NEW, 2, 1, progress_deadline=600)
    assert (deadline.retire, deadline.reason) == ((3, 2), "ProgressDeadlineExceeded")
    assert plan_rollout(late, 1, NEW, 0, 1, progress_deadline=600).retire == (3, 2, 1)


def test_a_new_group_not_ready_past_the_progress_deadline_stalls_the_rollout() -> None:
    """An image that cannot be pulled, a readiness that never passes: nothing restarts the group, so
    only a deadline tells the rollout is stuck. It stops (the old groups keep serving) and says so."""
    late = GroupState(4, NEW, False, unready_for=600)
    state = [*groups(OLD, 0, 1, 2, 3), late]
    step = plan_rollout(state, 4, NEW, 2, 1, progress_deadline=600)
    assert (step.create, step.retire, step.stalled, step.reason) == (0, (), True, "ProgressDeadlineExceeded")
    assert "group 4" in step.message
    assert "progressDeadlineSeconds (600s)" in step.message
    # Within the deadline, or without one, it goes on.
    earlier = [*state[:4], replace(late, unready_for=599)]
    assert not plan_rollout(earlier, 4, NEW, 2, 1, progress_deadline=600).stalled
    assert not plan_rollout(state, 4, NEW, 2, 1).stalled
    # Ready at last: the rollout resumes.
    ready = [*state[:4], replace(late, ready=True, unready_for=0)]
    resumed = plan_rollout(ready, 4, NEW, 2, 1, progress_deadline=600)
    assert not resumed.stalled
    assert resumed.retire


def test_failures_of_an_old_revision_do_not_stall_and_a_new_spec_replaces_the_failing_group() -> None:
    failing = GroupState(4, NEW, False, failed_restarts=9)
    # The spec changes again: the failing group is now old and not ready, so it goes first.
    step = plan_rollout([*groups(OLD, 0, 1, 2, 3), failing], 4, "rev-fixed", 1, 0)
    assert not step.stalled
    assert step.retire == (4,)
    run = simulate([*groups(OLD, 0, 1, 2, 3), failing], 4, 1, 0, revision="rev-fixed")
    assert_complete(run, 4, revision="rev-fixed")


def test_zero_surge_and_zero_unavailable_replace_one_group_at_a_time() -> None:
    step = plan_rollout(groups(OLD, 0, 1, 2, 3), 4, NEW, 0, 0)
    assert (step.create, step.retire) == (0, (3,))
    assert "at least 3 ready" in step.message
    run = simulate(groups(OLD, 0, 1, 2, 3), 4, 0, 0, floor=3)
    assert_complete(run, 4)
    for seen in run.seen:
        assert len(seen) <= 4
        assert sum(group.ready for group in seen) >= 3
    assert min(sum(group.ready for group in seen) for seen in run.seen) == 3


def test_scale_to_zero_retires_everything() -> None:
    state = [
        *groups(OLD, 0, 1),
        GroupState(2, NEW, False, failed_restarts=5),
        GroupState(3, NEW, True),
    ]
    step = plan_rollout(state, 0, NEW, 1, 0)
    assert (step.create, step.stalled, step.reason) == (0, False, "ScalingDown")
    assert step.retire == (1, 0, 2, 3)
    done = plan_rollout([], 0, NEW, 1, 0)
    assert (done.create, done.retire, done.reason) == (0, (), "RolloutComplete")


def test_a_complete_service_is_left_alone_and_one_not_ready_is_waited_for() -> None:
    step = plan_rollout(groups(NEW, 0, 1, 2, 3), 4, NEW, 1, 0)
    assert (step.create, step.retire, step.stalled, step.reason) == (0, (), False, "RolloutComplete")
    state = [*groups(NEW, 0, 1, 3), GroupState(2, NEW, False, failed_restarts=1)]
    step = plan_rollout(state, 4, NEW, 1, 0)
    assert (step.create, step.retire, step.reason) == (0, (), "WaitingForReady")


def test_the_same_groups_in_any_order_give_the_same_step() -> None:
    state = [
        *groups(OLD, 0, 1, 2),
        GroupState(3, OLD, False),
        GroupState(4, NEW, True),
        GroupState(5, NEW, False),
        GroupState(6, NEW, True),
    ]
    first = plan_rollout(state, 4, NEW, 2, 1)
    assert first == plan_rollout(state, 4, NEW, 2, 1)
    assert all(plan_rollout(list(order), 4, NEW, 2, 1) == first for order in itertools.permutations(state))
    assert first.retire == (3, 2, 1)


@pytest.mark.parametrize(
    "args",
    [
        (-1, 1, 0, 3),
        (4, -1, 0, 3),
        (4, 1, -1, 3),
        (4, 1, 0, 0),
    ],
)
def test_nonsense_is_refused(args: tuple[int, int, int, int]) -> None:
    desired, surge, unavailable, stall = args
    with pytest.raises(ValueError, match=">= "):
        plan_rollout([], desired, NEW, surge, unavailable, stall)


def test_a_replica_id_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="more than once"):
        plan_rollout([GroupState(1, OLD, True), GroupState(1, NEW, False)], 4, NEW, 1, 0)


def test_a_group_that_serves_though_not_yet_available_goes_after_those_that_do_not() -> None:
    groups = [
        GroupState(0, "a", ready=True),
        GroupState(1, "a", ready=False),
        GroupState(2, "a", ready=False, serving=True),  # ready, not yet for minReadySeconds
    ]
    assert plan_rollout(groups, 2, "a", 1, 0).retire == (1,)
    assert plan_rollout(groups, 1, "a", 1, 0).retire == (1, 2)


def test_a_scale_down_retires_a_queued_group_before_one_that_is_loading() -> None:
    """Both are not ready; the highest id went first, and could be the one already on its nodes and
    loading, while the one waiting for GPUs stayed queued."""
    groups = [
        GroupState(0, "a", ready=True),
        GroupState(1, "a", ready=False, placed=False),  # waits in the queue
        GroupState(2, "a", ready=False),  # admitted, loading
    ]
    assert plan_rollout(groups, 2, "a", 1, 0).retire == (1,)
