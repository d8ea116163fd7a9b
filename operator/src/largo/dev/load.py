"""A small load generator for OpenAI-compatible completions (the demo's burst, the serving e2e tests):
``concurrency`` clients, each sending its next request when the last one is answered, for ``duration``
seconds. Every request is counted: answered (2xx) or failed, with the failures' reasons kept."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)  # seconds of each answered request
    failures: Counter[str] = field(default_factory=Counter)  # "HTTP 503", "ClientConnectorError", ...

    @property
    def answered(self) -> int:
        return len(self.latencies)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def percentile(self, share: float) -> float:
        """The ``share`` quantile of answered requests' latency (nearest rank); 0 with none."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]

    def summary(self) -> str:
        return (
            f"{self.answered} answered, {self.failed} failed"
            + (
                f" ({', '.join(f'{k}: {v}' for k, v in self.failures.most_common())})"
                if self.failures
                else ""
            )
            + f"; latency p50 {self.percentile(0.5):.2f}s, p99 {self.percentile(0.99):.2f}s"
        )


async def run(
    url: str,
    prompts: list[str],
    concurrency: int,
    duration: float,
    max_tokens: int = 32,
    stop: asyncio.Event | None = None,
) -> Results:
    """Drives ``url`` (…/v1/completions) until ``duration`` passes or ``stop`` is set."""
    results = Results()
    deadline = time.monotonic() + duration
    stopping = stop or asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        sent = 0
        while time.monotonic() < deadline and not stopping.is_set():
            prompt = prompts[(index + sent * concurrency) % len(prompts)]
            sent += 1
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            started = time.monotonic()
            try:
                async with session.post(
                    url, data=json.dumps(body), headers={"Content-Type": "application/json"}
                ) as r:
                    await r.read()
                    if r.status // 100 == 2:
                        results.latencies.append(time.monotonic() - started)
                    else:
                        results.failures[f"HTTP {r.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as error:
                results.failures[type(error).__name__] += 1

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    return results


def complete(url: str, prompt: str, max_tokens: int = 32) -> str:
    """One greedy completion, synchronously: its text."""

    async def once() -> str:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(url, json=body) as answer:
            answer.raise_for_status()
            text: str = (await answer.json())["choices"][0]["text"]
            return text

    return asyncio.run(once())
