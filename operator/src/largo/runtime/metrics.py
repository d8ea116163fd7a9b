"""Rank 0's Prometheus metrics: step, loss, throughput, step time and time in collectives."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram, start_http_server


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
        self.collective_seconds = Gauge(
            "largo_train_collective_seconds",
            "Average time of a step's gradient all-reduce, as DDP samples it (0 without DDP).",
            registry=registry,
        )

    def step(self, step: int, loss: float, seconds: float, tokens_per_second: float) -> None:
        self.step_number.set(step)
        self.loss.set(loss)
        self.step_seconds.observe(seconds)
        self.tokens.set(tokens_per_second)

    def collectives(self, ddp: Any) -> None:
        """Reads DDP's own sampled timing: no hook in the gradient path, so measuring costs nothing."""
        average = ddp._get_ddp_logging_data().get("avg_backward_comm_time", 0)
        self.collective_seconds.set(average / 1e9)


def serve(port: int) -> None:
    start_http_server(port)
