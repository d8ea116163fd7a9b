"""Model-parallel layouts of the reference trainer: a device mesh of shape (pipeline, data, tensor).

Ranks fill the mesh row-major, tensor fastest: rank = (stage * data + replica) * tensor + shard. Under
the rendezvous contract (RANK = node rank * procsPerNode + local rank) a tensor-parallel group is
``tensor`` consecutive ranks, so it stays within one pod when ``tensor`` divides procsPerNode, and a
pipeline stage is ``data * tensor`` consecutive ranks: with one stage's worth of processes per pod,
each stage is a pod and only activations cross the network between pods.

Everything here but ``build`` is pure: the layout arithmetic, which data each rank trains on, and how
the stages' parts of a checkpoint are merged and split again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from largo.runtime.model import Block, ModelConfig, TinyGPT, next_token_loss

# The reference model's tensor-parallel plan, as torchtitan's: the projections that open a sub-layer
# split their outputs (column-wise: by heads, by MLP units), the ones that close it split their inputs
# (row-wise) and all-reduce the result. Norms and embeddings stay whole on every rank.
COLUMN_WISE = ("query", "key", "value", "mlp.0")
ROW_WISE = ("projection", "mlp.2")


class LayoutError(ValueError):
    """The layout does not fit the world size or the model."""


@dataclass(frozen=True, slots=True)
class Layout:
    world: int
    tensor: int = 1
    pipeline: int = 1

    def __post_init__(self) -> None:
        if self.tensor < 1 or self.pipeline < 1:
            raise LayoutError(f"tensor ({self.tensor}) and pipeline ({self.pipeline}) must be >= 1")
        if self.world % (self.tensor * self.pipeline):
            raise LayoutError(
                f"tensor x pipeline = {self.tensor * self.pipeline} does not divide the {self.world} ranks"
            )

    @property
    def data(self) -> int:
        return self.world // (self.tensor * self.pipeline)

    @property
    def model_parallel(self) -> bool:
        return self.tensor > 1 or self.pipeline > 1

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pipeline stage, data-parallel replica, tensor shard) of ``rank``."""
        stage, rest = divmod(rank, self.data * self.tensor)
        replica, shard = divmod(rest, self.tensor)
        return stage, replica, shard

    def rank(self, stage: int, replica: int, shard: int) -> int:
        return (stage * self.data + replica) * self.tensor + shard

    def data_shards(self, rank: int) -> list[int]:
        """The data shards ``rank`` trains on: those of every rank of its replica. A shard is one
        ``data.batch`` (seed, step, shard): whatever the layout, a step covers shards 0..world-1, so
        every layout trains on the same global batch as plain data parallelism."""
        _, replica, _ = self.coordinates(rank)
        return sorted(
            self.rank(stage, replica, shard) for stage in range(self.pipeline) for shard in range(self.tensor)
        )

    @property
    def reporter(self) -> int:
        """The rank that knows the loss and reports it: the first of the last pipeline stage."""
        return self.rank(self.pipeline - 1, 0, 0)

    def check_model(self, config: ModelConfig) -> None:
        if config.heads % self.tensor or (4 * config.width) % self.tensor:
            raise LayoutError(
                f"tensor parallelism of {self.tensor} must divide the model's {config.heads} heads "
                f"and its MLP width {4 * config.width}"
            )
        if self.pipeline > config.depth:
            raise LayoutError(f"{self.pipeline} pipeline stages cannot split {config.depth} blocks")

    def microbatches(self, replica_batch: int) -> int:
        """Microbatches per step: 2 per stage (fewer bubbles than 1 per stage) when they divide the
        replica's batch, else the largest count <= that which does, never fewer than the stages."""
        for count in range(2 * self.pipeline, self.pipeline - 1, -1):
            if replica_batch % count == 0:
                return count
        raise LayoutError(f"a batch of {replica_batch} sequences cannot feed {self.pipeline} stages evenly")

    def communication_bytes(
        self, config: ModelConfig, replica_batch: int, parameter_bytes: int, fsdp: bool = False
    ) -> dict[str, int]:
        """Bytes one rank sends per step, per kind of communication (computed from the shapes, not
        measured): gradients across replicas (DDP's all-reduce or FSDP's gathers and reduce-scatter),
        tensor-parallel all-reduces of activations, and activations and their gradients between stages.
        ``fsdp``: plain data parallelism sharded with FSDP (model-parallel layouts always are)."""
        activation = replica_batch * config.context * config.width * 4  # fp32
        blocks = -(-config.depth // self.pipeline)  # the largest stage's
        # Two all-reduces per block forward (attention and MLP outputs), two more backward.
        tensor = 4 * blocks * activation if self.tensor > 1 else 0
        pipeline = 2 * activation if self.pipeline > 1 else 0
        # All-reduce moves ~2x the gradients; FSDP gathers params twice and reduce-scatters once: ~3x.
        data = (3 if fsdp or self.model_parallel else 2) * parameter_bytes if self.data > 1 else 0
        return {"data": data, "tensor": tensor, "pipeline": pipeline}


def communication_seconds(events: Iterable[tuple[str, float]], tensor_parallel: bool) -> dict[str, float]:
    """Seconds of one step per kind of communication, from gloo's own records of the operations it ran
    (``("gloo:all_reduce", seconds)``, ...; other events are ignored). Each layout uses one kind of
    operation per dimension: point-to-point transfers between stages, FSDP's gathers and reduce-scatters
    across replicas, all-reduces within the tensor group (or, without one, DDP's across replicas)."""
    seconds = {"data": 0.0, "tensor": 0.0, "pipeline": 0.0}
    for name, duration in events:
        if not name.startswith("gloo:"):
            continue
        operation = name.removeprefix("gloo:")
        if operation in ("send", "recv"):
            seconds["pipeline"] += duration
        elif "gather" in operation or "scatter" in operation:
            seconds["data"] += duration
        elif "reduce" in operation:
            seconds["tensor" if tensor_parallel else "data"] += duration
    return seconds


def tensor_parallel_plan() -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        **{name: ColwiseParallel() for name in COLUMN_WISE},
        **{name: RowwiseParallel() for name in ROW_WISE},
    }


