"""The TrainJob lifecycle, decided purely: table-driven cases over job status, pods and nodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from largo.api.v1alpha1 import ConditionType, Phase, Reason
from largo.manifests.names import CONTAINER_NAME
from largo.policy.conditions import condition_status, set_condition, timestamp
from largo.policy.trainjob import (
    JobView,
    PodView,
    Timings,
    counts_only,
    creation_refused,
    plan,
    pod_view,
    summary,
)

NOW = 1_800_000_000.0
NONE: frozenset[str] = frozenset()


def job(phase: Phase | None = None, **overrides: Any) -> JobView:
    status: dict[str, Any] = dict(overrides.pop("status", {}))
    if phase is not None:
        status["phase"] = phase
    return JobView(num_nodes=2, gpus_per_node=8, **overrides, status=status)


def admitted(phase: Phase = Phase.STARTING, attempt: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "phase": phase,
        "attempt": attempt,
        "placement": {"attempt": attempt, "nodes": ["n0", "n1"]},
        "startTime": timestamp(NOW - 10),
        **extra,
    }


def pod(rank: int, phase: str = "Running", attempt: int = 0, **extra: Any) -> PodView:
    return PodView(
        name=f"j-node-{rank}",
        rank=rank,
        attempt=attempt,
        phase=phase,
        node_name=f"n{rank}",
        **extra,
    )


def test_a_new_job_is_left_to_the_gang_scheduler() -> None:
    result = plan(job(), [], NONE, NONE, NOW)
    assert "phase" not in result.status  # admitted (Starting) or queued by the scheduler, in one write
    assert result.wake_scheduler
    assert result.events == []
    assert result.create_ranks == ()
    assert result.status == {}  # nothing written: the scheduler's write would only conflict
    suspended = plan(job(suspend=True), [], NONE, NONE, NOW)
    assert suspended.status["phase"] == Phase.SUSPENDED


def test_queued_job_waits_without_pods() -> None:
    result = plan(job(Phase.QUEUED), [], NONE, NONE, NOW)
    assert result.create_ranks == ()
    assert result.events == []
    assert result.status["phase"] == Phase.QUEUED


def test_admitted_job_creates_every_missing_rank() -> None:
    result = plan(job(status=admitted()), [pod(1, "Pending")], NONE, NONE, NOW)
    assert result.create_ranks == (0,)
    assert result.status["phase"] == Phase.STARTING


def test_all_pods_running_makes_the_job_running() -> None:
    result = plan(job(status=admitted()), [pod(0), pod(1)], NONE, NONE, NOW)
    assert result.status["phase"] == Phase.RUNNING
    assert result.status["nodes"] == "2/2"
    assert condition_status(result.status["conditions"], "Running") == "True"
    assert result.create_ranks == ()


def test_success_needs_every_pod_of_the_attempt() -> None:
    one_done = plan(
        job(status=admitted(Phase.RUNNING)),
        [pod(0, "Succeeded"), pod(1)],
        NONE,
        NONE,
        NOW,
    )
    assert one_done.status["phase"] == Phase.RUNNING
    both = plan(
        job(status=admitted(Phase.RUNNING)),
        [pod(0, "Succeeded"), pod(1, "Succeeded")],
        NONE,
        NONE,
        NOW,
    )
    assert both.status["phase"] == Phase.SUCCEEDED
    assert both.status["completionTime"] == timestamp(NOW)
    assert condition_status(both.status["conditions"], "Complete") == "True"
    assert both.wake_scheduler


def test_retryable_failure_restarts_the_whole_gang_with_backoff() -> None:
    backoff = Timings(base=10, cap=300)
    pods = [pod(0), pod(1, "Failed", exit_code=1)]
    result = plan(job(status=admitted(Phase.RUNNING)), pods, NONE, NONE, NOW, backoff)
    assert result.status["phase"] == Phase.RESTARTING
    assert result.status["restarts"] == 1
    assert result.status["attempt"] == 1
    assert "placement" not in result.status
    assert set(result.delete_pods) == {"j-node-0", "j-node-1"}
    assert result.requeue_after == 10
    assert result.status["nextRestartTime"] == timestamp(NOW + 10)
    assert result.events[0].type == "Warning"
    assert "exit code 1" in result.events[0].message


@pytest.mark.parametrize(
    ("restarts", "delay"), [(1, 10), (2, 20), (3, 40), (6, 300), (9, 300), (1025, 300), (10_000, 300)]
)
def test_backoff_grows_and_is_capped(restarts: int, delay: float) -> None:
    assert Timings(base=10, cap=300).delay(restarts) == delay


def test_backoff_limit_fails_the_job() -> None:
    status = admitted(Phase.RUNNING, restarts=3)
    result = plan(
        job(status=status, backoff_limit=3),
        [pod(0, "Failed", exit_code=1), pod(1)],
        NONE,
        NONE,
        NOW,
    )
    assert result.status["phase"] == Phase.FAILED
    failed = next(c for c in result.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == Reason.BACKOFF_LIMIT_EXCEEDED
    assert "j-node-1" in result.delete_pods


@pytest.mark.parametrize(
    ("permanent", "retryable", "code", "phase"),
    [
        ({42}, set(), 42, Phase.FAILED),
        ({42}, set(), 1, Phase.RESTARTING),
        (set(), {1, 2}, 3, Phase.FAILED),
        (set(), {1, 2}, 2, Phase.RESTARTING),
        (set(), set(), 137, Phase.RESTARTING),
    ],
)
def test_exit_code_policy(permanent: set[int], retryable: set[int], code: int, phase: Phase) -> None:
    view = job(
        status=admitted(Phase.RUNNING),
        permanent_exit_codes=frozenset(permanent),
        retryable_exit_codes=frozenset(retryable),
    )
    result = plan(view, [pod(0, "Failed", exit_code=code), pod(1)], NONE, NONE, NOW)
    assert result.status["phase"] == phase
    if phase == Phase.FAILED:
        failed = next(c for c in result.status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == Reason.PERMANENT_EXIT_CODE


def test_lost_node_restarts_and_force_deletes() -> None:
    result = plan(
        job(status=admitted(Phase.RUNNING)),
        [pod(0), pod(1)],
        frozenset({"n1"}),
        frozenset({"n1"}),
        NOW,
    )
    assert result.status["phase"] == Phase.RESTARTING
    assert result.force_delete
    assert (
        next(c for c in result.status["conditions"] if c["type"] == "Restarting")["reason"]
        == Reason.NODE_LOST
    )


def _evicted(rank: int) -> PodView:
    return pod(rank, "Failed", exit_code=143, disrupted="EvictionByEvictionAPI", taken_at=NOW - 1)


@pytest.mark.parametrize(
    ("disruption", "lost"),
    [(lambda: [pod(0), _evicted(1)], NONE), (lambda: [pod(0), pod(1)], frozenset({"n1"}))],
    ids=["evicted", "node lost"],
)
def test_disruptions_can_be_left_out_of_the_backoff_limit(
    disruption: Callable[[], list[PodView]], lost: frozenset[str]
) -> None:
    """A pod taken away (a drain, a preemption) or a lost node is no failure of the job's: with
    failurePolicy.disruptions Ignore, such restarts do not use up backoffLimit (they are counted in
    status.disruptions, and backed off as any restart); a failure of its own still fails it."""
    running = admitted(Phase.RUNNING, restarts=2, disruptions=2)
    ignoring_view = job(status=running, backoff_limit=0, ignore_disruptions=True)
    ignoring = plan(ignoring_view, disruption(), lost, lost, NOW)
    assert ignoring.status["phase"] == Phase.RESTARTING
    assert (ignoring.status["restarts"], ignoring.status["disruptions"]) == (3, 3)
    assert "not counted against backoffLimit" in ignoring.events[-1].message
    assert ignoring.requeue_after == Timings().delay(3)  # backed off as the third restart
    failed = plan(ignoring_view, [pod(0), pod(1, "Failed", exit_code=1)], NONE, NONE, NOW)
    assert failed.status["phase"] == Phase.FAILED  # its own failure: counted, and the limit is 0
    # Counted (the default, as a Job's): the limit is used up.
    counting = plan(job(status=running, backoff_limit=2), disruption(), lost, lost, NOW)
    assert counting.status["phase"] == Phase.FAILED
    recorded = plan(job(status=admitted(Phase.RUNNING), backoff_limit=2), disruption(), lost, lost, NOW)
    assert (recorded.status["restarts"], recorded.status["disruptions"]) == (1, 1)
    own = plan(job(status=admitted(Phase.RUNNING)), [pod(0), pod(1, "Failed", exit_code=1)], NONE, NONE, NOW)
    assert "disruptions" not in own.status


@pytest.mark.parametrize(
    ("view", "phase"),
    [
        (job(Phase.RESTARTING, status={**admitted(Phase.RESTARTING), "restarts": 1}), Phase.RESTARTING),
        (job(suspend=True, status=admitted(Phase.RUNNING)), Phase.SUSPENDING),
    ],
)
def test_a_pod_left_terminating_on_a_lost_node_is_force_deleted(view: JobView, phase: Phase) -> None:
    """Deleted with its grace period, then its node was lost: no kubelet will confirm it, and the
    restart or the suspension waits for it. It is removed at once, not left until the Node goes."""
    stuck = pod(1, terminating=True)
    result = plan(view, [stuck], frozenset({"n1"}), frozenset({"n1"}), NOW)
    assert result.status["phase"] == phase
    assert result.delete_pods == ("j-node-1",)
    assert result.force_delete
    # On a node that is there, its kubelet ends it: it is waited for.
    waited = plan(view, [stuck], NONE, NONE, NOW)
    assert waited.delete_pods == ()
    assert not waited.force_delete


def test_a_pod_that_cannot_start_is_told_on_the_job() -> None:
    """A wrong image (or a missing Secret) leaves a bound pod waiting for good: Running=False says
    which pod and why, with one Warning event, instead of a silent Starting."""
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x:1"'}
    raw = {
        "metadata": {"name": "j-node-1", "labels": {"largo.dev/node-rank": "1", "largo.dev/attempt": "0"}},
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"waiting": waiting},
                }
            ],
        },
    }
    stuck = pod_view(raw)
    assert stuck is not None
    assert stuck.cannot_start == 'ImagePullBackOff: Back-off pulling image "x:1"'
    result = plan(job(status=admitted()), [pod(0), stuck], NONE, NONE, NOW)
    assert result.status["phase"] == Phase.STARTING
    running = next(c for c in result.status["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "PodsNotStarting")
    assert running["message"] == 'pod j-node-1 cannot start: ImagePullBackOff: Back-off pulling image "x:1"'
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "PodsNotStarting")]
    again = plan(job(status=result.status), [pod(0), stuck], NONE, NONE, NOW + 10)
    assert again.events == []  # told once
    # Pulled at last: it runs, and so does the job.
    started = plan(job(status=again.status), [pod(0), pod(1)], NONE, NONE, NOW + 20)
    assert started.status["phase"] == Phase.RUNNING


def test_a_gang_still_starting_past_its_start_timeout_restarts_then_fails() -> None:
    """failurePolicy.startTimeoutSeconds: a pod whose image cannot be pulled holds its gang's GPUs
    for good unless the wait is bounded; past it the gang restarts, counted against backoffLimit."""
    placement = {"attempt": 0, "nodes": ["n0", "n1"], "admittedAt": timestamp(NOW)}
    status = {**admitted(), "placement": placement}
    stuck = PodView("j-node-1", 1, 0, "Pending", "n1", cannot_start="ImagePullBackOff: Back-off")
    view = job(status=status, start_timeout_seconds=600, backoff_limit=1)
    waiting = plan(view, [pod(0), stuck], NONE, NONE, NOW + 100)
    assert waiting.status["phase"] == Phase.STARTING
    assert waiting.requeue_after == pytest.approx(500)  # looked at again when the timeout is up
    timed_out = plan(view, [pod(0), stuck], NONE, NONE, NOW + 600)
    assert timed_out.status["phase"] == Phase.RESTARTING
    assert timed_out.status["restarts"] == 1
    assert set(timed_out.delete_pods) == {"j-node-0", "j-node-1"}
    restarting = next(c for c in timed_out.status["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == "StartTimeout"
    assert restarting["message"] == (
        "1/2 pods running 600s after admission (startTimeoutSeconds); "
        "pod j-node-1 cannot start: ImagePullBackOff: Back-off"
    )
    # backoffLimit 1 spent: the next timeout fails the job, its GPUs given back.
    again = job(status={**status, "restarts": 1}, start_timeout_seconds=600, backoff_limit=1)
    failed = plan(again, [pod(0), stuck], NONE, NONE, NOW + 600)
    assert failed.status["phase"] == Phase.FAILED
    # Every pod running at the timeout: the job runs, nothing restarts; unset, it waits.
    assert plan(view, [pod(0), pod(1)], NONE, NONE, NOW + 900).status["phase"] == Phase.RUNNING
    unset = plan(job(status=status), [pod(0), stuck], NONE, NONE, NOW + 10**6)
    assert unset.status["phase"] == Phase.STARTING


def test_the_start_timeout_counts_from_when_the_pods_could_be_created() -> None:
    """Resumed (or released) while the previous attempt's pods still terminate, with a grace period
    longer than the start timeout (a last checkpoint): the wait for them is no start that failed."""
    placement = {"attempt": 1, "nodes": ["n0", "n1"], "admittedAt": timestamp(NOW)}
    status = {**admitted(attempt=1), "placement": placement}
    view = job(status=status, start_timeout_seconds=60, backoff_limit=0)
    earlier = [pod(0, attempt=0, terminating=True), pod(1, attempt=0, terminating=True)]
    waiting = plan(view, earlier, NONE, NONE, NOW + 300)
    assert waiting.status["phase"] == Phase.STARTING
    assert waiting.create_ranks == ()
    # Gone at last: the pods are created, and the timeout counts from now.
    created = plan(view, [], NONE, NONE, NOW + 400)
    assert created.create_ranks == (0, 1)
    assert created.status["placement"]["creatingSince"] == timestamp(NOW + 400)
    later = job(status=created.status, start_timeout_seconds=60, backoff_limit=0)
    pending = [pod(0, "Pending", attempt=1), pod(1, "Pending", attempt=1)]
    assert plan(later, pending, NONE, NONE, NOW + 450).status["phase"] == Phase.STARTING
    assert plan(later, pending, NONE, NONE, NOW + 460).status["phase"] == Phase.FAILED


def test_vanished_pod_of_a_running_job_is_a_failure() -> None:
    result = plan(job(status=admitted(Phase.RUNNING)), [pod(0)], NONE, NONE, NOW)
    assert result.status["phase"] == Phase.RESTARTING
    assert "rank 1" in result.events[0].message


def test_a_finished_rank_whose_pod_is_then_gone_is_done_not_lost() -> None:
    """Kubernetes deletes a finished pod at once (a drain's eviction, the pod garbage collector after
    its node went): a rank seen ended 0 is recorded, and its pod's absence is no failure after that."""
    view = job(status=admitted(Phase.RUNNING, restarts=3), backoff_limit=3)
    seen = plan(view, [pod(0), pod(1, "Succeeded", finished_at=NOW - 5)], NONE, NONE, NOW)
    assert seen.status["phase"] == Phase.RUNNING
    assert seen.status["placement"]["succeededRanks"] == [1]
    gone = plan(job(status=seen.status, backoff_limit=3), [pod(0)], NONE, NONE, NOW + 5)
    assert gone.status["phase"] == Phase.RUNNING
    assert gone.delete_pods == ()
    last = [pod(0, "Succeeded", finished_at=NOW + 8)]
    ended = plan(job(status=gone.status, backoff_limit=3), last, NONE, NONE, NOW + 9)
    assert ended.status["phase"] == Phase.SUCCEEDED
    # Not recorded (it was never seen finished), a rank's absence is still a failure.
    assert plan(view, [pod(0)], NONE, NONE, NOW).status["phase"] == Phase.FAILED
    # The record is the attempt's: a restarted gang's placement starts without it.
    recorded = {**seen.status, "restarts": 0}
    restarted = plan(job(status=recorded), [pod(0, "Failed", exit_code=1)], NONE, NONE, NOW + 5)
    assert restarted.status["phase"] == Phase.RESTARTING
    assert "placement" not in restarted.status or "succeededRanks" not in restarted.status["placement"]


