"""The autoscaling decision on recorded load streams: step up, step down, flapping, panic, missing and
stale metrics, bounds, scale to zero and back. Each test runs the decision once a second, as the
controller would, feeding each decision's replicas and state into the next."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable

import pytest
from largo.policy.autoscale import Decision, Policy, Sample, State, decide

POLICY = Policy(min_replicas=1, max_replicas=10, target=4.0, stable_window=60, panic_window=6)


def run(
    policy: Policy,
    load: Callable[[int, int], float | None],
    seconds: int,
    replicas: int = 1,
    silent: Callable[[int, str], bool] = lambda t, r: False,
) -> list[Decision]:
    """``load(t, replicas)``: total load at second t, spread evenly over the ready replicas (None: no
    sample at all). Replicas are ready as soon as they are wanted, and sampled every second."""
    policy = dataclasses.replace(policy, period=1.0)
    samples: list[Sample] = []
    state, decisions = State(), []
    for t in range(seconds):
        names = [f"r{i}" for i in range(replicas)]
        total = load(t, replicas)
        if total is not None:
            samples += [
                Sample(float(t), name, total / max(replicas, 1)) for name in names if not silent(t, name)
            ]
            if not names and total > 0:
                samples.append(Sample(float(t), "activator", total))
        # What the decision reads lies within the stable window (and a sample's staleness): older
        # samples are dropped, as the controller drops them, so that a long run stays linear.
        samples = [s for s in samples if s.time > t - policy.stable_window - 2 * policy.stale_after]
        decision = decide(policy, samples, names, replicas, state, float(t))
        decisions.append(decision)
        replicas, state = decision.replicas, decision.state
    return decisions


def test_a_step_up_in_load_adds_replicas_within_the_stable_window() -> None:
    decisions = run(POLICY, lambda t, n: 4.0 if t < 100 else 16.0, 200)
    assert decisions[99].replicas == 1
    assert decisions[-1].replicas == 4  # 16 in flight / 4 per replica
    assert "load 16.0 / target 4" in decisions[-1].reason


def test_a_step_down_waits_out_the_stabilisation_then_scales_down() -> None:
    policy = Policy(min_replicas=1, max_replicas=10, target=4.0, scale_down_delay=120)
    decisions = run(policy, lambda t, n: 16.0 if t < 100 else 4.0, 400, replicas=4)
    assert decisions[150].replicas == 4  # load fell at 100, but 4 were needed within 120 s
    assert "scaling down slowly" in decisions[150].reason
    assert decisions[-1].replicas == 1


def test_flapping_load_does_not_flap_the_replicas() -> None:
    # A minute at 16 in flight, a minute at 4: the stable window's average swings between them.
    flapping = lambda t, n: 16.0 if (t // 60) % 2 == 0 else 4.0  # noqa: E731
    counts = [d.replicas for d in run(POLICY, flapping, 900, replicas=4)[100:]]
    assert set(counts) == {4}  # held at the peak's need, never down and up again
    quick = Policy(min_replicas=1, max_replicas=10, target=4.0, scale_down_delay=0)
    quick_counts = [d.replicas for d in run(quick, flapping, 900, replicas=4)[100:]]
    assert sum(1 for a, b in itertools.pairwise(quick_counts) if a != b) > 10  # what stabilisation stops


def test_a_sudden_burst_panics_up_at_once_and_does_not_scale_down_during_the_panic() -> None:
    decisions = run(POLICY, lambda t, n: 4.0 if t < 100 or t > 110 else 40.0, 600)
    assert decisions[99].replicas == 1
    assert decisions[100].panic  # one second of the burst is enough to act
    assert "panic" in decisions[100].reason
    assert decisions[106].replicas == 10  # 40 / 4 within a panic window, not after a minute
    assert all(d.replicas == 10 for d in decisions[106:160])  # the burst is gone at 111; still holding
    # After the panic, the scale-down waits out scale_down_delay (300 s) from the panic's last need,
    # as any scale-down does: a burst every few minutes does not swing the replicas 1 -> 10 -> 1.
    panic_ends = max(t for t, d in enumerate(decisions) if d.panic)
    assert all(d.replicas == 10 for d in decisions[106 : panic_ends + 300])
    assert "scaling down slowly" in decisions[panic_ends + 100].reason
    assert decisions[-1].replicas == 1


def test_replicas_without_fresh_metrics_count_as_busy_so_nothing_scales_down() -> None:
    # Load falls to nothing, but two of four replicas stop reporting: they might be the busy ones. (The
    # simulation keeps the lowest-numbered replicas when scaling down, so the silent ones stay.)
    decisions = run(
        Policy(min_replicas=1, max_replicas=10, target=4.0, scale_down_delay=30),
        lambda t, n: 16.0 if t < 60 else 0.0,
        300,
        replicas=4,
        silent=lambda t, r: t >= 60 and r in ("r0", "r1"),
    )
    assert all(d.replicas >= 2 for d in decisions[60:])  # never fewer than the silent ones need
    assert decisions[-1].replicas == 2
    assert any("2 replica(s) without fresh samples counted busy" in d.reason for d in decisions[60:])


def test_no_samples_at_all_holds_where_it_is() -> None:
    decisions = run(POLICY, lambda t, n: None, 100, replicas=3)
    assert {d.replicas for d in decisions} == {3}
    assert decisions[-1].reason == "no fresh load samples: holding"


@pytest.mark.parametrize(("load", "expected"), [(400.0, 10), (0.0, 2)])
def test_bounds_clamp_and_say_so(load: float, expected: int) -> None:
    policy = Policy(min_replicas=2, max_replicas=10, target=4.0, scale_down_delay=10)
    decisions = run(policy, lambda t, n: load, 200, replicas=5)
    assert decisions[-1].replicas == expected
    if load:
        assert "clamped to 10 by [2, 10]" in decisions[-1].reason


def test_scale_to_zero_after_the_grace_and_back_on_demand() -> None:
    policy = Policy(
        min_replicas=0,
        max_replicas=5,
        target=4.0,
        scale_down_delay=10,
        scale_to_zero=True,
        scale_to_zero_grace=30,
    )
    decisions = run(policy, lambda t, n: 4.0 if t < 60 or t >= 300 else 0.0, 400)
    assert any(d.replicas == 0 for d in decisions[100:300])
    zero = next(d for d in decisions if d.replicas == 0)
    assert "scaling to zero" in zero.reason
    assert decisions[310].replicas >= 1  # demand at zero replicas brings one back
    assert decisions[-1].replicas == 1
    without = Policy(min_replicas=1, max_replicas=5, target=4.0, scale_down_delay=10)
    assert min(d.replicas for d in run(without, lambda t, n: 0.0, 200)) == 1


def test_scale_to_zero_waits_out_the_scale_down_delay() -> None:
    """A service kept warm for scaleDownDelaySeconds (a model that takes minutes to load) is not cold
    started after a minute without load: zero is a scale-down, and waits out the delay as any other."""
    warm = Policy(0, 5, 4.0, scale_down_delay=300, scale_to_zero=True, scale_to_zero_grace=30)
    decisions = run(warm, lambda t, n: 4.0 if t < 60 else 0.0, 600)
    zero = next(t for t, d in enumerate(decisions) if d.replicas == 0)
    # The last load (at 59 s) leaves the stable window (60 s) at 119 s; the delay runs from then.
    assert 59 + 60 + 300 <= zero <= 59 + 60 + 300 + 5
    assert decisions[zero].reason == "no load for 300s: scaling to zero"


def test_a_replica_woken_from_zero_is_not_scaled_to_zero_before_it_is_ready() -> None:
    """The first request is held by the router for a while, then gives up; the model takes 10 minutes
    to load. Idle time counts from a ready replica on, so the load is not cut short."""
    policy = Policy(0, 5, 4.0, scale_down_delay=10, scale_to_zero=True, scale_to_zero_grace=30)
    samples: list[Sample] = []
    state, replicas = State(), 0
    decisions = []
    for t in range(900):
        ready = ["r0"] if replicas and t >= 600 else []
        # The router holds the request, then it times out; with no ready leader, the routers' held
        # counts are the samples (0 once it gave up), then the ready leader's.
        samples.append(Sample(float(t), "r0" if ready else "router", 1.0 if t < 100 else 0.0))
        decision = decide(policy, samples, ready, replicas, state, float(t))
        decisions.append(decision)
        replicas, state = decision.replicas, decision.state
    assert decisions[0].replicas == 1
    assert all(d.replicas == 1 for d in decisions[:600])
    # Ready and still idle: to zero after the stable window and the grace, counted from ready.
    zero = next(t for t, d in enumerate(decisions) if d.replicas == 0)
    assert 600 + 30 <= zero <= 600 + 60 + 30 + 5


def test_a_policy_must_make_sense() -> None:
    with pytest.raises(ValueError, match="minReplicas <= maxReplicas"):
        Policy(min_replicas=5, max_replicas=2, target=1.0)
    with pytest.raises(ValueError, match="target"):
        Policy(min_replicas=1, max_replicas=2, target=0.0)


def test_replicas_sampled_at_different_moments_all_count() -> None:
    # Two replicas with 8 in flight each, scraped in alternate seconds and half a second apart.
    samples = [Sample(t + 0.5 * (t % 2), f"r{t % 2}", 8.0) for t in range(0, 120)]
    decision = decide(POLICY, samples, ["r0", "r1"], 2, State(), 120.0)
    assert decision.load == pytest.approx(16.0, rel=0.05)
    assert decision.replicas == 4


def test_loads_whose_sum_is_beyond_any_number_ask_for_the_most_replicas() -> None:
    """Each replica's value is finite, their sum is not: ceil(inf / target) raised OverflowError, and the
    service got no decision while the samples stayed in the window."""
    samples = [Sample(t, f"r{t % 2}", 1e308) for t in range(60, 120)]
    decision = decide(POLICY, samples, ["r0", "r1"], 2, State(), 120.0)
    assert decision.replicas == POLICY.max_replicas


def test_the_first_decision_off_a_whole_second_does_not_read_the_load_as_zero() -> None:
    """A controller's clock is never on a whole second: four replicas at the target, sampled once at
    1000.5, must not be read as idle (which once scaled 4 to 1 after every operator start)."""
    samples = [Sample(1000.5, f"r{i}", 4.0) for i in range(4)]
    names = [f"r{i}" for i in range(4)]
    first = decide(POLICY, samples, names, 4, State.starting(4, 1000.5), 1000.5)
    assert first.replicas == 4
    assert first.reason == "no fresh load samples: holding"
    samples += [Sample(1002.5, name, 4.0) for name in names]
    later = decide(POLICY, samples, names, 4, first.state, 1002.5)
    assert later.replicas == 4
    assert later.load == pytest.approx(16.0)


def test_a_controller_that_starts_without_memory_still_waits_out_the_scale_down_delay() -> None:
    """A new leader finds 4 replicas and a load that wants 1: it scales down after the delay, as the
    old leader would have, not at once."""
    policy = Policy(min_replicas=1, max_replicas=10, target=4.0, scale_down_delay=120)
    samples: list[Sample] = []
    state = State.starting(4, 0.0)
    replicas, decisions = 4, []
    for t in range(1, 200):
        samples += [Sample(float(t), f"r{i}", 1.0 / replicas) for i in range(replicas)]
        decision = decide(policy, samples, [f"r{i}" for i in range(replicas)], replicas, state, float(t))
        decisions.append(decision)
        replicas, state = decision.replicas, decision.state
    assert decisions[100].replicas == 4
    assert decisions[-1].replicas == 1


def test_a_long_window_over_many_replicas_is_one_pass_per_replica() -> None:
    """The hour-long window the API allows, 16 replicas sampled every 2 s: each second's total comes
    from a walk over each replica's samples, not a scan of all of them per second."""
    policy = Policy(min_replicas=1, max_replicas=32, target=4.0, stable_window=3600)
    names = [f"r{i}" for i in range(16)]
    samples = [Sample(float(t), name, 4.0) for t in range(0, 3600, 2) for name in names]
    calls = 0
    original = Sample.__getattribute__

    def counting(self: Sample, name: str) -> object:
        nonlocal calls
        if name == "time":
            calls += 1
        return original(self, name)

    Sample.__getattribute__ = counting  # type: ignore[method-assign]
    try:
        decision = decide(policy, samples, names, 16, State.starting(16, 3599.0), 3599.0)
    finally:
        Sample.__getattribute__ = original  # type: ignore[method-assign]
    assert decision.replicas == 16
    assert len(samples) <= calls < 20 * len(samples)  # a scan per second reads each one ~3600 times