def build(model: TinyGPT, layout: Layout, rank: int, device: torch.device) -> tuple[TinyGPT, Any]:
    """Splits ``model`` for ``rank``: keeps its pipeline stage, shards its blocks over the tensor
    dimension, then shards the parameters over the data dimension with FSDP. Returns the stage's module
    and the device mesh (dims pipeline, data, tensor)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh(
        device.type,
        (layout.pipeline, layout.data, layout.tensor),
        mesh_dim_names=("pipeline", "data", "tensor"),
    )
    stage, _, _ = layout.coordinates(rank)
    model.keep_stage(layout.pipeline, stage)
    blocks = [block for block in model.blocks if isinstance(block, Block)]
    if layout.tensor > 1:
        for block in blocks:
            parallelize_module(block, mesh["tensor"], tensor_parallel_plan())
    if layout.data > 1:
        for block in blocks:
            fully_shard(block, mesh=mesh["data"])
        fully_shard(model, mesh=mesh["data"])
    return model, mesh


def pipeline_schedule(
    model: TinyGPT, layout: Layout, rank: int, device: torch.device, mesh: Any, microbatches: int
) -> Any:
    """The stage's 1F1B schedule from torch.distributed.pipelining, or None without pipeline stages.
    1F1B, not GPipe: the same bubble, but a stage holds at most `pipeline` microbatches' activations
    instead of all of them."""
    if layout.pipeline == 1:
        return None
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    stage, _, _ = layout.coordinates(rank)
    pipeline_stage = PipelineStage(model, stage, layout.pipeline, device, group=mesh["pipeline"].get_group())
    return Schedule1F1B(pipeline_stage, n_microbatches=microbatches, loss_fn=next_token_loss)


def select_state(
    state: Mapping[str, Any], optimizer: Mapping[str, Any] | None, names: Iterable[str]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The part of a whole-model checkpoint (model and name-keyed optimizer state) a stage holds."""
    wanted = set(names)
    model = {name: value for name, value in state.items() if name in wanted}
    if optimizer is None:
        return model, None
    return model, {
        "state": {name: value for name, value in optimizer["state"].items() if name in wanted},
        "param_groups": [
            {**group, "params": [name for name in group["params"] if name in wanted]}
            for group in optimizer["param_groups"]
        ],
    }


def merge_states(
    parts: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole model's state from its stages' (model, optimizer) parts, in stage order."""
    model: dict[str, Any] = {}
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for part_model, part_optimizer in parts:
        model.update(part_model)
        state.update(part_optimizer["state"])
        for index, group in enumerate(part_optimizer["param_groups"]):
            if index == len(groups):
                groups.append({**group, "params": list(group["params"])})
            else:
                groups[index]["params"].extend(group["params"])
    return model, {"state": state, "param_groups": groups}