def test_a_rank_that_finished_while_the_gang_starts_is_not_created_again() -> None:
    placement = {"attempt": 0, "nodes": ["n0", "n1"], "admittedAt": timestamp(NOW - 10)}
    view = job(status={**admitted(Phase.STARTING), "placement": placement}, start_timeout_seconds=60)
    seen = plan(view, [pod(0, "Pending"), pod(1, "Succeeded", finished_at=NOW - 1)], NONE, NONE, NOW)
    assert seen.status["placement"]["succeededRanks"] == [1]
    # Past the start timeout too: the finished rank counts as started.
    gone = plan(job(status=seen.status, start_timeout_seconds=60), [pod(0)], NONE, NONE, NOW + 100)
    assert gone.create_ranks == ()
    assert gone.status["phase"] == Phase.RUNNING


def test_a_recorded_rank_taken_away_after_it_finished_is_still_done() -> None:
    """A drain evicts a finished pod in the very second it ended: its times cannot tell, but the
    record says it was seen finished before."""
    view = job(status=admitted(Phase.RUNNING))
    seen = plan(view, [pod(0), pod(1, "Succeeded", finished_at=NOW - 5)], NONE, NONE, NOW)
    evicted = pod(1, "Succeeded", finished_at=NOW - 5, disrupted="EvictionByEvictionAPI", taken_at=NOW - 5)
    assert evicted.taken_away
    later = plan(job(status=seen.status), [pod(0), evicted], NONE, NONE, NOW + 1)
    assert later.status["phase"] == Phase.RUNNING
    # Unrecorded, the same pod is a rank stopped before it finished: a restart.
    assert plan(view, [pod(0), evicted], NONE, NONE, NOW + 1).status["phase"] == Phase.RESTARTING