def test_demand_at_zero_starts_one_replica_at_once_saying_the_load() -> None:
    """The router's first held-requests sample, off a whole second: one replica now, the load told."""
    policy = Policy(min_replicas=0, max_replicas=3, target=4.0, scale_to_zero=True)
    samples = [Sample(1000.5, "router-a", 1.0), Sample(1000.5, "router-b", 2.0)]
    decision = decide(policy, samples, [], 0, State.starting(0, 1000.5), 1000.5)
    assert decision.replicas == 1
    assert decision.reason == "demand at zero replicas: starting one"
    assert decision.load == pytest.approx(3.0)


def test_a_request_held_at_zero_after_idle_samples_starts_one_replica_at_once() -> None:
    """The routers report 0 held every period; a held request sampled off a whole second must not wait
    for the windows to average it in."""
    policy = Policy(min_replicas=0, max_replicas=3, target=4.0, scale_to_zero=True)
    samples = [Sample(1000.3 + 2 * i, "router-a", 0.0) for i in range(40)]
    now = 1080.3
    samples.append(Sample(now, "router-a", 1.0))
    decision = decide(policy, samples, [], 0, State(), now)
    assert decision.replicas == 1
    assert decision.load == pytest.approx(1.0)


def test_requests_held_by_routers_scraped_every_other_second_all_count() -> None:
    """The controller scrapes the routers each period (2 s): 40 requests held while the service
    starts, at 4 per replica, want 10 replicas, not the 5 of counting each sample in its own second."""
    policy = Policy(min_replicas=1, max_replicas=20, target=4.0, scale_to_zero=True)
    samples = [Sample(t + 0.5, "router/a", 40.0, held=True) for t in range(0, 120, 2)]
    decision = decide(policy, samples, [], 1, State.starting(1, 0.0), 120.0)
    assert decision.load == pytest.approx(40.0)
    assert decision.replicas == 10


