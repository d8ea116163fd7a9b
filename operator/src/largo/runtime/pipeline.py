"""A replica split over several pods: pipeline stages over torch.distributed (gloo on CPU, NCCL on GPUs,
or gloo between GPUs, through host memory, where NCCL cannot run).

Member 0, the leader, embeds the tokens, runs its layers and sends the hidden states on; each member
runs its layers (``stage_layers``) over its own slice of the KV cache and passes them to the next; the
last one computes the logits and sends them back to the leader, which samples. Every iteration is one
message down the chain, as it is one pass on a single pod (``Stage.step``): a header (operation, running
requests, new prompts, the prompts' padded length), the running requests' cache slots and positions and
the prompts' slots and last positions (``Shape``), then the hidden states of every row (the running
requests' tokens, then the prompts'). The leader drives the pipeline from its engine's thread; the
other members only serve it (``run_member``), and exit when it goes away.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from largo.runtime.engine import Decode, Prefill, Running, Stage, split_logits

logger = logging.getLogger(__name__)

STEP, STOP, HEARTBEAT = 0, 2, 3
# A member's receive times out after this; the leader says it is alive every twentieth of it while idle.
TIMEOUT_SECONDS = 600.0


def heartbeat_seconds(timeout: float) -> float:
    return timeout / 20


def join(
    leader_address: str,
    port: int,
    member: int,
    members: int,
    timeout: float = TIMEOUT_SECONDS,
    backend: str = "gloo",
    device: torch.device | None = None,
) -> None:
    """Forms the replica's process group (the leader hosts the store, as rank 0 does for training). Under
    NCCL the group's operations (and its object collectives) run on the current GPU: ``device``'s."""
    gpu = gpu_index(device)
    if backend == "nccl" and gpu is not None:
        torch.cuda.set_device(gpu)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{leader_address}:{port}",
        rank=member,
        world_size=members,
        timeout=datetime.timedelta(seconds=timeout),
    )
    # NCCL forms its communicator lazily, at the first operation: one now, so that a group that cannot
    # form (two stages on one GPU, for one) fails here, before the leader reports ready.
    on = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    dist.all_reduce(torch.zeros(1, device=on))


def gpu_index(device: torch.device | None) -> int | None:
    """The GPU ``device`` names, if it names one: a bare ``cuda`` (``--device cuda``, or ``auto`` on a GPU)
    is the current GPU, which ``torch.cuda.set_device`` cannot take."""
    if device is None or device.type != "cuda":
        return None
    return device.index


def transport_device(device: torch.device) -> torch.device:
    """Where the tensors between stages live: the GPU under NCCL, host memory under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


@dataclass(frozen=True, slots=True)
class Shape:
    """What an iteration's rows are: ``running`` requests' next tokens at ``positions`` in ``slots``, then
    ``prompts`` new prompts padded to ``length`` in ``prompt_slots``, each ending at ``last``."""

    running: int
    slots: list[int]
    positions: list[int]
    prompts: int
    length: int
    prompt_slots: list[int]
    last: list[int]

    @property
    def rows(self) -> int:
        return self.running + self.prompts * self.length

    def split(self, x: torch.Tensor) -> tuple[Prefill | None, Decode | None]:
        """The rows ([rows, width]) as ``Stage.step`` takes them."""
        on, width = x.device, x.shape[-1]
        decode = None
        if self.running:
            positions = torch.tensor(self.positions, device=on)
            rows = x[: self.running].view(self.running, 1, width)
            decode = Decode(rows, self.slots, positions, 1 + max(self.positions))
        prefill = None
        if self.prompts:
            rows = x[self.running :].view(self.prompts, self.length, width)
            prefill = Prefill(rows, torch.tensor(self.prompt_slots, device=on))
        return prefill, decode


_NOTHING = Shape(0, [], [], 0, 0, [], [])