def test_a_placement_without_a_node_for_every_rank_is_queued_again() -> None:
    """A hand-written placement of one node for a 2-node job: no rank is created on a node it lacks
    (the controller indexed past its end on every retry), the job queues for a real admission."""
    short = {**admitted(Phase.STARTING), "placement": {"attempt": 0, "nodes": ["n0"]}}
    result = plan(job(status=short), [], NONE, NONE, NOW)
    assert result.create_ranks == ()
    assert result.status["phase"] == Phase.QUEUED
    assert result.wake_scheduler is True


def test_the_first_pod_to_fail_decides_not_the_lowest_rank() -> None:
    """Rank 1 exits with a permanent code; rank 0, its peer gone, fails 20 s later with 1. Both are seen
    failed at once (after an operator restart, say): the first failure decides."""
    view = job(status=admitted(Phase.RUNNING), permanent_exit_codes=frozenset({2}))
    pods = [
        pod(0, "Failed", exit_code=1, finished_at=NOW - 10),
        pod(1, "Failed", exit_code=2, finished_at=NOW - 30),
    ]
    result = plan(view, pods, NONE, NONE, NOW)
    assert result.status["phase"] == Phase.FAILED
    assert "rank 1" in result.status["message"]
    # A running rank on a lost node does not hide it either.
    lost = plan(view, [pod(0), pods[1]], frozenset({"n0"}), frozenset({"n0"}), NOW)
    assert lost.status["phase"] == Phase.FAILED


def test_unbound_pod_on_unusable_node_releases_the_gang_without_a_restart() -> None:
    pods = [pod(0), PodView("j-node-1", 1, 0, "Pending", None)]
    result = plan(job(status=admitted()), pods, frozenset({"n1"}), NONE, NOW)
    assert result.status["phase"] == Phase.QUEUED
    assert result.status["restarts"] == 0
    assert result.status["attempt"] == 1
    assert result.wake_scheduler


def test_binding_timeout() -> None:
    waiting = PodView(
        "j-node-1",
        1,
        0,
        "Pending",
        None,
        unschedulable_since=NOW - 5,
        unschedulable_message="taint",
    )
    early = plan(
        job(status=admitted()),
        [pod(0), waiting],
        NONE,
        NONE,
        NOW,
        Timings(binding_timeout=30),
    )
    assert early.status["phase"] == Phase.STARTING
    assert early.requeue_after == pytest.approx(25)
    late = plan(
        job(status=admitted()),
        [pod(0), waiting],
        NONE,
        NONE,
        NOW + 30,
        Timings(binding_timeout=30),
    )
    assert late.status["phase"] == Phase.QUEUED


def test_a_start_timeout_shorter_than_the_binding_timeout_releases_an_unbound_gang_uncounted() -> None:
    """A pod that could not be bound is the placement's failure: at a start timeout of 10 s (under the
    binding timeout's 30) it was a StartTimeout restart, counted against backoffLimit, and with
    backoffLimit 0 failed a job that never got a node."""
    placement = {"attempt": 0, "nodes": ["n0", "n1"], "admittedAt": timestamp(NOW)}
    unbound = PodView(
        "j-node-1", 1, 0, "Pending", None, unschedulable_since=NOW + 2, unschedulable_message="taint"
    )
    view = job(status={**admitted(), "placement": placement}, start_timeout_seconds=10, backoff_limit=0)
    released = plan(view, [pod(0), unbound], NONE, NONE, NOW + 10, Timings(binding_timeout=30))
    assert released.status["phase"] == Phase.QUEUED
    assert released.status.get("restarts", 0) == 0
    assert "could not be bound within 10s (startTimeoutSeconds): taint" in released.events[0].message
    # A bound pod that cannot start is still the job's own failure.
    stuck = PodView("j-node-1", 1, 0, "Pending", "n1", cannot_start="ImagePullBackOff: Back-off")
    failed = plan(view, [pod(0), stuck], NONE, NONE, NOW + 10, Timings(binding_timeout=30))
    assert failed.status["phase"] == Phase.FAILED


def test_restarting_waits_for_old_pods_then_backoff_then_requeues() -> None:
    status = {
        "phase": Phase.RESTARTING,
        "attempt": 1,
        "restarts": 1,
        "nextRestartTime": timestamp(NOW + 5),
    }
    with_pods = plan(job(status=status), [pod(0, attempt=0)], NONE, NONE, NOW)
    assert with_pods.status["phase"] == Phase.RESTARTING
    assert with_pods.delete_pods == ("j-node-0",)
    waiting = plan(job(status=status), [], NONE, NONE, NOW)
    assert waiting.status["phase"] == Phase.RESTARTING
    assert waiting.requeue_after == pytest.approx(5)
    due = plan(job(status=status), [], NONE, NONE, NOW + 5)
    assert due.status["phase"] == Phase.QUEUED
    assert due.wake_scheduler


def test_deadline() -> None:
    status = admitted(Phase.RUNNING)
    before = plan(
        job(status=status, active_deadline_seconds=60),
        [pod(0), pod(1)],
        NONE,
        NONE,
        NOW,
    )
    assert before.status["phase"] == Phase.RUNNING
    assert before.requeue_after == pytest.approx(50)
    after = plan(job(status=status, active_deadline_seconds=5), [pod(0), pod(1)], NONE, NONE, NOW)
    assert after.status["phase"] == Phase.FAILED
    assert (
        next(c for c in after.status["conditions"] if c["type"] == "Failed")["reason"]
        == Reason.DEADLINE_EXCEEDED
    )
    assert set(after.delete_pods) == {"j-node-0", "j-node-1"}


def test_ttl_after_finished() -> None:
    status = {"phase": Phase.SUCCEEDED, "completionTime": timestamp(NOW - 10)}
    waiting = plan(job(status=status, ttl_seconds_after_finished=60), [], NONE, NONE, NOW)
    assert not waiting.delete_job
    assert waiting.requeue_after == pytest.approx(50)
    due = plan(job(status=status, ttl_seconds_after_finished=5), [], NONE, NONE, NOW)
    assert due.delete_job
    kept = plan(job(status=status), [], NONE, NONE, NOW)
    assert not kept.delete_job
    assert kept.requeue_after is None