TO_ZERO = Policy(0, 5, 4.0, scale_down_delay=10, scale_to_zero=True, scale_to_zero_grace=30)


def _idle_run(served_every: int | None, start: float = 0.0, seconds: int = 400) -> list[Decision]:
    """One ready replica whose in-flight count reads 0 at every scrape (2 s apart); every
    ``served_every`` seconds it has finished a request since the scrape before."""
    samples: list[Sample] = []
    state, replicas, decisions = State.starting(1, start), 1, []
    for t in range(int(start), int(start) + seconds, 2):
        served = served_every is not None and t % served_every == 0
        samples.append(Sample(float(t), "r0", 0.0, served=served))
        decision = decide(TO_ZERO, samples, ["r0"] if replicas else [], replicas, state, float(t))
        decisions.append(decision)
        replicas, state = decision.replicas, decision.state
    return decisions


def test_short_requests_never_seen_in_flight_still_keep_a_service_from_zero() -> None:
    """Three half-second requests a minute are seldom in flight when scraped: the finished-requests
    counter says the replica served, so it is not idle (every later request would wait a cold start)."""
    assert all(d.replicas == 1 for d in _idle_run(served_every=20))
    assert any(d.replicas == 0 for d in _idle_run(served_every=None))


def test_a_new_controller_waits_a_whole_stable_window_of_samples_before_it_calls_a_service_idle() -> None:
    """A new leader has seen 2 s of an idle service: that says nothing of the minute before, so it
    scales to zero only after the stable window and the grace, as the old leader would have."""
    decisions = _idle_run(served_every=None, start=10_000.0)
    zero = next(i for i, d in enumerate(decisions) if d.replicas == 0) * 2
    assert 60 - 10 + 30 <= zero <= 60 + 30 + 4


