"""Rank 0's Prometheus metrics: step, loss, throughput, step time and time in collectives.

No ``from __future__ import annotations`` here: DDP checks a communication hook's annotations at
run time, against the real ``GradBucket`` and ``Future[Tensor]`` objects.
"""

import time
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from torch._C._distributed_c10d import GradBucket  # what torch.distributed exports as GradBucket


class TrainMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.step_number = Gauge("largo_train_step", "Optimizer steps completed.", registry=registry)
        self.loss = Gauge("largo_train_loss", "Loss of the latest step on rank 0.", registry=registry)
        self.tokens = Gauge(
            "largo_train_tokens_per_second", "Tokens processed per second, all ranks.", registry=registry
        )
        self.step_seconds = Histogram(
            "largo_train_step_seconds",
            "Wall time of one training step on rank 0.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.collective_seconds = Counter(
            "largo_train_collective_seconds",
            "Time from launching a gradient all-reduce to its completion, summed.",
            registry=registry,
        )

    def step(self, step: int, loss: float, seconds: float, tokens_per_second: float) -> None:
        self.step_number.set(step)
        self.loss.set(loss)
        self.step_seconds.observe(seconds)
        self.tokens.set(tokens_per_second)


def serve(port: int) -> None:
    start_http_server(port)


Hook = Callable[[Any, GradBucket], torch.futures.Future[torch.Tensor]]


def timed_allreduce(recorder: TrainMetrics | None, hook: Hook) -> Hook:
    """A DDP communication hook that runs ``hook`` and counts the time until each bucket is reduced."""

    def timed(state: Any, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
        started = time.perf_counter()
        future = hook(state, bucket)
        if recorder is None:
            return future

        def done(completed: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            recorder.collective_seconds.inc(time.perf_counter() - started)
            return completed.value()

        return future.then(done)

    return timed