def test_suspend_and_resume() -> None:
    suspending = plan(
        job(status={**admitted(Phase.RUNNING), "checkpointDirectory": "ckpt"}, suspend=True),
        [pod(0), pod(1)],
        NONE,
        NONE,
        NOW,
    )
    # The pods still hold their GPUs until they are gone: the status does not say otherwise.
    assert suspending.status["phase"] == Phase.SUSPENDING
    assert "waiting for 2 pod(s) to terminate" in suspending.status["message"]
    assert set(suspending.delete_pods) == {"j-node-0", "j-node-1"}
    assert "placement" not in suspending.status
    assert "startTime" not in suspending.status
    assert suspending.status["attempt"] == 1
    assert suspending.wake_scheduler
    assert suspending.events == []
    terminating = [pod(0, terminating=True), pod(1, terminating=True)]
    still = plan(job(status=suspending.status, suspend=True), terminating, NONE, NONE, NOW + 20)
    assert still.status["phase"] == Phase.SUSPENDING
    assert still.status["attempt"] == 1  # the transition happens once
    assert still.delete_pods == ()
    suspended = plan(job(status=still.status, suspend=True), [], NONE, NONE, NOW + 27)
    assert suspended.status["phase"] == Phase.SUSPENDED
    assert suspended.status["message"] == "spec.suspend is true: pods deleted, GPUs released"
    assert [e.reason for e in suspended.events] == ["Suspended"]
    # The directory it wrote is kept while its pods stop, and held again from its next admission.
    assert suspended.status["checkpointDirectory"] == "ckpt"
    resumed = plan(job(status=suspended.status), [], NONE, NONE, NOW)
    assert resumed.status["phase"] == Phase.QUEUED
    assert "checkpointDirectory" not in resumed.status
    assert condition_status(resumed.status["conditions"], "Suspended") == "False"
    queued_then_suspended = plan(job(Phase.QUEUED, suspend=True), [], NONE, NONE, NOW)
    assert queued_then_suspended.status["phase"] == Phase.SUSPENDED
    resumed_early = plan(job(status=suspending.status), terminating, NONE, NONE, NOW)
    assert resumed_early.status["phase"] == Phase.QUEUED


def test_a_new_attempt_is_created_whole_once_the_earlier_one_is_gone() -> None:
    result = plan(
        job(status=admitted(attempt=2)),
        [pod(0, attempt=1), pod(1, attempt=1, terminating=True)],
        NONE,
        NONE,
        NOW,
    )
    assert result.delete_pods == ("j-node-0",)
    assert result.create_ranks == ()  # not rank 0 of attempt 2 beside rank 1 of attempt 1
    assert result.status["reason"] == "PreviousAttemptTerminating"
    assert "2 pod(s) of an earlier attempt" in result.status["message"]
    assert result.status["phase"] == Phase.STARTING
    # The wait is not a refusal: however long it lasts, the gang keeps its placement.
    later = plan(job(status=result.status), [pod(1, attempt=1, terminating=True)], NONE, NONE, NOW + 600)
    assert later.status["phase"] == Phase.STARTING
    assert later.create_ranks == ()
    gone = plan(job(status=later.status), [], NONE, NONE, NOW + 601)
    assert gone.create_ranks == (0, 1)
    created = plan(
        job(status=gone.status),
        [pod(0, "Pending", attempt=2), pod(1, "Pending", attempt=2)],
        NONE,
        NONE,
        NOW + 602,
    )
    assert condition_status(created.status["conditions"], "PodsCreated") == "True"


def test_failed_job_stops_what_still_runs() -> None:
    result = plan(job(Phase.FAILED), [pod(0), pod(1, "Failed")], NONE, NONE, NOW)
    assert result.delete_pods == ("j-node-0",)


def test_condition_transition_time_is_kept_when_status_does_not_change() -> None:
    first = plan(job(status=admitted()), [pod(0), pod(1)], NONE, NONE, NOW)
    second = plan(job(status=first.status), [pod(0), pod(1)], NONE, NONE, NOW + 100)
    running = next(c for c in second.status["conditions"] if c["type"] == "Running")
    assert running["lastTransitionTime"] == timestamp(NOW)
    assert second.events == []


def test_pod_view_reads_labels_exit_codes_and_scheduling() -> None:
    raw = {
        "metadata": {
            "name": "j-node-1",
            "labels": {"largo.dev/node-rank": "1", "largo.dev/attempt": "3"},
            "deletionTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"nodeName": None},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": "sidecar", "state": {"terminated": {"exitCode": 0}}},
                {"name": "trainer", "state": {"terminated": {"exitCode": 3}}},
            ],
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "lastTransitionTime": timestamp(NOW),
                    "message": "0/2 nodes",
                }
            ],
        },
    }
    view = pod_view(raw)
    assert view is not None
    assert (view.rank, view.attempt, view.exit_code, view.terminating) == (
        1,
        3,
        3,
        True,
    )
    assert view.unschedulable_since == NOW
    assert view.unschedulable_message == "0/2 nodes"
    assert pod_view({"metadata": {"name": "x", "labels": {}}}) is None


def test_progress_is_marked_stale_when_reports_stop() -> None:
    progress = {
        "step": 40,
        "totalSteps": 100,
        "percent": 40,
        "summary": "40% 40/100 loss 1.2",
        "updatedAt": timestamp(NOW - 30),
        "stale": False,
    }
    fresh = plan(job(status=admitted(Phase.RUNNING, progress=progress)), [pod(0), pod(1)], NONE, NONE, NOW)
    assert fresh.status["progress"] == progress  # left alone while reports are recent
    assert fresh.requeue_after == pytest.approx(90)
    late = plan(
        job(status=admitted(Phase.RUNNING, progress=progress)), [pod(0), pod(1)], NONE, NONE, NOW + 100
    )
    assert late.status["progress"]["stale"] is True
    assert late.status["progress"]["step"] == 40
    assert late.status["progress"]["summary"].startswith("stale: no report for 130s (last: 40%")
    done = plan(job(status={"phase": Phase.SUCCEEDED, "progress": progress}), [], NONE, NONE, NOW + 1000)
    assert done.status["progress"] == progress  # a finished job's last report is not stale


def test_count_only_changes_are_recognised() -> None:
    starting = plan(job(status=admitted()), [pod(0, "Pending"), pod(1, "Pending")], NONE, NONE, NOW)
    one_up = plan(job(status=starting.status), [pod(0), pod(1, "Pending")], NONE, NONE, NOW)
    assert one_up.status["nodes"] == "1/2"
    assert counts_only(one_up, starting.status)
    both_up = plan(job(status=starting.status), [pod(0), pod(1)], NONE, NONE, NOW)
    assert not counts_only(both_up, starting.status)  # the phase changes too: written at once
    assert not counts_only(starting, starting.status)  # nothing changes at all


def test_refused_creates_are_recorded_and_release_the_gang_after_the_binding_timeout() -> None:

    timings = Timings(binding_timeout=30)
    starting = plan(job(status=admitted()), [], NONE, NONE, NOW, timings).status
    message = 'pods "j-node-0" is forbidden: exceeded quota: no-pods'
    patch, news = creation_refused(starting, "CreateRefused", message, NOW, 1)
    assert news
    refused = {**starting, **patch}
    assert refused["reason"] == "CreateRefused"
    assert refused["message"] == message
    assert condition_status(refused["conditions"], "PodsCreated") == "False"
    _, again = creation_refused(refused, "CreateRefused", message, NOW + 5, 1)
    assert not again  # the same refusal is announced once

    waiting = plan(job(status=refused), [], NONE, NONE, NOW + 10, timings)
    assert waiting.status["phase"] == Phase.STARTING  # still trying, GPUs still held
    assert waiting.create_ranks == (0, 1)
    assert waiting.requeue_after == pytest.approx(20)
    assert waiting.status["reason"] == "CreateRefused"

    released = plan(job(status=refused), [], NONE, NONE, NOW + 30, timings)
    assert released.status["phase"] == Phase.QUEUED
    assert released.status["attempt"] == 1
    assert "placement" not in released.status
    assert released.status["restarts"] == 0  # not the job's fault
    assert condition_status(released.status["conditions"], "PodsCreated") is None  # fresh next attempt
    assert [e.reason for e in released.events] == ["CreateRefused"]
    assert "exceeded quota" in released.events[0].message
    assert released.wake_scheduler