def test_requests_held_then_served_by_the_first_ready_replica_count_once() -> None:
    """Once a replica is ready the routers are no longer scraped, and the requests they held are in
    flight on it: carrying the routers' last sample on counted them twice, panicked the service up
    (8 held at target 4: 2 wanted, 4 made) and kept the extra replicas for the scale-down delay."""
    policy = Policy(min_replicas=1, max_replicas=20, target=4.0, scale_to_zero=True)
    samples = [Sample(t + 0.5, "router/a", 8.0, held=True) for t in range(0, 60, 2)]
    samples += [Sample(float(t), "r0", 8.0) for t in range(60, 66)]
    decision = decide(policy, samples, ["r0"], 2, State.starting(2, 0.0), 65.0)
    assert not decision.panic
    assert decision.replicas == 2


def test_a_replica_counts_busy_only_from_when_it_was_ready_and_not_while_warming() -> None:
    """15 requests per second on r0 for a minute, target 10; r1 became ready at 59 and has no sample
    yet. Counted at the target over the whole window (and the panic window) it read as 25: 3
    replicas. It counts from its ready second only, and not at all while it answers without a value."""
    policy = Policy(min_replicas=1, max_replicas=10, target=10.0, stable_window=60, panic_window=6)
    samples = [Sample(float(t), "r0", 15.0) for t in range(0, 61)]
    whole = decide(policy, samples, ["r0", "r1"], 2, State.starting(2, 0.0), 60.0)
    assert whole.replicas == 3  # r1 not known to be new: the whole window at the target
    since = decide(policy, samples, ["r0", "r1"], 2, State.starting(2, 0.0), 60.0, ready_since={"r1": 59.0})
    assert since.replicas == 2
    assert since.load == pytest.approx(15.0 + 2 * 10.0 / 60)
    warm = decide(policy, samples, ["r0", "r1"], 2, State.starting(2, 0.0), 60.0, warming={"r1"})
    assert warm.replicas == 2
    assert warm.load == pytest.approx(15.0)
    assert "counted busy" not in warm.reason


