"""How many replicas an InferenceService wants now: a pure function of its policy, the replicas' recent
load samples, the replicas it has, the state of earlier decisions, and ``now``.

The shape is Knative's KPA with HPA's scale-down stabilisation:
- desired = ceil(load / target), where load is the service's total per second (the sum over replicas
  of each one's newest sample, carried forward while fresh) averaged over the *stable* window (60 s);
- a *panic* window (6 s) catches sudden bursts: when it asks for at least ``panic_threshold`` times
  the ready replicas, the service scales up at once and does not scale down until the burst has been
  gone for a whole stable window (and then as any scale-down, after ``scale_down_delay``: what the
  panic asked for counts among the recommendations);
- scale-down takes the highest recommendation of the last ``scale_down_delay`` seconds, so a load that
  flaps does not make replicas flap; scale-up is immediate;
- a ready replica whose samples are missing or stale counts as fully busy (at ``target``): missing
  metrics never cause a scale-down; it counts so from the second it was ready on (``ready_since``),
  not over seconds before it existed, and not at all while it answers without a value yet
  (``warming``: a rate needs two scrapes), so a replica that just came up does not read as load;
- with no sample at all the service holds where it is; [minReplicas, maxReplicas] clamp every
  decision, except that ``scale_to_zero`` lets an idle service (no load for the stable window, then
  for the longer of the grace and ``scale_down_delay``, counted from a ready replica on) go to zero;
  any demand then brings one replica back.

The controller keeps ``State`` between calls. It is small and is rebuilt by running: a controller that
starts without it (a new leader) seeds it with the replicas it finds (``State.starting``), so that a
scale-down still waits out the delay.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Policy:
    min_replicas: int
    max_replicas: int
    # Per-replica load wanted, e.g. 4 in-flight requests.
    target: float
    stable_window: float = 60.0
    panic_window: float = 6.0
    panic_threshold: float = 2.0
    scale_down_delay: float = 300.0
    # A replica's samples older than this no longer describe it (the controller's ``policy_of`` makes
    # it longer with a longer sampling period, or every period would end with seconds read as idle).
    stale_after: float = 10.0
    # How often replicas are sampled: a sample of a replica that is no longer ready stands for one.
    period: float = 2.0
    scale_to_zero: bool = False
    scale_to_zero_grace: float = 30.0

    def __post_init__(self) -> None:
        if self.stale_after <= self.period:
            raise ValueError("samples must stay fresh for longer than the sampling period")
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("need 0 <= minReplicas <= maxReplicas and maxReplicas >= 1")
        if self.target <= 0:
            raise ValueError("the target load per replica must be > 0")


@dataclass(frozen=True, slots=True)
class Sample:
    """One replica's load (in-flight requests, or requests per second) at one moment."""

    time: float
    replica: str
    value: float
    # Requests a router holds for want of a ready replica: carried forward while fresh, like a ready
    # replica's sample (routers are scraped every period, not every second), never counted busy.
    held: bool = False
    # The replica finished requests since its previous sample: it served, whatever its load reads.
    served: bool = False


@dataclass(frozen=True, slots=True)
class State:
    """What decisions remember: recent recommendations (for scale-down stabilisation) and the panic."""

    recommendations: tuple[tuple[float, int], ...] = ()
    panic_until: float | None = None
    idle_since: float | None = None

    @classmethod
    def starting(cls, replicas: int, now: float) -> State:
        """The state of a controller that finds ``replicas`` and remembers nothing: as if it had just
        recommended them, so that a scale-down waits ``scale_down_delay`` as it would have."""
        return cls(recommendations=((now, replicas),))


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    reason: str
    # The load the decision was made on (sum over replicas, stable window), if any.
    load: float | None
    panic: bool
    state: State = field(default_factory=State)


# Replicas a load beyond any count asks for (finite loads whose sum is not: 1e308 in flight on two
# replicas); the bounds clamp it to maxReplicas.
_UNBOUNDED = 2**31


def _replicas_for(load: float, target: float) -> int:
    """Replicas that hold ``load`` at ``target`` each."""
    wanted = load / target
    return math.ceil(wanted) if math.isfinite(wanted) and wanted < _UNBOUNDED else _UNBOUNDED