def test_releases_in_a_row_wait_longer_before_the_next_admission_and_running_resets_them() -> None:
    """A refusal that lasts (a quota) must not take the GPUs back at every pass ahead of the queue."""
    timings = Timings(base=10, cap=300, binding_timeout=30)
    starting = plan(job(status=admitted()), [], NONE, NONE, NOW, timings).status
    patch, _ = creation_refused(starting, "CreateRefused", "exceeded quota", NOW, 1)
    first = plan(job(status={**starting, **patch}), [], NONE, NONE, NOW + 30, timings)
    assert first.status["releases"] == 1
    assert first.status["nextAdmissionTime"] == timestamp(NOW + 40)
    assert first.requeue_after == pytest.approx(10)
    assert "admitted again no sooner than in 10s" in first.events[0].message

    # Queued in its backoff: nothing for the scheduler until the time, then it is woken.
    early = plan(job(status=first.status), [], NONE, NONE, NOW + 35, timings)
    assert early.requeue_after == pytest.approx(5)
    assert not early.wake_scheduler
    due = plan(job(status=first.status), [], NONE, NONE, NOW + 40, timings)
    assert due.wake_scheduler
    assert "nextAdmissionTime" not in due.status  # over: nothing left to wake the scheduler for

    # The spec edited in the backoff (the fix for what was refused, perhaps): admissible at once.
    waiting = {**first.status, "observedGeneration": 1}
    edited = plan(job(status=waiting, generation=2), [], NONE, NONE, NOW + 35, timings)
    assert edited.wake_scheduler
    assert "nextAdmissionTime" not in edited.status
    unedited = plan(job(status=waiting, generation=1), [], NONE, NONE, NOW + 35, timings)
    assert unedited.status["nextAdmissionTime"] == timestamp(NOW + 40)

    # Past its deadline in the backoff: it fails, and shows no admission to come.
    started = {**first.status, "startTime": timestamp(NOW - 100)}
    failed = plan(job(status=started, active_deadline_seconds=60), [], NONE, NONE, NOW + 35, timings)
    assert failed.status["phase"] == Phase.FAILED
    assert "nextAdmissionTime" not in failed.status

    # Admitted again (the scheduler clears the time) and refused again: twice the wait.
    again = {**first.status, **admitted(attempt=1)}
    again.pop("nextAdmissionTime")
    patch, _ = creation_refused(again, "CreateRefused", "exceeded quota", NOW + 41, 1)
    second = plan(job(status={**again, **patch}), [], NONE, NONE, NOW + 71, timings)
    assert second.status["releases"] == 2
    assert second.status["nextAdmissionTime"] == timestamp(NOW + 91)

    # Its pods all ran: the count starts over.
    ran = [pod(0, attempt=2), pod(1, attempt=2)]
    running = plan(job(status=admitted(attempt=2, releases=2)), ran, NONE, NONE, NOW)
    assert running.status["phase"] == Phase.RUNNING
    assert "releases" not in running.status


def test_a_spec_change_requeues_at_once_and_a_resume_ends_a_backoff() -> None:
    status = _hashed(admitted(releases=3), "old")
    changed = plan(job(status=status, spec_hash="new"), [pod(0, "Pending")], NONE, NONE, NOW)
    assert [e.reason for e in changed.events] == ["SpecChanged"]
    assert changed.status["phase"] == Phase.QUEUED
    assert "nextAdmissionTime" not in changed.status  # the user's edit: no backoff
    waiting = {"phase": Phase.SUSPENDED, "releases": 3, "nextAdmissionTime": timestamp(NOW + 300)}
    resumed = plan(job(status=waiting), [], NONE, NONE, NOW)
    assert resumed.status["phase"] == Phase.QUEUED
    assert "nextAdmissionTime" not in resumed.status
    assert "releases" not in resumed.status


def test_an_earlier_attempt_s_refusal_does_not_release_the_next_admission() -> None:
    """Refused (quota), then suspended and resumed once the quota was raised: the new admission's
    creates get their own binding timeout, not the old refusal's age."""
    old = plan(job(status=admitted()), [], NONE, NONE, NOW - 100).status
    patch, _ = creation_refused(old, "CreateRefused", "exceeded quota", NOW - 100, 1)
    placement = {"attempt": 1, "nodes": ["n0", "n1"], "admittedAt": timestamp(NOW)}
    readmitted = {**old, **patch, "attempt": 1, "placement": placement}
    result = plan(job(status=readmitted), [], NONE, NONE, NOW + 1, Timings(binding_timeout=30))
    assert result.status["phase"] == Phase.STARTING
    assert result.create_ranks == (0, 1)
    assert result.events == []


def test_refusals_of_a_resumed_attempt_release_its_gang() -> None:
    """Refused, suspended within the binding timeout, resumed and refused again: the new attempt's
    refusals have their own clock, which runs out (the old refusal's condition left behind made
    every later refusal look like an earlier attempt's, and the gang held its GPUs for good)."""
    timings = Timings(binding_timeout=30)
    first = admitted(placement={"attempt": 0, "nodes": ["n0", "n1"], "admittedAt": timestamp(NOW - 20)})
    starting = plan(job(status=first), [], NONE, NONE, NOW - 20, timings).status
    patch, _ = creation_refused(starting, "CreateRefused", "exceeded quota", NOW - 19, 1)
    refused = {**starting, **patch}
    suspended = plan(job(status=refused, suspend=True), [], NONE, NONE, NOW - 10, timings).status
    assert condition_status(suspended["conditions"], "PodsCreated") is None
    resumed = plan(job(status=suspended), [], NONE, NONE, NOW, timings).status
    assert resumed["phase"] == Phase.QUEUED
    assert resumed["reason"] != "CreateRefused"  # nothing of the new attempt was refused yet
    placement = {"attempt": resumed["attempt"], "nodes": ["n0", "n1"], "admittedAt": timestamp(NOW + 1)}
    again = {**resumed, "phase": Phase.STARTING, "placement": placement}
    readmitted = plan(job(status=again), [], NONE, NONE, NOW + 1)
    patch, _ = creation_refused(readmitted.status, "CreateRefused", "exceeded quota", NOW + 2, 1)
    later = plan(job(status={**readmitted.status, **patch}), [], NONE, NONE, NOW + 40, timings)
    assert later.status["phase"] == Phase.QUEUED
    assert [e.reason for e in later.events] == ["CreateRefused"]


def test_a_refusal_left_from_an_earlier_attempt_starts_no_clock() -> None:
    """A refusal condition older than the attempt's admission (written by an older operator, which
    kept it across a restart) is restarted by the attempt's own first refusal."""
    old = plan(job(status=admitted()), [], NONE, NONE, NOW - 100).status
    stale, _ = creation_refused(old, "CreateRefused", "exceeded quota", NOW - 100, 1)
    placement = {"attempt": 1, "nodes": ["n0", "n1"], "admittedAt": timestamp(NOW)}
    readmitted = {**old, **stale, "attempt": 1, "placement": placement}
    patch, news = creation_refused(readmitted, "CreateRefused", "exceeded quota", NOW + 1, 1)
    (refused,) = [c for c in patch["conditions"] if c["type"] == "PodsCreated"]
    assert refused["lastTransitionTime"] == timestamp(NOW + 1)
    assert not news  # the same message: no second event
    refused = job(status={**readmitted, **patch})
    still = plan(refused, [], NONE, NONE, NOW + 20, Timings(binding_timeout=30))
    assert still.status["phase"] == Phase.STARTING
    released = plan(refused, [], NONE, NONE, NOW + 32, Timings(binding_timeout=30))
    assert released.status["phase"] == Phase.QUEUED


def test_a_restart_forgets_the_refusals_of_the_attempt_it_ends() -> None:
    starting = plan(job(status=admitted()), [pod(0, "Pending")], NONE, NONE, NOW).status
    patch, _ = creation_refused(starting, "CreateRefused", "exceeded quota", NOW, 1)
    restarted = plan(
        job(status={**starting, **patch}),
        [pod(0, "Failed", exit_code=1, finished_at=NOW + 1)],
        NONE,
        NONE,
        NOW + 2,
    ).status
    assert restarted["phase"] == Phase.RESTARTING
    assert condition_status(restarted["conditions"], "PodsCreated") is None
    assert restarted["reason"] == "PodFailed"


def _restarted() -> dict[str, Any]:
    """A job whose running gang lost a rank: Restarting=True."""
    running = admitted(Phase.RUNNING)
    failed = [pod(0), pod(1, "Failed", exit_code=1, finished_at=NOW)]
    status = plan(job(status=running, backoff_limit=1), failed, NONE, NONE, NOW).status
    assert condition_status(status["conditions"], "Restarting") == "True"
    return status


def test_a_job_that_ends_after_a_restart_is_not_restarting() -> None:
    restarted = _restarted()
    placement = {"attempt": 1, "nodes": ["n0", "n1"], "admittedAt": timestamp(NOW + 100)}
    again = {**restarted, "phase": Phase.STARTING, "placement": placement}
    failing = [pod(0, "Pending", attempt=1), pod(1, "Failed", attempt=1, exit_code=1, finished_at=NOW + 110)]
    failed = plan(job(status=again, backoff_limit=1), failing, NONE, NONE, NOW + 111).status
    assert failed["phase"] == Phase.FAILED
    assert condition_status(failed["conditions"], "Restarting") == "False"
    done = [pod(0, "Succeeded", attempt=1), pod(1, "Succeeded", attempt=1)]
    succeeded = plan(job(status=again, backoff_limit=1), done, NONE, NONE, NOW + 111).status
    assert succeeded["phase"] == Phase.SUCCEEDED
    assert condition_status(succeeded["conditions"], "Restarting") == "False"
    over = plan(job(status=restarted, active_deadline_seconds=5), [], NONE, NONE, NOW + 60).status
    assert over["phase"] == Phase.FAILED
    assert condition_status(over["conditions"], "Restarting") == "False"


