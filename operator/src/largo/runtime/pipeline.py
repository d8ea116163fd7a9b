"""A replica split over several pods: pipeline stages over torch.distributed (gloo on CPU, NCCL on GPUs).

Member 0, the leader, embeds the tokens, runs its layers and sends the hidden states on; each member
runs its layers (``stage_layers``) over its own slice of the KV cache and passes them to the next; the
last one computes the logits and sends them back to the leader, which samples. Every step is one
message down the chain: a header (operation, batch, length), the requests' cache slots and positions,
then the hidden states. The leader drives the pipeline from its engine's thread; the other members
only serve it (``run_member``), and exit when it goes away.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from largo.runtime.engine import Stage

logger = logging.getLogger(__name__)

PREFILL, DECODE, STOP, HEARTBEAT = 0, 1, 2, 3
# A member's receive times out after this; the leader says it is alive every twentieth of it while idle.
TIMEOUT_SECONDS = 600.0


def heartbeat_seconds(timeout: float) -> float:
    return timeout / 20


def join(leader_address: str, port: int, member: int, members: int, timeout: float = TIMEOUT_SECONDS) -> None:
    """Forms the replica's process group (the leader hosts the store, as rank 0 does for training).

    gloo: the stages pass CPU tensors (the model runs on the CPU here); a GPU pipeline would use NCCL."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{leader_address}:{port}",
        rank=member,
        world_size=members,
        timeout=datetime.timedelta(seconds=timeout),
    )


def _send(op: int, slots: list[int], positions: list[int], x: torch.Tensor, to: int) -> None:
    dist.send(torch.tensor([op, x.shape[0], x.shape[1]], dtype=torch.int64), to)
    dist.send(torch.tensor(slots, dtype=torch.int64), to)
    dist.send(torch.tensor(positions, dtype=torch.int64), to)
    dist.send(x.contiguous(), to)


class PipelineForward:
    """The leader's side: its own stage here, the rest down the chain."""

    def __init__(self, stage: Stage, members: int, vocabulary: int) -> None:
        if not stage.first:
            raise ValueError("the leader holds the first stage")
        self.stage = stage
        self.members = members
        self.vocabulary = vocabulary

    def _through(self, op: int, slots: list[int], positions: list[int], x: torch.Tensor) -> torch.Tensor:
        _send(op, slots, positions, x, 1)
        logits = torch.empty((x.shape[0], self.vocabulary), dtype=x.dtype)
        dist.recv(logits, self.members - 1)
        return logits

    def prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        stage = self.stage
        x = stage.embed(torch.tensor([tokens]), torch.arange(len(tokens)))
        return self._through(PREFILL, [slot], [len(tokens)], stage.prefill(x, slot))[0]

    def decode(self, slots: list[int], positions: list[int], tokens: list[int]) -> torch.Tensor:
        stage = self.stage
        at = torch.tensor(positions)
        x = stage.embed(torch.tensor(tokens)[:, None], at[:, None])
        return self._through(DECODE, slots, positions, stage.decode(x, torch.tensor(slots), at))

    def heartbeat(self) -> None:
        """Keeps an idle pipeline's members from timing out (and finds a dead one early)."""
        _send(HEARTBEAT, [], [], torch.zeros((0, 0, self.stage.width)), 1)

    def close(self) -> None:
        """Tells the members to exit (they also exit when the leader's connection drops)."""
        _send(STOP, [], [], torch.zeros((0, 0, self.stage.width)), 1)


def run_member(stage: Stage, member: int, members: int) -> None:
    """A worker's whole life: receive, run its layers, pass on, until the leader stops or goes away."""
    source, target = member - 1, (member + 1) % members
    while True:
        header = torch.empty(3, dtype=torch.int64)
        dist.recv(header, source)
        op, batch, length = (int(value) for value in header)
        slots = torch.empty(batch, dtype=torch.int64)
        positions = torch.empty(batch, dtype=torch.int64)
        dist.recv(slots, source)
        dist.recv(positions, source)
        x = torch.empty((batch, length, stage.width))
        dist.recv(x, source)
        if op in (STOP, HEARTBEAT):
            if not stage.last:
                _send(op, [], [], x, target)
            if op == STOP:
                return
            continue
        with torch.inference_mode():
            x = stage.prefill(x, int(slots[0])) if op == PREFILL else stage.decode(x, slots, positions)
            if stage.last:
                dist.send(stage.logits(x).contiguous(), 0)
            else:
                _send(op, slots.tolist(), positions.tolist(), x, target)