def _rows(prefilled: torch.Tensor | None, decoded: torch.Tensor | None) -> torch.Tensor:
    """``Stage.step``'s outputs back into rows: the running requests', then the prompts'."""
    rows = [t.reshape(-1, t.shape[-1]) for t in (decoded, prefilled) if t is not None]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _send(op: int, shape: Shape, x: torch.Tensor, to: int) -> None:
    on = transport_device(x.device)
    header = [op, shape.running, shape.prompts, shape.length]
    indices = [*shape.slots, *shape.positions, *shape.prompt_slots, *shape.last]
    dist.send(torch.tensor(header, dtype=torch.int64, device=on), to)
    if indices:
        dist.send(torch.tensor(indices, dtype=torch.int64, device=on), to)
    dist.send(x.to(on).contiguous(), to)


def _receive(source: int, stage: Stage, on: torch.device) -> tuple[int, Shape, torch.Tensor]:
    header = torch.empty(4, dtype=torch.int64, device=on)
    dist.recv(header, source)
    op, running, prompts, length = (int(value) for value in header.tolist())
    values: list[int] = []
    if running or prompts:
        indices = torch.empty(2 * (running + prompts), dtype=torch.int64, device=on)
        dist.recv(indices, source)
        values = indices.tolist()
    at = 2 * running
    shape = Shape(
        running, values[:running], values[running:at], prompts, length,
        values[at : at + prompts], values[at + prompts :],
    )  # fmt: skip
    x = torch.empty((shape.rows, stage.width), dtype=stage.dtype, device=on)
    dist.recv(x, source)
    return op, shape, x


class PipelineForward:
    """The leader's side: its own stage here, the rest down the chain."""

    def __init__(self, stage: Stage, members: int, vocabulary: int) -> None:
        if not stage.first:
            raise ValueError("the leader holds the first stage")
        self.stage = stage
        self.members = members
        self.vocabulary = vocabulary

    def step(
        self, arrivals: list[tuple[int, list[int]]], running: Running | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This stage's layers here, the rest down the chain: one message per iteration each way."""
        stage = self.stage
        prefill, last, decode = stage.embed_step(arrivals, running)
        prefilled, decoded = stage.step(prefill, decode)
        shape = Shape(
            len(running.slots) if running else 0,
            running.slots if running else [],
            running.positions if running else [],
            len(arrivals),
            prefill.x.shape[1] if prefill is not None else 0,
            [slot for slot, _ in arrivals],
            last,
        )
        _send(STEP, shape, _rows(prefilled, decoded), 1)
        on = transport_device(stage.device)
        logits = torch.empty((shape.running + shape.prompts, self.vocabulary), device=on)
        dist.recv(logits, self.members - 1)
        return split_logits(logits.cpu(), arrivals, running)  # the engine samples in host memory

    def heartbeat(self) -> None:
        """Keeps an idle pipeline's members from timing out (and finds a dead one early)."""
        _send(HEARTBEAT, _NOTHING, self.stage.nothing(), 1)

    def close(self) -> None:
        """Tells the members to exit (they also exit when the leader's connection drops)."""
        _send(STOP, _NOTHING, self.stage.nothing(), 1)


def run_member(stage: Stage, member: int, members: int) -> None:
    """A worker's whole life: receive, run its layers, pass on, until the leader stops or goes away."""
    source, target = member - 1, (member + 1) % members
    on = transport_device(stage.device)
    while True:
        op, shape, x = _receive(source, stage, on)
        if op in (STOP, HEARTBEAT):
            if not stage.last:
                _send(op, shape, x, target)
            if op == STOP:
                return
            continue
        with torch.inference_mode():
            prefilled, decoded = stage.step(*shape.split(x.to(stage.device)))
            if not stage.last:
                _send(STEP, shape, _rows(prefilled, decoded), target)
                continue
            logits = stage.step_logits(prefilled, decoded, shape.last)  # what the leader samples from
            dist.send(logits.to(on).contiguous(), 0)
