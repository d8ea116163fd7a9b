"""The reporting rank's Prometheus metrics: step, loss, throughput, step time, and the network: time and
share of a step in DDP's gradient all-reduce, and the bytes each kind of communication moves."""

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
        self.collective_share = Gauge(
            "largo_train_collective_share",
            "Share of a step's time spent in the gradient all-reduce (0..1; 0 without DDP).",
            registry=registry,
        )
        self.allreduce_bytes = Gauge(
            "largo_train_allreduce_bytes_per_step",
            "Bytes of gradients each rank all-reduces per step (0 without DDP).",
            registry=registry,
        )

        self.communication_bytes = Gauge(
            "largo_train_communication_bytes_per_step",
            "Bytes one rank sends per step by kind: data (gradients across replicas), tensor "
            "(tensor-parallel activations), pipeline (activations between stages). Computed from shapes.",
            ["kind"],
            registry=registry,
        )

    def communication(self, bytes_per_kind: dict[str, int]) -> None:
        for kind, count in bytes_per_kind.items():
            self.communication_bytes.labels(kind=kind).set(count)

    def step(self, step: int, loss: float, seconds: float, tokens_per_second: float) -> None:
        self.step_number.set(step)
        self.loss.set(loss)
        self.step_seconds.observe(seconds)
        self.tokens.set(tokens_per_second)

    def collectives(self, ddp: Any, step_seconds: float) -> None:
        """Reads DDP's own sampled timing: no hook in the gradient path, so measuring costs nothing.
        ``step_seconds``: the average step time over the same stretch, for the share of it spent in
        the all-reduce."""
        average = ddp._get_ddp_logging_data().get("avg_backward_comm_time", 0) / 1e9
        self.collective_seconds.set(average)
        self.collective_share.set(min(1.0, average / step_seconds) if step_seconds > 0 else 0.0)
        # DDP all-reduces every gradient once per step: the bytes of the trainable parameters.
        self.allreduce_bytes.set(
            sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
        )


def serve(port: int) -> None:
    start_http_server(port)
