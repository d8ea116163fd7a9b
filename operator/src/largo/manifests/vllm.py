"""The `vllm` runtime preset: what each member of a replica group runs.

A model that fits one pod needs nothing but `vllm serve`. A model split over several pods needs one
Ray cluster per replica group, because vLLM places its pipeline stages on Ray nodes: the leader
starts the Ray head and then the server, which puts one tensor-parallel rank on each GPU of a pod and
one pipeline stage on each pod; the workers only join the head and wait. A shell is used only where
steps are chained, and every value placed in a shell string is quoted, so neither a model path nor a
user argument can run a command of its own.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from largo.api.v1alpha1 import GPU_RESOURCE
from largo.api.v1alpha1.common import RAY_PORT as RAY_PORT

# Pinned, not `latest`: the arguments below are those of this release. Stock images of later
# releases no longer ship Ray, which multi-pod replicas need.
VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
# How long a worker waits for the leader's Ray head to accept connections before it fails. The
# members of a group start together, and the head takes a moment to come up.
RAY_JOIN_TIMEOUT_SECONDS = 600
RAY_JOIN_POLL_SECONDS = 5

MSG_NEEDS_GPUS = (
    f"spec.resourcesPerNode['{GPU_RESOURCE}'] must be at least 1 with spec.runtime.type vllm: "
    "vLLM serves on GPUs only"
)
MSG_NEEDS_PODS = "spec.nodesPerReplica must be at least 1"

# Exits 0 once a TCP connection to argv[1]:argv[2] succeeds; no user data is part of the code.
_PROBE = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()"


@dataclass(frozen=True, slots=True)
class VllmLaunch:
    """The container's command and args."""

    command: list[str]
    args: list[str]


def vllm_launch(
    *,
    model_dir: str,
    served_model_name: str,
    gpus_per_pod: int,
    pods_per_replica: int,
    member: int,
    leader_address: str,
    port: int,
    extra_args: Sequence[str] = (),
) -> VllmLaunch:
    """The command of member `member` of a replica group of `pods_per_replica` pods.

    Tensor parallelism spans the GPUs of a pod and pipeline parallelism the pods, so the fast
    intra-node links carry the all-reduces and only activations cross nodes. `extra_args` follow
    ours, so a flag the user repeats wins (vLLM keeps the last value).
    """
    if gpus_per_pod < 1:
        raise ValueError(MSG_NEEDS_GPUS)
    if pods_per_replica < 1:
        raise ValueError(MSG_NEEDS_PODS)
    if not 0 <= member < pods_per_replica:
        raise ValueError(f"member {member} is outside a replica group of {pods_per_replica} pods")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not a TCP port")
    if not model_dir:
        raise ValueError("model_dir must not be empty")
    if not served_model_name:
        raise ValueError("served_model_name must not be empty")

    serve = [
        model_dir,
        "--served-model-name",
        served_model_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(gpus_per_pod),
    ]
    if pods_per_replica == 1:
        return VllmLaunch(command=["vllm", "serve"], args=[*serve, *extra_args])

    if not leader_address:
        raise ValueError("leader_address must not be empty when a replica has several pods")
    if member == 0:
        serve += [
            "--pipeline-parallel-size",
            str(pods_per_replica),
            "--distributed-executor-backend",
            "ray",
        ]
        script = (
            f"ray start --head --port={RAY_PORT} && exec {shlex.join(['vllm', 'serve', *serve, *extra_args])}"
        )
        return VllmLaunch(command=["/bin/sh", "-c"], args=[script])
    return VllmLaunch(command=["/bin/sh", "-c"], args=[_worker_script(leader_address)])


def _worker_script(leader_address: str) -> str:
    """Wait (bounded) for the leader's Ray head, then become a Ray node for the life of the pod."""
    head = shlex.quote(leader_address)
    address = shlex.quote(f"{leader_address}:{RAY_PORT}")
    return "; ".join(
        [
            "waited=0",
            f"until python3 -c {shlex.quote(_PROBE)} {head} {RAY_PORT} 2>/dev/null",
            f"do if [ $waited -ge {RAY_JOIN_TIMEOUT_SECONDS} ]",
            f"then echo 'no Ray head at '{address}' after {RAY_JOIN_TIMEOUT_SECONDS}s' >&2",
            "exit 1",
            "fi",
            f"sleep {RAY_JOIN_POLL_SECONDS}",
            f"waited=$((waited + {RAY_JOIN_POLL_SECONDS}))",
            "done",
            f"exec ray start --address={address} --block",
        ]
    )


def vllm_metric_names() -> dict[str, str]:
    """largo's autoscaling metrics -> the Prometheus series vLLM's server exports on `/metrics`.

    `vllm:request_success_total` has a `finished_reason` label (stop, length, abort, ...): sum over it.
    """
    return {
        "inFlight": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "requestsTotal": "vllm:request_success_total",
    }