def test_no_scale_to_zero_while_the_newest_sample_shows_requests() -> None:
    """Scraped off a whole second (as a controller's clock is), the sample taken at the very tick that
    would scale to zero is past the windows' last whole second: requests it shows in flight stop the
    scale to zero, which would cut them to the drain and cold-start the next."""
    policy = Policy(0, 5, 4.0, scale_down_delay=10, scale_to_zero=True, scale_to_zero_grace=30)

    def first_zero(busy_at: float | None) -> float | None:
        samples: list[Sample] = []
        state, replicas = State(), 1
        for t in range(200):
            now = t + 0.37
            samples.append(Sample(now, "r0", 3.0 if now == busy_at else 0.0))
            decision = decide(policy, samples, ["r0"], replicas, state, now)
            if decision.replicas == 0:
                return now
            replicas, state = decision.replicas, decision.state
        return None

    idle = first_zero(None)
    assert idle is not None
    assert first_zero(idle) != idle  # requests at that tick: it waits


def test_periodic_bursts_below_the_panic_threshold_do_not_swing_the_replicas() -> None:
    """40 in flight for 10 s every two minutes, 2 between: at 10 replicas a burst is not twice the
    ready ones, so it starts no panic. Remembered only through the minute's average (~8, 3 replicas),
    the scale-down landed in a burst and the burst panicked it back: 10 -> 3 -> 10 every six minutes."""
    policy = Policy(1, 20, 4.0, stable_window=60, panic_window=6, scale_down_delay=300)
    counts = [d.replicas for d in run(policy, lambda t, n: 40.0 if t % 120 < 10 else 2.0, 1500)]
    assert max(counts) == 10
    assert min(counts[10:]) == 10  # held through the bursts, no swing
    # Once the bursts stop, the replicas come down after the delay, as before.
    quiet = [d.replicas for d in run(policy, lambda t, n: 40.0 if t < 10 else 2.0, 800)]
    assert quiet[-1] == 1


