"""A small decoder-only transformer over bytes: real enough to learn, small enough for a CPU test."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int = 256  # bytes: no tokenizer to download or build
    context: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 4


class Block(nn.Module):
    """Pre-norm attention and MLP. Queries, keys and values are separate projections, so that tensor
    parallelism can split each by heads (a fused projection would split across q, k and v)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_width = config.width // config.heads
        self.norm_attention = nn.LayerNorm(config.width)
        self.query = nn.Linear(config.width, config.width)
        self.key = nn.Linear(config.width, config.width)
        self.value = nn.Linear(config.width, config.width)
        self.projection = nn.Linear(config.width, config.width)
        self.norm_mlp = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, 4 * config.width), nn.GELU(), nn.Linear(4 * config.width, config.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        normed = self.norm_attention(x)
        # -1 heads: under tensor parallelism each rank holds only its share of them.
        shape = (batch, length, -1, self.head_width)
        q, k, v = (proj(normed).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, -1))
        out: torch.Tensor = x + self.mlp(self.norm_mlp(x))
        return out


class TinyGPT(nn.Module):
    """The whole model, or one pipeline stage of it: a stage keeps the parameter names of the whole
    model, so checkpoints of any split read and write the same keys.

    ``stages`` > 1 builds only what stage ``stage`` holds (``stage_holds``): a server's pipeline member,
    which loads its weights from a checkpoint, never allocates the others. Training builds the whole
    model and then keeps its stage (``keep_stage``), so that every stage starts from the whole model's
    initial weights whatever the split."""

    tokens: nn.Embedding | None
    positions: nn.Embedding | None
    norm: nn.LayerNorm | None
    head: nn.Linear | None

    def __init__(self, config: ModelConfig, stages: int = 1, stage: int = 0) -> None:
        super().__init__()
        self.config = config
        layers = stage_layers(config.depth, stages, stage)  # ValueError for a split that cannot be
        first, last = stage == 0, stage == stages - 1
        self.tokens = nn.Embedding(config.vocab_size, config.width) if first else None
        self.positions = nn.Embedding(config.context, config.width) if first else None
        # A block of another stage is an Identity: no parameters, and the kept blocks keep their names.
        self.blocks = nn.ModuleList(
            Block(config) if index in layers else nn.Identity() for index in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width) if last else None
        self.head = nn.Linear(config.width, config.vocab_size, bias=False) if last else None

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (or, after the first stage, hidden states) in; with ``targets``, the mean next-token
        cross-entropy out, else the logits (or, before the last stage, hidden states)."""
        if self.tokens is not None and self.positions is not None:
            x = self.tokens(x) + self.positions(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        if self.norm is None or self.head is None:
            return x
        logits: torch.Tensor = self.head(self.norm(x))
        return logits if targets is None else next_token_loss(logits, targets)

    def keep_stage(self, stages: int, stage: int) -> TinyGPT:
        """Drops what pipeline stage ``stage`` of ``stages`` does not hold (``stage_layers``), as a model
        built as that stage does not have it."""
        layers = stage_layers(self.config.depth, stages, stage)
        for index in range(self.config.depth):
            if index not in layers:
                self.blocks[index] = nn.Identity()
        if stage > 0:
            self.tokens = self.positions = None
        if stage < stages - 1:
            self.norm = self.head = None
        return self


def stage_holds(name: str, depth: int, stages: int, stage: int) -> bool:
    """Whether the whole model's parameter (or buffer) ``name`` belongs to pipeline stage ``stage`` of
    ``stages``; True for a name the model does not have, so that loading it is refused by name."""
    module, _, rest = name.partition(".")
    if module == "blocks" and rest.split(".", 1)[0].isdigit():
        return int(rest.split(".", 1)[0]) in stage_layers(depth, stages, stage)
    if module in ("tokens", "positions"):
        return stage == 0
    if module in ("norm", "head"):
        return stage == stages - 1
    return True


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def stage_layers(depth: int, stages: int, stage: int) -> range:
    """The blocks pipeline stage ``stage`` of ``stages`` holds: contiguous ranges as even as possible,
    the earlier stages taking one more when ``depth`` does not divide (the first stage also embeds the
    tokens, the last one also computes the logits). The one way the model is split, for serving and
    for pipeline-parallel training."""
    if not 1 <= stages <= depth:
        raise ValueError(f"{stages} stages cannot split {depth} blocks: need 1 <= stages <= depth")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside 0..{stages - 1}")
    size, extra = divmod(depth, stages)
    start = stage * size + min(stage, extra)
    return range(start, start + size + (1 if stage < extra else 0))
