"""The reporting rank's Prometheus metrics: step, loss, throughput, step time, and the network: the time
and share of a step spent communicating, and the time and bytes of each kind of communication."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram, start_http_server


class TrainMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.step_number = Gauge("largo_train_step", "Optimizer steps completed.", registry=registry)
        self.loss = Gauge(
            "largo_train_loss",
            "Loss of the latest logged step (every --log-every steps), over the step's whole batch.",
            registry=registry,
        )
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
            "Time of a step spent communicating: DDP's sampled all-reduce time, or the sum over kinds of "
            "largo_train_communication_seconds_per_step (sampled steps on gloo).",
            registry=registry,
        )
        self.collective_share = Gauge(
            "largo_train_collective_share",
            "Share of a step's time spent communicating (0..1): largo_train_collective_seconds over the "
            "average step time.",
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

        self.communication_seconds = Gauge(
            "largo_train_communication_seconds_per_step",
            "Seconds of a step in each kind of communication (data, tensor, pipeline), as the reporting "
            "rank sees it: DDP's sampled all-reduce time, or gloo's own timing of its operations in a "
            "profiled step every --communication-sample-every steps (including waits for peers).",
            ["kind"],
            registry=registry,
        )
        for kind in ("data", "tensor", "pipeline"):  # every series from the start, 0 until measured
            self.communication_seconds.labels(kind=kind).set(0)

    def communication_time(self, seconds_per_kind: dict[str, float], step_seconds: float) -> None:
        """One sampled step's communication by kind; ``step_seconds``: the average step time, for the
        share (a profiled step is itself slower)."""
        for kind, seconds in seconds_per_kind.items():
            self.communication_seconds.labels(kind=kind).set(seconds)
        total = sum(seconds_per_kind.values())
        self.collective_seconds.set(total)
        self.collective_share.set(min(1.0, total / step_seconds) if step_seconds > 0 else 0.0)

    def communication(self, bytes_per_kind: dict[str, int]) -> None:
        for kind, count in bytes_per_kind.items():
            self.communication_bytes.labels(kind=kind).set(count)

    def step(self, step: int, loss: float | None, seconds: float, tokens_per_second: float) -> None:
        """``loss``: None until the first logged step."""
        self.step_number.set(step)
        if loss is not None:
            self.loss.set(loss)
        self.step_seconds.observe(seconds)
        self.tokens.set(tokens_per_second)

    def collectives(self, ddp: Any, step_seconds: float) -> None:
        """Reads DDP's own sampled timing: no hook in the gradient path, so measuring costs nothing.
        ``step_seconds``: the average step time over the same stretch, for the share of it spent in
        the all-reduce."""
        average = ddp._get_ddp_logging_data().get("avg_backward_comm_time", 0) / 1e9
        self.communication_time({"data": average, "tensor": 0.0, "pipeline": 0.0}, step_seconds)
        # DDP all-reduces every gradient once per step: the bytes of the trainable parameters.
        self.allreduce_bytes.set(
            sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
        )


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """The metrics page on every address: IPv6's wildcard takes IPv4 too (Linux's default), and a pod
    without IPv6 serves on IPv4's. Prometheus scrapes the pod's IP, an IPv6 one in an IPv6 cluster."""
    try:
        start_http_server(port, addr="::", registry=registry)
    except OSError:
        start_http_server(port, addr="0.0.0.0", registry=registry)