def test_a_finished_job_stops_an_earlier_attempt_s_pod_whose_deletion_was_lost() -> None:
    """Restarting, the old gang's deletion was lost with the write after the status (a crash, a lost
    leadership); the deadline then failed the job, and no later cycle asked again: the pod held its
    GPUs until the job was deleted."""
    gang = [pod(0), pod(1, "Failed", exit_code=1)]
    restarting = plan(job(status=admitted(Phase.RUNNING)), gang, NONE, NONE, NOW)
    assert (restarting.status["phase"], restarting.status["attempt"]) == (Phase.RESTARTING, 1)
    left = [pod(0, attempt=0)]  # its deletion never reached the API server
    failed = plan(job(status=restarting.status, active_deadline_seconds=60), left, NONE, NONE, NOW + 100)
    assert failed.status["phase"] == Phase.FAILED
    later = plan(job(status=failed.status, active_deadline_seconds=60), left, NONE, NONE, NOW + 200)
    assert later.delete_pods == ("j-node-0",)


def test_an_edit_waiting_for_the_next_attempt_waits_no_more_once_the_gang_is_gone() -> None:
    """PodsUpToDate=False (SpecChanged) outlived a suspend and resume: the queued job showed it as its
    reason, hiding why the scheduler left it waiting."""
    running = admitted(Phase.RUNNING)
    running["placement"]["specHash"] = "old"
    gang = [pod(0), pod(1)]
    edited = plan(job(status=running, spec_hash="new"), gang, NONE, NONE, NOW).status
    assert edited["reason"] == Reason.SPEC_CHANGED
    suspending = plan(job(status=edited, spec_hash="new", suspend=True), gang, NONE, NONE, NOW + 1).status
    assert condition_status(suspending["conditions"], ConditionType.PODS_UP_TO_DATE) == "True"
    suspended = plan(job(status=suspending, spec_hash="new", suspend=True), [], NONE, NONE, NOW + 30).status
    resumed = plan(job(status=suspended, spec_hash="new"), [], NONE, NONE, NOW + 40).status
    assert (resumed["phase"], resumed["reason"]) == (Phase.QUEUED, Reason.QUEUED)


def test_an_edit_with_a_rank_that_ran_the_old_spec_releases_the_gang() -> None:
    """Rank 0 finished (its pod gone), rank 1's vanished, then the spec was edited: with no pod of the
    attempt left, rank 1 was built from the new spec beside the rank that ran the old one."""
    starting = admitted(Phase.STARTING)
    starting["placement"].update(specHash="old", creatingSince="2027-01-15T08:00:00Z", succeededRanks=[0])
    edited = plan(job(status=starting, spec_hash="new"), [], NONE, NONE, NOW)
    assert edited.create_ranks == ()
    assert edited.status["phase"] == Phase.QUEUED  # released, as an edit while pods are being created


def test_a_job_never_admitted_keeps_its_first_attempt_across_a_suspend() -> None:
    """Created suspended (as a batch system creates it), or suspended while queued: no gang was held, so
    no new attempt, and its admission is still its first (the queue wait is observed at attempt 0)."""
    created = plan(job(suspend=True), [], NONE, NONE, NOW)
    assert created.status["phase"] == Phase.SUSPENDED
    assert created.status.get("attempt", 0) == 0
    resumed = plan(job(status=created.status), [], NONE, NONE, NOW + 60)
    assert resumed.status["phase"] == Phase.QUEUED
    assert resumed.status.get("attempt", 0) == 0
    queued = plan(job(status=resumed.status, suspend=True), [], NONE, NONE, NOW + 70)
    assert queued.status.get("attempt", 0) == 0


def test_a_job_suspended_before_its_restarted_gang_ran_is_not_restarting() -> None:
    restarted = _restarted()
    queued = plan(job(status=restarted), [], NONE, NONE, NOW + 100).status
    assert queued["phase"] == Phase.QUEUED
    suspended = plan(job(status=queued, suspend=True), [], NONE, NONE, NOW + 101).status
    assert suspended["phase"] == Phase.SUSPENDED
    assert condition_status(suspended["conditions"], "Restarting") == "False"


def test_a_name_conflict_is_its_own_reason() -> None:

    starting = plan(job(status=admitted()), [], NONE, NONE, NOW).status
    patch, _ = creation_refused(starting, "NameConflict", "Service j already exists", NOW, 1)
    released = plan(job(status={**starting, **patch}), [], NONE, NONE, NOW + 60, Timings(binding_timeout=30))
    assert [e.reason for e in released.events] == ["NameConflict"]


def test_created_pods_clear_the_refusal() -> None:

    starting = plan(job(status=admitted()), [], NONE, NONE, NOW).status
    patch, _ = creation_refused(starting, "CreateRefused", "quota", NOW, 1)
    created = plan(
        job(status={**starting, **patch}), [pod(0, "Pending"), pod(1, "Pending")], NONE, NONE, NOW + 1
    )
    assert condition_status(created.status["conditions"], "PodsCreated") == "True"
    assert created.status["reason"] != "CreateRefused"


def test_the_reason_says_why_the_job_is_where_it_is() -> None:

    assert summary([]) == {"reason": None, "message": None}
    running = plan(job(status=admitted()), [pod(0), pod(1)], NONE, NONE, NOW).status
    assert running["reason"] == "PodsRunning"
    failed = plan(
        job(status=admitted(Phase.RUNNING)), [pod(0, "Failed", exit_code=1), pod(1)], NONE, NONE, NOW
    )
    assert failed.status["reason"] == "PodFailed"
    assert "exit code 1" in failed.status["message"]
    queued = [{"type": "Admitted", "status": "False", "reason": "InsufficientCapacity", "message": "m"}]
    assert summary(queued) == {"reason": "InsufficientCapacity", "message": "m"}


def _hashed(status: dict[str, Any], spec_hash: str) -> dict[str, Any]:
    return {**status, "placement": {**status["placement"], "specHash": spec_hash}}


def test_an_edit_before_any_pod_exists_builds_the_attempt_from_the_new_spec() -> None:
    result = plan(job(status=_hashed(admitted(), "old"), spec_hash="new"), [], NONE, NONE, NOW)
    assert result.create_ranks == (0, 1)
    assert result.status["placement"]["specHash"] == "new"
    assert result.status["attempt"] == 0


def test_an_edit_while_the_gang_is_half_created_starts_a_new_attempt() -> None:
    status = _hashed(admitted(), "old")
    result = plan(job(status=status, spec_hash="new"), [pod(0, "Pending")], NONE, NONE, NOW)
    assert result.create_ranks == ()  # never rank 1 from the new spec beside rank 0 from the old
    assert result.delete_pods == ("j-node-0",)
    assert result.status["phase"] == Phase.QUEUED
    assert result.status["attempt"] == 1
    assert result.status["restarts"] == 0
    assert [e.reason for e in result.events] == ["SpecChanged"]


def test_an_edit_while_running_waits_for_the_next_attempt_and_says_so() -> None:
    status = _hashed(admitted(Phase.RUNNING), "old")
    result = plan(job(status=status, spec_hash="new"), [pod(0), pod(1)], NONE, NONE, NOW)
    assert result.delete_pods == ()
    assert result.status["phase"] == Phase.RUNNING
    assert condition_status(result.status["conditions"], "PodsUpToDate") == "False"
    assert result.status["reason"] == "SpecChanged"
    assert "takes effect at the next attempt" in result.status["message"]
    # The next attempt (here: a restart after a failure) is admitted with the new spec's hash.
    restarted = _hashed(
        {**result.status, "attempt": 1, "placement": {"attempt": 1, "nodes": ["n0", "n1"]}}, "new"
    )
    fresh = plan(
        job(status={**restarted, "phase": Phase.STARTING}, spec_hash="new"),
        [pod(0, "Pending", attempt=1), pod(1, "Pending", attempt=1)],
        NONE,
        NONE,
        NOW,
    )
    assert condition_status(fresh.status["conditions"], "PodsUpToDate") == "True"