def _average_load(
    samples: Sequence[Sample],
    ready: Sequence[str],
    since: float,
    now: float,
    policy: Policy,
    ready_since: Mapping[str, float],
    warming: Collection[str],
) -> tuple[float, int] | None:
    """The service's total load averaged over each second since ``since``. A second's total is the sum
    over replicas of each one's newest sample at that second (carried forward while fresh, so replicas
    sampled at different moments all count), as KPA sums its pods; a ready replica with no fresh sample
    counts as busy, at ``target``, in the seconds since it was ready (``ready_since``; absent: before
    the window), unless it is ``warming``; so does a ready replica in a second after its first sample
    when it had no fresh sample then (its scrapes failed a while): missing metrics never read as idle.
    A replica no longer ready (gone, draining) is no longer sampled: each of its samples stands for
    the sampling period it was taken in. Also returns how many ready replicas are silent now. None when
    no sample falls in the window."""
    if not any(since <= sample.time <= now for sample in samples):
        return None
    samples = [sample for sample in samples if since - policy.stale_after < sample.time <= now]
    by_replica: dict[str, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.time):
        by_replica.setdefault(sample.replica, []).append(sample)
    replicas = set(by_replica) | set(ready)
    # A router's held requests are carried while no replica is ready only: once one is, the requests
    # it held are in flight there (its own samples count them), and routers are no longer scraped.
    carried = set(ready) | ({sample.replica for sample in samples if sample.held} if not ready else set())
    # Ready replicas with nothing fresh now: they may be the busy ones, so they count at the target.
    # One that answered without a value yet (a rate needs two scrapes: a replica just up, or back
    # after a blink) is not: it has served next to nothing, and counting it at the target made every
    # scale-up of a rate-scaled service overshoot by the replicas it had just added.
    silent_now = {
        replica
        for replica in ready
        if replica not in warming
        and not any(now - policy.stale_after < s.time <= now for s in by_replica.get(replica, ()))
    }
    # From the first whole second at or after the first sample: seconds before the service reported
    # anything say nothing about it (and one before its first sample would read it as idle).
    first = min(sample.time for sample in samples)
    seconds = range(max(math.floor(since) + 1, math.ceil(first)), math.floor(now) + 1)
    if not seconds:
        return None
    totals = [0.0] * len(seconds)
    for replica in replicas:
        # A ready replica's newest sample (or a router's) stands until it goes stale; one that is not
        # ready (gone, or draining) for the period it was taken in: it was ready then, and its load
        # was real (a restart or a rollout that moved it to the others does not halve it). A router's
        # held requests, once a replica is ready, only in their very second: they are that replica's
        # now. One pass over its sorted samples.
        own = by_replica.get(replica, [])
        if replica in carried:
            window = policy.stale_after
        else:
            window = 1.0 if any(sample.held for sample in own) else policy.period
        # Counted busy where it has no fresh sample: a ready replica silent now, or after its first
        # sample (before it, a replica may have been warming up: a rate needs two scrapes).
        busy_when_silent = replica in ready and replica not in warming
        ready_from = ready_since.get(replica, -math.inf)
        newest = -1  # index of its newest sample at or before the second
        for i, second in enumerate(seconds):
            while newest + 1 < len(own) and own[newest + 1].time <= second:
                newest += 1
            if newest >= 0 and own[newest].time > second - window:
                totals[i] += own[newest].value
            elif busy_when_silent and (newest >= 0 or replica in silent_now) and second >= ready_from:
                # Not before it was ready: a replica that did not exist carried no load then.
                totals[i] += policy.target
    return sum(totals) / len(totals), len(silent_now)


