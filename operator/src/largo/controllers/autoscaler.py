"""The autoscaling loop: every period (2 s; HPA syncs every 15 s, KEDA polls every 30 s), each
InferenceService with ``spec.autoscaling`` has its ready leaders' ``/metrics`` scraped (with none
ready, its routers', whose held requests are the demand that brings a service back from zero), the pure
``largo.policy.autoscale.decide`` asked for the replicas it wants, and ``spec.replicas`` written when
that changes, with the decision's reason and load in an annotation for the service's status.

What the loop remembers (samples, the decision state, counters) is small and rebuilt by running: a
new leader of the operator starts from the replicas it finds (``State.starting``), so its first
decisions hold and a scale-down still waits out its delay. A service that a HorizontalPodAutoscaler
also targets is left alone (the service says ``ScalingConflict``): two writers would flap its replicas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from largo.api.v1alpha1 import GROUP, InferenceServiceSpec, RuntimeType, ScalingMetric
from largo.controllers.kube import ConflictError, Kube
from largo.controllers.scheduler import IndexLike, KeyedIndex, index_values
from largo.controllers.state import JobKey, ServiceEntry
from largo.manifests import names
from largo.policy.autoscale import Policy, Sample, State, decide
from largo.policy.conditions import timestamp
from largo.policy.load import Counter, finished_counter, held_requests, replica_load

logger = logging.getLogger(__name__)

# Set with spec.replicas by the loop: why, and on what load (read by the service's reconcile).
ANNOTATION_SCALING = f"{GROUP}/scaling-decision"

Scrape = Callable[[str], Awaitable[str]]


def policy_of(spec: InferenceServiceSpec, period: float = 2.0) -> Policy:
    """The service's autoscaling policy, its replicas sampled every ``period`` seconds."""
    scaling = spec.autoscaling
    assert scaling is not None
    window = float(scaling.stable_window_seconds)
    return Policy(
        # A sample stands until the next two scrapes have had their chance: at a period over 4 s the
        # default 10 s would read the end of every period as idle.
        stale_after=max(10.0, 2.5 * period),
        period=period,
        min_replicas=scaling.min_replicas,
        max_replicas=scaling.max_replicas,
        target=scaling.target,
        stable_window=window,
        # Knative's default: a tenth of the stable window.
        panic_window=max(window / 10, 1.0),
        scale_down_delay=float(scaling.scale_down_delay_seconds),
        scale_to_zero=scaling.scale_to_zero,
    )


def runtime_of(pod: Mapping[str, Any], spec: InferenceServiceSpec) -> RuntimeType:
    """The runtime a leader runs, by its own label: during a rollout from one runtime to another the
    old leaders still run the old one (read as the spec's, each was scraped at the wrong place or for
    the wrong names, and counted busy)."""
    label = ((pod.get("metadata") or {}).get("labels") or {}).get(names.LABEL_RUNTIME)
    try:
        return RuntimeType(label) if label else spec.runtime.type
    except ValueError:
        return spec.runtime.type


def _http_port(pod: Mapping[str, Any], spec: InferenceServiceSpec) -> int:
    """The leader's own `http` port (a rollout may be changing the spec's)."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == names.HTTP_PORT_NAME and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return spec.runtime.port


def metrics_url(pod: Mapping[str, Any], spec: InferenceServiceSpec) -> str | None:
    """Where a leader's load is read: vLLM on its HTTP port, largo's server (and a custom one, which
    speaks the same names) on `metrics`."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = _http_port(pod, spec) if runtime_of(pod, spec) is RuntimeType.VLLM else names.METRICS_PORT
    return f"http://{names.host_port(ip, port)}/metrics"