def test_jobs_admitted_before_spec_hashes_are_left_alone() -> None:
    result = plan(job(status=admitted(Phase.RUNNING), spec_hash="new"), [pod(0), pod(1)], NONE, NONE, NOW)
    assert condition_status(result.status.get("conditions") or [], "PodsUpToDate") is None


def test_malformed_status_fields_are_dropped_with_a_warning_not_carried_over() -> None:
    status = admitted(Phase.RUNNING, progress={"step": "?", "updatedAt": "garbage"}, nodes=7, fromTheFuture=1)
    result = plan(job(status=status), [pod(0), pod(1)], NONE, NONE, NOW)
    assert "progress" not in result.status
    assert result.status["nodes"] == "2/2"
    assert "fromTheFuture" not in result.status
    warning = next(e for e in result.events if e.reason == "MalformedStatus")
    assert "progress" in warning.message
    assert "fromTheFuture" in warning.message
    assert result.status["phase"] == Phase.RUNNING  # the lifecycle goes on


def test_a_newer_operator_s_fields_inside_known_ones_are_left_out_not_the_reason_to_drop_them() -> None:
    """After a rollback of the operator (not of its CRD), the status holds what a newer one wrote: a
    running gang's placement must not be dropped for a field inside it, or the gang would be requeued
    while its pods run."""
    placement = {"attempt": 0, "nodes": ["n0", "n1"], "topologyDomain": "rack-1"}
    status = admitted(Phase.RUNNING, placement=placement, conditions=[])
    result = plan(job(status=status), [pod(0), pod(1)], NONE, NONE, NOW)
    assert result.status["phase"] == Phase.RUNNING
    assert result.status["placement"] == {"attempt": 0, "nodes": ["n0", "n1"]}
    assert not [e for e in result.events if e.reason == "MalformedStatus"]
    assert result.delete_pods == ()


def test_every_status_the_lifecycle_writes_fits_the_model() -> None:
    from largo.api.v1alpha1 import check_status

    with pytest.raises(ValueError, match=r"status\.madeUp"):
        check_status({"phase": "Running", "madeUp": 1})
    with pytest.raises(ValueError, match="does not fit"):
        check_status({"restarts": "many"})
    check_status(plan(job(status=admitted()), [pod(0), pod(1)], NONE, NONE, NOW).status)


def running_condition(result: Any) -> dict[str, Any]:
    return dict(next(c for c in result.status["conditions"] if c["type"] == "Running"))