def decide(
    policy: Policy,
    samples: Sequence[Sample],
    ready: Sequence[str],
    current: int,
    state: State,
    now: float,
    ready_since: Mapping[str, float] | None = None,
    warming: Collection[str] = (),
) -> Decision:
    """The replicas wanted now, and why. ``ready``: the ready replicas' names; ``current``: replicas
    desired before this decision; ``ready_since``: when a ready replica was first seen ready (one not
    in it has been ready longer than the window); ``warming``: ready replicas that answered but have
    no value yet."""
    since = ready_since or {}
    stable = _average_load(samples, ready, now - policy.stable_window, now, policy, since, warming)
    panic = _average_load(samples, ready, now - policy.panic_window, now, policy, since, warming)
    recent = tuple((t, r) for t, r in state.recommendations if now - t <= policy.scale_down_delay)
    # At zero, the newest fresh sample of each router (their held requests): demand that the windows
    # have not averaged in yet (a sample off a whole second) still starts a replica now.
    demand = _fresh_demand(samples, now, policy) if current == 0 else 0.0
    windows_quiet = stable is None or panic is None or stable[0] == panic[0] == 0
    if demand > 0 and windows_quiet:
        return _bounded(policy, 1, "demand at zero replicas: starting one", demand, False, state)
    if stable is None or panic is None:
        # Holding writes nothing: a value written outside the bounds is kept as written (and served
        # clamped), not fought over.
        return Decision(
            current,
            "no fresh load samples: holding",
            None,
            False,
            State(recent, state.panic_until, state.idle_since),
        )
    stable_load, silent = stable
    panic_load = panic[0]
    if current == 0 and stable_load == 0 and panic_load == 0:
        # At zero, samples come from the routers only: none held means no demand.
        return Decision(
            _clamp(policy, 0),
            "no demand at zero replicas: holding",
            stable_load,
            False,
            State(recent, None, state.idle_since),
        )
    # Zero is reached only through scale_to_zero below, after its grace.
    wanted = max(1, _replicas_for(stable_load, policy.target))
    panic_wanted = _replicas_for(panic_load, policy.target)
    ready_count = max(len(ready), 1)
    panic_until = state.panic_until if state.panic_until is not None and now < state.panic_until else None
    in_panic = panic_wanted >= policy.panic_threshold * ready_count and panic_wanted > current
    if in_panic:
        panic_until = now + policy.stable_window
    if panic_until is not None:
        # In a panic: scale up on the short window, never down. What it asked for is remembered, so
        # the scale-down after it waits out the delay like any other.
        target = max(current, panic_wanted, wanted)
        reason = (
            f"panic: load {panic_load:.1f} over {policy.panic_window:g}s needs {panic_wanted} "
            f"(ready {len(ready)})"
        )
        panicked = State((*recent, (now, target)), panic_until, None)
        return _bounded(policy, target, reason, stable_load, True, panicked)
    # The scale-down remembers a burst too: one that is not twice the ready replicas starts no panic,
    # and remembered only through the stable window's average it let a scale-down land in the middle
    # of the next burst (10 -> 3 -> 10 every few minutes). A burst is the short window needing the
    # panic threshold times what the stable one does: its noise around a steady load is not.
    burst = panic_wanted >= policy.panic_threshold * wanted
    history = (*recent, (now, max(wanted, panic_wanted) if burst else wanted))
    # Replicas wanted and none ready yet: the service is starting (woken from zero, say). Idle time
    # counts from a ready replica on: a model that loads for longer than the routers hold a request
    # would otherwise be stopped mid-load once its first request gave up, and never serve.
    starting = current > 0 and not ready
    # Idle: no load and no request served over a whole stable window of samples (a controller that
    # just started, a new leader, has seen less than that and cannot say).
    served = any(s.served and now - policy.stable_window < s.time <= now for s in samples)
    covered = min(s.time for s in samples) <= now - policy.stable_window + policy.stale_after
    # The windows count whole seconds, so a sample taken at ``now`` off a whole second (the scrape of
    # this very tick) is not in them yet: requests it shows in flight are load, not idle time.
    busy_now = _fresh_demand(samples, now, policy) > 0
    idle = stable_load == 0 and not served and covered and not starting and not busy_now
    idle_since = (state.idle_since or now) if idle else None
    idle_for = now - idle_since if idle_since is not None else None
    # Zero is a scale-down like any other: it waits out the delay too (as Knative's scale-down-delay),
    # so a service kept warm for scale_down_delay is not cold-started after the stable window.
    if policy.scale_to_zero and idle_for is not None and idle_for >= _zero_after(policy):
        reason = f"no load for {idle_for:.0f}s: scaling to zero"
        return _bounded(policy, 0, reason, stable_load, False, State(history, None, idle_since))
    stabilized = max(r for _, r in history)
    if wanted >= current:
        target, why = wanted, "up" if wanted > current else "steady"
    else:
        target, why = max(stabilized, wanted), "down"
    note = f" ({silent} replica(s) without fresh samples counted busy)" if silent else ""
    if why == "down" and target > wanted:
        reason = (
            f"load {stable_load:.1f} needs {wanted}, but {target} was needed within "
            f"{policy.scale_down_delay:g}s: scaling down slowly{note}"
        )
    else:
        reason = f"load {stable_load:.1f} / target {policy.target:g} per replica = {wanted}{note}"
    return _bounded(policy, target, reason, stable_load, False, State(history, None, idle_since))


def _fresh_demand(samples: Sequence[Sample], now: float, policy: Policy) -> float:
    """The sum over replicas (routers, at zero) of each one's newest sample that is still fresh."""
    newest: dict[str, Sample] = {}
    for sample in sorted(samples, key=lambda sample: sample.time):
        if now - sample.time <= policy.stale_after:
            newest[sample.replica] = sample
    return sum(sample.value for sample in newest.values())


def _clamp(policy: Policy, replicas: int) -> int:
    """Within [minReplicas, maxReplicas], and never below one unless scaling to zero is allowed."""
    if replicas == 0 and policy.scale_to_zero:
        return 0
    return max(policy.min_replicas, 1, min(policy.max_replicas, replicas))


def _zero_after(policy: Policy) -> float:
    """How long a service must have been idle (after a stable window without load) to go to zero."""
    return max(policy.scale_to_zero_grace, policy.scale_down_delay)


def _bounded(
    policy: Policy, replicas: int, reason: str, load: float | None, panic: bool, state: State
) -> Decision:
    clamped = _clamp(policy, replicas)
    if clamped != replicas:
        reason += f"; clamped to {clamped} by [{policy.min_replicas}, {policy.max_replicas}]"
    return Decision(clamped, reason, load, panic, state)