def serving(pods: list[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Pods that serve now (Running, Ready, not terminating), by name."""
    out = {}
    for pod in pods:
        metadata = pod.get("metadata") or {}
        status = pod.get("status") or {}
        if metadata.get("deletionTimestamp"):
            continue
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        if status.get("phase") == "Running" and ready:
            out[str(metadata.get("name"))] = pod
    return out


def ready_leaders(pods: list[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Leader pods that serve now, by name."""
    leaders = [
        p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(names.LABEL_MEMBER) == "0"
    ]
    return serving(leaders)


def router_metrics_url(pod: Mapping[str, Any]) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    return f"http://{names.host_port(ip, names.METRICS_PORT)}/metrics" if ip else None


@dataclass
class _Memory:
    samples: list[Sample] = field(default_factory=list)
    state: State = field(default_factory=State)
    counters: dict[str, Counter] = field(default_factory=dict)
    # When each ready leader was first seen ready (-inf: already ready when the loop started).
    ready_since: dict[str, float] = field(default_factory=dict)


# A replica's /metrics is a few kB; more is not a metrics page (and is parsed on the event loop).
SCRAPE_MAX_BYTES = 1024 * 1024


async def http_scrape(url: str) -> str:
    """The text at ``url``; ValueError when it is larger than SCRAPE_MAX_BYTES (read no further)."""
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, allow_redirects=False) as response,
    ):
        response.raise_for_status()
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > SCRAPE_MAX_BYTES:
                raise ValueError(f"{url}: more than {SCRAPE_MAX_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


@dataclass
class Autoscaler:
    kube: Kube
    services: IndexLike
    pods: KeyedIndex
    clock: Callable[[], float]
    scrape: Scrape = http_scrape
    # (namespace, service) -> its router pods
    routers: KeyedIndex = field(default_factory=dict)
    period: float = 2.0
    # Told of each change it writes: "up" or "down".
    observe_decision: Callable[[str], None] = lambda direction: None
    # (namespace, service) -> names of the HorizontalPodAutoscalers that target it
    autoscalers: KeyedIndex = field(default_factory=dict)
    _memory: dict[JobKey, _Memory] = field(default_factory=dict)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("autoscaling pass failed; retrying")
            await asyncio.sleep(self.period)

    async def tick(self) -> None:
        entries: list[ServiceEntry] = index_values(self.services)
        scaled = [
            e
            for e in entries
            if e.service is not None
            and e.service.spec.autoscaling is not None
            and not list(self.autoscalers.get(e.key) or [])
        ]
        for key in set(self._memory) - {e.key for e in scaled}:
            del self._memory[key]
        await asyncio.gather(*(self._decide(entry) for entry in scaled))

    async def _decide(self, entry: ServiceEntry) -> None:
        assert entry.service is not None
        spec = entry.service.spec
        scaling = spec.autoscaling
        assert scaling is not None
        memory = self._memory.get(entry.key)
        leaders = ready_leaders(list(self.pods.get(entry.key) or []))
        if memory is None:
            memory = self._memory[entry.key] = _Memory(
                state=State.starting(spec.replicas, self.clock()),
                # Found ready: for all the loop knows, ready for longer than any window.
                ready_since=dict.fromkeys(leaders, -math.inf),
            )
        urls = {name: metrics_url(pod, spec) for name, pod in leaders.items()}
        texts = await asyncio.gather(
            *(self.scrape(url) for url in urls.values() if url is not None), return_exceptions=True
        )
        now = self.clock()
        for name in leaders:
            memory.ready_since.setdefault(name, now)
        warming: set[str] = set()
        for name, text in zip([n for n, u in urls.items() if u is not None], texts, strict=True):
            if isinstance(text, BaseException):
                # A leader that does not answer counts as busy (the policy's rule for silence).
                continue
            previous = memory.counters.get(name)
            runtime = runtime_of(leaders[name], spec)
            value, counter = replica_load(text, scaling.metric, runtime, now, previous)
            if value is None and counter is not None and counter is not previous:
                # It answered with a counter but no rate yet (its first scrape, or a reset: a rate needs
                # two): not silent, so not counted at the target.
                warming.add(name)
            if scaling.metric is ScalingMetric.IN_FLIGHT:
                counter = finished_counter(text, runtime, now) or previous
            if counter is not None:
                memory.counters[name] = counter
            served = previous is not None and counter is not None and counter.total > previous.total
            if value is not None:
                memory.samples.append(Sample(now, name, value, served=served))
        if not leaders:
            memory.samples += await self._held(entry.key, now)
        policy = policy_of(spec, self.period)
        horizon = now - policy.stable_window - policy.stale_after
        memory.samples = [s for s in memory.samples if s.time > horizon]
        for gone in set(memory.counters) - set(leaders):
            del memory.counters[gone]
        for gone in set(memory.ready_since) - set(leaders):
            del memory.ready_since[gone]
        decision = decide(
            policy,
            memory.samples,
            sorted(leaders),
            spec.replicas,
            memory.state,
            now,
            ready_since=memory.ready_since,
            warming=warming,
        )
        memory.state = decision.state
        if decision.replicas == spec.replicas:
            return
        note = {
            "to": decision.replicas,
            "reason": decision.reason,
            "time": timestamp(now),
            **({"metricValue": round(decision.load, 3)} if decision.load is not None else {}),
        }
        logger.info(
            "%s/%s: replicas %d -> %d: %s", *entry.key, spec.replicas, decision.replicas, decision.reason
        )
        try:
            await self.kube.scale_service(
                *entry.key, entry.resource_version, decision.replicas, {ANNOTATION_SCALING: json.dumps(note)}
            )
        except ConflictError:
            return  # the service changed meanwhile: the next period decides on the new version
        self.observe_decision("up" if decision.replicas > spec.replicas else "down")

    async def _held(self, key: JobKey, now: float) -> list[Sample]:
        """Requests the service's routers hold for want of a ready replica, one sample per router."""
        urls = {
            name: router_metrics_url(pod) for name, pod in serving(list(self.routers.get(key) or [])).items()
        }
        scraped = {name: url for name, url in urls.items() if url is not None}
        texts = await asyncio.gather(*(self.scrape(url) for url in scraped.values()), return_exceptions=True)
        samples = []
        for name, text in zip(scraped, texts, strict=True):
            held = None if isinstance(text, BaseException) else held_requests(text)
            if held is not None:
                samples.append(Sample(now, f"router/{name}", held, held=True))
        return samples
