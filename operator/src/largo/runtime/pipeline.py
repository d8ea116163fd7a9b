"""A replica split over several pods: pipeline stages over torch.distributed (gloo on CPU, NCCL on GPUs,
or gloo between GPUs, through host memory, where NCCL cannot run).

Member 0, the leader, embeds the tokens, runs its layers and sends the hidden states on; each member
runs its layers (``stage_layers``) over its own slice of the KV cache and passes them to the next; the
last one computes the logits and sends them back to the leader, which samples. Every step is one
message down the chain: a header (operation, batch, length), the requests' cache slots and positions
(for a prefill, each prompt's last position), then the hidden states. The leader drives the pipeline
from its engine's thread; the other members only serve it (``run_member``), and exit when it goes away.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from largo.runtime.engine import Running, Stage

logger = logging.getLogger(__name__)

PREFILL, DECODE, STOP, HEARTBEAT = 0, 1, 2, 3
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
) -> None:
    """Forms the replica's process group (the leader hosts the store, as rank 0 does for training)."""
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


def transport_device(device: torch.device) -> torch.device:
    """Where the tensors between stages live: the GPU under NCCL, host memory under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _send(op: int, slots: list[int], positions: list[int], x: torch.Tensor, to: int) -> None:
    on = transport_device(x.device)
    dist.send(torch.tensor([op, x.shape[0], x.shape[1]], dtype=torch.int64, device=on), to)
    dist.send(torch.tensor(slots, dtype=torch.int64, device=on), to)
    dist.send(torch.tensor(positions, dtype=torch.int64, device=on), to)
    dist.send(x.to(on).contiguous(), to)


class PipelineForward:
    """The leader's side: its own stage here, the rest down the chain."""

    def __init__(self, stage: Stage, members: int, vocabulary: int) -> None:
        if not stage.first:
            raise ValueError("the leader holds the first stage")
        self.stage = stage
        self.members = members
        self.vocabulary = vocabulary

    def _through(self, op: int, slots: list[int], positions: list[int], x: torch.Tensor) -> torch.Tensor:
        """The logits, in host memory (where the engine samples), of ``x`` sent down the chain."""
        _send(op, slots, positions, x, 1)
        on = transport_device(self.stage.device)
        logits = torch.empty((x.shape[0], self.vocabulary), dtype=x.dtype, device=on)
        dist.recv(logits, self.members - 1)
        return logits.cpu()

    def step(
        self, arrivals: list[tuple[int, list[int]]], running: Running | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A prefill and a decoding step down the chain, one after the other."""
        slots, prompts = [slot for slot, _ in arrivals], [tokens for _, tokens in arrivals]
        prefilled = self.prefill(slots, prompts) if arrivals else None
        decoded = self.decode(running.slots, running.positions, running.tokens) if running else None
        return prefilled, decoded

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """For a prefill the positions sent down are each prompt's last one (padded to the longest)."""
        hidden, last = self.stage.prefill_prompts(slots, prompts)
        return self._through(PREFILL, slots, last.tolist(), hidden)

    def decode(self, slots: list[int], positions: list[int], tokens: list[int]) -> torch.Tensor:
        return self._through(DECODE, slots, positions, self.stage.decode_tokens(slots, positions, tokens))

    def heartbeat(self) -> None:
        """Keeps an idle pipeline's members from timing out (and finds a dead one early)."""
        _send(HEARTBEAT, [], [], torch.zeros((0, 0, self.stage.width), device=self.stage.device), 1)

    def close(self) -> None:
        """Tells the members to exit (they also exit when the leader's connection drops)."""
        _send(STOP, [], [], torch.zeros((0, 0, self.stage.width), device=self.stage.device), 1)


def run_member(stage: Stage, member: int, members: int) -> None:
    """A worker's whole life: receive, run its layers, pass on, until the leader stops or goes away."""
    source, target = member - 1, (member + 1) % members
    on = transport_device(stage.device)
    while True:
        header = torch.empty(3, dtype=torch.int64, device=on)
        dist.recv(header, source)
        op, batch, length = (int(value) for value in header.tolist())
        slots = torch.empty(batch, dtype=torch.int64, device=on)
        positions = torch.empty(batch, dtype=torch.int64, device=on)
        dist.recv(slots, source)
        dist.recv(positions, source)
        x = torch.empty((batch, length, stage.width), device=on)
        dist.recv(x, source)
        x, slots, positions = x.to(stage.device), slots.to(stage.device), positions.to(stage.device)
        if op in (STOP, HEARTBEAT):
            if not stage.last:
                _send(op, [], [], x, target)
            if op == STOP:
                return
            continue
        with torch.inference_mode():
            x = (
                stage.prefill(x, slots)
                if op == PREFILL
                else stage.decode(x, slots.tolist(), positions, int(positions.max()) + 1)
            )
            if stage.last:
                last = positions if op == PREFILL else None
                dist.send(stage.logits(x, last).to(on).contiguous(), 0)
            else:
                _send(op, slots.tolist(), positions.tolist(), x, target)