def test_a_node_not_ready_within_its_grace_keeps_the_gang_and_says_when_it_restarts() -> None:
    """A kubelet or runtime hiccup heals within the grace period: restarting for it would cost the
    steps since the last checkpoint. The gang stays, says why on Running, and is looked at again when
    the grace ends (no node event comes then)."""
    running = job(status=admitted(Phase.RUNNING))
    lost_at = NOW + 45
    # Not Ready is unusable (no new pod may land there) but not lost.
    result = plan(running, [pod(0), pod(1)], frozenset({"n1"}), NONE, NOW, not_ready={"n1": lost_at})
    assert result.status["phase"] == Phase.RUNNING
    assert result.delete_pods == ()
    assert not result.force_delete
    assert result.requeue_after == 45
    condition = running_condition(result)
    assert (condition["status"], condition["reason"]) == ("True", Reason.NODE_NOT_READY)
    assert f"restarts at {timestamp(lost_at)}" in condition["message"]
    assert "n1 (rank 1)" in condition["message"]
    assert result.status["reason"] == Reason.NODE_NOT_READY  # what `kubectl get trainjobs` shows
    assert [(e.type, e.reason) for e in result.events] == [("Warning", Reason.NODE_NOT_READY)]

    # Told once: the next cycles, still not Ready, post no event again.
    n1 = frozenset({"n1"})
    again = plan(job(status=result.status), [pod(0), pod(1)], n1, NONE, NOW + 5, not_ready={"n1": lost_at})
    assert again.events == []
    assert again.requeue_after == 40

    # Ready again within the grace: nothing restarted, and said so.
    healed = plan(job(status=result.status), [pod(0), pod(1)], NONE, NONE, NOW + 20)
    assert healed.status["phase"] == Phase.RUNNING
    assert not healed.status.get("restarts")
    assert healed.delete_pods == ()
    assert running_condition(healed)["reason"] == Reason.PODS_RUNNING
    assert [(e.type, e.reason) for e in healed.events] == [("Normal", Reason.NODE_READY)]

    # Still not Ready when the grace ends: the node is lost, the gang restarts elsewhere.
    expired = plan(job(status=result.status), [pod(0), pod(1)], frozenset({"n1"}), frozenset({"n1"}), lost_at)
    assert expired.status["phase"] == Phase.RESTARTING
    assert expired.force_delete
    restarting = next(c for c in expired.status["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == Reason.NODE_LOST
    assert "not Ready for 60s" in restarting["message"]


def test_a_peer_that_fails_while_a_node_dies_waits_for_the_node_s_verdict() -> None:
    """A node goes silent; rank 0's collective fails within seconds (NCCL's or gloo's error), long
    before the node counts as lost: that was a PodFailed, counted against backoffLimit even with
    ``disruptions: Ignore``. It is the node's doing: lost, a disruption; Ready again, the job's own."""
    running = admitted(Phase.RUNNING, restarts=2, disruptions=2)
    view = job(status=running, backoff_limit=0, ignore_disruptions=True)
    pods = [pod(0, "Failed", exit_code=1, finished_at=NOW - 2), pod(1)]
    n1 = frozenset({"n1"})
    waiting = plan(view, pods, n1, NONE, NOW, not_ready={"n1": NOW + 50})
    assert waiting.status["phase"] == Phase.RUNNING
    assert waiting.requeue_after == 50
    assert waiting.delete_pods == ()
    lost = plan(view, pods, n1, n1, NOW + 50)
    assert lost.status["phase"] == Phase.RESTARTING
    assert (lost.status["restarts"], lost.status["disruptions"]) == (3, 3)
    restarting = next(c for c in lost.status["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == Reason.NODE_LOST
    assert "pod j-node-0 failed meanwhile" in restarting["message"]
    # The node came back: the failure is the job's, counted, and the limit is 0.
    healed = plan(view, pods, NONE, NONE, NOW + 20)
    assert healed.status["phase"] == Phase.FAILED
    # A peer on a healthy node is no excuse.
    assert plan(view, pods, NONE, NONE, NOW).status["phase"] == Phase.FAILED


def test_pods_terminating_on_a_node_not_ready_are_looked_at_again_when_it_is_lost() -> None:
    """A restart deletes the pods with their grace period; one on a node that is not Ready cannot be
    confirmed by its kubelet, so when the node is lost it is removed without grace."""
    view = job(Phase.RESTARTING, status={**admitted(Phase.RESTARTING), "restarts": 1})
    stuck = pod(1, terminating=True)
    waiting = plan(view, [stuck], frozenset({"n1"}), NONE, NOW, not_ready={"n1": NOW + 30})
    assert waiting.delete_pods == ()
    assert waiting.requeue_after == 30
    # A node the job has nothing on is not waited for.
    elsewhere = plan(view, [stuck], frozenset({"n7"}), NONE, NOW, not_ready={"n7": NOW + 30})
    assert elsewhere.requeue_after is None


def test_a_finished_rank_on_a_node_not_ready_is_not_waited_on_nor_said_ready_when_lost() -> None:
    """A rank that already succeeded does not need its node: the gang is not told about the node, and
    when the node is lost nothing restarts and nothing says it is Ready again."""
    pods = [pod(0), pod(1, "Succeeded")]
    n1 = frozenset({"n1"})
    within = plan(job(status=admitted(Phase.RUNNING)), pods, n1, NONE, NOW, not_ready={"n1": NOW + 45})
    assert within.events == []
    assert "conditions" not in within.status
    # Told earlier (the rank was running then), and the node is lost meanwhile: no "Ready again".
    said = {"type": "Running", "status": "True", "reason": Reason.NODE_NOT_READY, "message": "n1"}
    told = job(status=admitted(Phase.RUNNING, conditions=[said]))
    lost = plan(told, pods, n1, n1, NOW + 45)
    assert lost.status["phase"] == Phase.RUNNING
    assert lost.events == []
    assert running_condition(lost)["reason"] == Reason.PODS_RUNNING
    # The same, the node Ready again: said so.
    healed = plan(told, pods, NONE, NONE, NOW + 45)
    assert [(e.type, e.reason) for e in healed.events] == [("Normal", Reason.NODE_READY)]


def test_a_gang_of_a_thousand_nodes_fits_its_conditions() -> None:
    """Messages that listed every node of a 1024-node gang (cloud node names are ~40 characters)
    broke the 32768-character limit of a condition, and every write of the job failed."""
    names = [f"ip-10-0-{i // 250}-{i % 250}.us-west-2.compute.internal-gpu-pool" for i in range(1024)]
    status = {**admitted(), "placement": {"attempt": 0, "nodes": names}}
    view = JobView(num_nodes=1024, gpus_per_node=8, status={**status, "phase": Phase.STARTING})
    pods = [PodView(f"j-node-{r}", r, 0, "Running", names[r]) for r in range(1024)]
    result = plan(view, pods, NONE, NONE, NOW)
    assert result.status["phase"] == Phase.RUNNING
    message = running_condition(result)["message"]
    assert message.startswith(f"all 1024 pods running on {names[0]}, ")
    assert message.endswith("(1016 more)")
    # Whatever a message holds, a condition keeps within the limit.
    long = set_condition([], "Running", True, "PodsRunning", "x" * 40_000, NOW)
    assert len(long[0]["message"]) == 32768


@pytest.mark.parametrize("taken", [{"terminating": True}, {"disrupted": "EvictionByEvictionAPI"}])
def test_a_pod_taken_away_is_a_restart_whatever_its_exit_code(taken: dict[str, Any]) -> None:
    """`kubectl drain`, a preemption or a deletion stops the trainer with SIGTERM (143): with
    retryableExitCodes [1] that code used to fail the job for good. A trainer that catches SIGTERM,
    saves and exits 0 is stopped all the same: that used to end the job Succeeded, unfinished."""
    view = job(status=admitted(Phase.RUNNING), retryable_exit_codes=frozenset({1}), backoff_limit=3)
    result = plan(view, [pod(0), pod(1, "Failed", exit_code=143, **taken)], NONE, NONE, NOW)
    assert result.status["phase"] == Phase.RESTARTING
    restarting = next(c for c in result.status["conditions"] if c["type"] == "Restarting")
    assert restarting["reason"] == Reason.POD_DELETED
    assert "was stopped" in restarting["message"]
    # The same exit code from a pod nobody took away is the job's own failure.
    failed = plan(view, [pod(0), pod(1, "Failed", exit_code=143)], NONE, NONE, NOW)
    assert failed.status["phase"] == Phase.FAILED
    # Exit 0 on SIGTERM: the rest of the gang still running, or already done, or a 1-node job.
    for pods in (
        [pod(0), pod(1, "Succeeded", exit_code=0, **taken)],
        [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0, **taken)],
    ):
        stopped = plan(view, pods, NONE, NONE, NOW)
        assert stopped.status["phase"] == Phase.RESTARTING
        restarting = next(c for c in stopped.status["conditions"] if c["type"] == "Restarting")
        assert restarting["reason"] == Reason.POD_DELETED
        assert set(stopped.delete_pods) == {p.name for p in pods if not p.terminating}
    one_node = {**admitted(Phase.RUNNING), "placement": {"attempt": 0, "nodes": ["n0"]}}
    single = JobView(num_nodes=1, gpus_per_node=8, status=one_node)
    alone = plan(single, [pod(0, "Succeeded", exit_code=0, **taken)], NONE, NONE, NOW)
    assert alone.status["phase"] == Phase.RESTARTING
    assert "completionTime" not in alone.status


def raw_pod(rank: int, phase: str, finished: float, **metadata: Any) -> dict[str, Any]:
    """A pod as the API server has it, its trainer ended with 0 at ``finished``."""
    conditions = metadata.pop("conditions", [])
    ended = {"terminated": {"exitCode": 0, "finishedAt": timestamp(finished)}}
    return {
        "metadata": {
            "name": f"j-node-{rank}",
            "labels": {"largo.dev/node-rank": str(rank), "largo.dev/attempt": "0"},
            **metadata,
        },
        "spec": {"nodeName": f"n{rank}"},
        "status": {
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": [{"name": CONTAINER_NAME, "state": ended}],
        },
    }


def viewed(raw: dict[str, Any]) -> PodView:
    view = pod_view(raw)
    assert view is not None
    return view


def evicted(at: float) -> dict[str, Any]:
    return {
        "conditions": [
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "lastTransitionTime": timestamp(at),
            }
        ]
    }


def test_a_job_that_finished_succeeds_even_if_a_finished_pod_is_taken_away_after() -> None:
    """The operator deletes no pod of a running gang unless the gang fails, and none of a job that
    succeeded: a finished job's pods are not marked before it is seen Succeeded. The eviction API does
    mark a pod that already finished (a drain of a node whose rank is done) before deleting it: a
    trainer that ended before it was taken away finished, and the job succeeds."""
    view = job(status=admitted(Phase.RUNNING))
    rank0 = viewed(raw_pod(0, "Succeeded", NOW - 30))
    finished = plan(view, [rank0, viewed(raw_pod(1, "Succeeded", NOW - 20))], NONE, NONE, NOW)
    assert finished.status["phase"] == Phase.SUCCEEDED
    assert finished.delete_pods == ()
    # Rank 1 ended, then its node was drained (or the pod deleted, with its grace period): still done.
    deleted = {"deletionTimestamp": timestamp(NOW + 25), "deletionGracePeriodSeconds": 30}
    for marks in (evicted(NOW - 5), deleted):
        later = viewed(raw_pod(1, "Succeeded", NOW - 20, **marks))
        assert not later.taken_away
        assert plan(view, [rank0, later], NONE, NONE, NOW).status["phase"] == Phase.SUCCEEDED
    # Ended after (or within the second) it was taken away, or with no time to tell: it was stopped.
    untimed = {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TaintManager"}]}
    for marks in (evicted(NOW - 25), evicted(NOW - 20), untimed):
        stopped = viewed(raw_pod(1, "Succeeded", NOW - 20, **marks))
        assert stopped.taken_away
        assert plan(view, [rank0, stopped], NONE, NONE, NOW).status["phase"] == Phase.RESTARTING
    # A job seen Succeeded stays so while its pods go (its TTL, the job's deletion, a drain).
    gone = [pod(0, "Succeeded", terminating=True), pod(1, "Succeeded", disrupted="EvictionByEvictionAPI")]
    kept = plan(job(Phase.SUCCEEDED, status={**admitted(Phase.SUCCEEDED)}), gone, NONE, NONE, NOW)
    assert kept.status["phase"] == Phase.SUCCEEDED
    assert kept.events == []


def test_a_pod_s_disruption_is_read_from_its_condition() -> None:
    raw = {
        "metadata": {"name": "j-node-1", "labels": {"largo.dev/node-rank": "1", "largo.dev/attempt": "0"}},
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}],
        },
    }
    view = pod_view(raw)
    assert view is not None
    assert view.disrupted == "PreemptionByScheduler"


def test_a_gang_whose_node_went_before_its_pods_were_created_is_released_at_once() -> None:
    """Creating every rank and releasing them the cycle after cost two API calls per pod."""
    result = plan(job(status=admitted()), [], frozenset({"n1"}), frozenset({"n1"}), NOW)
    assert result.create_ranks == ()
    assert result.status["phase"] == Phase.QUEUED
    admitted_condition = next(c for c in result.status["conditions"] if c["type"] == "Admitted")
    assert admitted_condition["reason"] == Reason.BINDING_FAILED
    assert "n1 chosen for rank 1" in admitted_condition["message"]


def test_suspending_a_restarting_job_leaves_no_restart_behind() -> None:
    restarting = {
        **admitted(Phase.RESTARTING),
        "restarts": 1,
        "nextRestartTime": timestamp(NOW + 30),
        "conditions": [{"type": "Restarting", "status": "True", "reason": "PodFailed", "message": "x"}],
    }
    result = plan(job(status=restarting, suspend=True), [], NONE, NONE, NOW)
    assert result.status["phase"] == Phase.SUSPENDED
    assert "nextRestartTime" not in result.status
    assert condition_status(result.status["conditions"], "Restarting") == "False"
    assert result.status["reason"] == Reason.SUSPENDED