def test_noise_around_a_steady_load_is_not_remembered_as_a_burst() -> None:
    """A steady load of 10 in flight, Poisson noise: the short window's peaks are noise, not a burst
    (under the panic threshold times the stable need), so the replicas settle near what the average
    needs instead of the highest peak of the last scaleDownDelaySeconds."""
    rng = random.Random(1)

    def poisson(t: int, n: int) -> float:
        limit, count, product = math.exp(-10.0), 0, rng.random()
        while product >= limit:
            count += 1
            product *= rng.random()
        return float(count)

    policy = Policy(min_replicas=1, max_replicas=50, target=1.0)
    counts = [d.replicas for d in run(policy, poisson, 1200, replicas=20)[600:]]
    assert sum(counts) / len(counts) < 13  # 10 needed on average; the peaks' memory made it 15


QUICK = dataclasses.replace(POLICY, scale_down_delay=0)


def test_the_load_a_replica_carried_before_it_left_is_not_halved() -> None:
    """Three replicas at 3 in flight each, sampled every 2 s; at 200 one's group restarts and its
    requests move to the other two. The service's load never changed: its samples from while it was
    ready stand for their period, so the window still reads 9 and nothing scales down."""
    samples: list[Sample] = []
    state, current = State(), 3
    for tick in range(110):
        now = 100 + 2 * tick + 0.5  # off a whole second, as the loop's clock is
        ready = ["r0", "r1", "r2"] if now < 200 else ["r0", "r1"]
        samples = [s for s in samples if s.time > now - 70]
        samples += [Sample(now, r, 9.0 / len(ready)) for r in ready]
        decision = decide(QUICK, samples, ready, current, state, now)
        state, current = decision.state, decision.replicas
        if now >= 170:
            assert decision.load == pytest.approx(9.0, abs=0.3), (now, decision.load)
            assert decision.replicas == 3, (now, decision.reason)


def test_seconds_a_ready_replica_could_not_be_read_stay_busy_once_it_answers() -> None:
    """r1's metrics fail from 100 to 150 (it counts at the target meanwhile), then it answers again:
    those seconds are not read as idle afterwards (missing metrics never cause a scale-down)."""
    samples: list[Sample] = []
    state, current = State(), 2
    for tick in range(90):
        now = 2 * tick + 0.5
        samples.append(Sample(now, "r0", 3.0))
        if not 100 < now < 150:
            samples.append(Sample(now, "r1", 3.0))
        samples = [s for s in samples if s.time > now - 70]
        decision = decide(QUICK, samples, ["r0", "r1"], current, state, now)
        state, current = decision.state, decision.replicas
        if now >= 60:
            assert decision.replicas == 2, (now, decision.load, decision.reason)


def test_a_replica_warming_up_before_its_first_value_is_not_counted_busy_afterwards() -> None:
    """A rate needs two scrapes: the seconds before a new replica's first value are not its load, even
    once it has one (counting them at the target overshot every scale-up of a rate-scaled service)."""
    samples = [Sample(float(t) + 0.5, "r0", 1.0) for t in range(0, 60, 2)]
    samples += [Sample(float(t) + 0.5, "r1", 1.0) for t in range(40, 60, 2)]
    decision = decide(QUICK, samples, ["r0", "r1"], 2, State(), 59.5, ready_since={"r1": 30.0})
    assert decision.load == pytest.approx(1.0 + 20 / 59, abs=0.05)


def test_samples_must_outlive_the_sampling_period() -> None:
    with pytest.raises(ValueError, match="sampling period"):
        Policy(min_replicas=1, max_replicas=2, target=1.0, stale_after=10.0, period=10.0)
