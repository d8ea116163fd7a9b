"""Continuous batching for the reference model: iteration-level scheduling over a KV cache.

Each request's prompt is run once (prefill: the prompts that arrived since the last iteration together,
padded to the longest), filling its slot of a preallocated key/value cache; from then on every
iteration runs one decoding step for all running requests together, each attending
over its own cached keys through a mask. A request that arrives joins the batch at the next iteration,
one that finishes leaves it and frees its slot: the batch stays full under load without waiting for the
slowest member, as in Orca and vLLM. The running batch and the waiting queue are bounded; a request
that finds the queue full is refused, never queued without bound.

The maths are the model's own (``TinyGPT.forward``) split into prefill and cached decoding, so a
request's greedy tokens do not depend on what else runs in the batch.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
from torch import nn
from torch.nn import functional

from largo.runtime.engine_process import EngineStats
from largo.runtime.model import Block, TinyGPT


@dataclass
class Request:
    """One completion: its prompt's tokens, its sampling settings, and where its tokens go."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # Called from the engine's thread with each new token, then once with the finish reason.
    on_token: Callable[[int], None] = lambda token: None
    on_finish: Callable[[str], None] = lambda reason: None
    # Decided by the caller from the text so far (stop sequences): True ends the request.
    should_stop: Callable[[], bool] = lambda: False
    cancelled: bool = False
    generated: int = 0
    slot: int = -1
    position: int = 0  # tokens in the cache
    next_token: int = 0
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.monotonic)


# Temperatures below this are greedy: dividing logits by less overflows float32 (1e-45 gives inf, then
# NaN probabilities), and the distribution is one-hot long before (vLLM draws the same line).
GREEDY_BELOW = 1e-5


def sample_batch(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """The next token of each request (row): one argmax for all the greedy ones."""
    greedy = logits.argmax(dim=-1).tolist()
    return [
        token if r.temperature < GREEDY_BELOW else sample(logits[i], r)
        for i, (r, token) in enumerate(zip(requests, greedy, strict=True))
    ]


def sample(logits: torch.Tensor, request: Request) -> int:
    """The next token: argmax at temperature 0 (below ``GREEDY_BELOW``), else nucleus sampling with the
    request's generator."""
    if request.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits).item())
    probabilities = torch.softmax(logits.float() / request.temperature, dim=-1)
    if not bool(torch.isfinite(probabilities).all()):
        # Logits past the precision's range (float16 overflows at 65504) or NaN: no distribution to
        # draw from, and the draw's error failed the engine with every request in it. The request gets
        # its most likely token, as a greedy one does.
        return int(torch.argmax(torch.nan_to_num(logits.float(), nan=-math.inf)).item())
    if request.top_p < 1.0:
        sorted_probs, order = torch.sort(probabilities, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        keep = cumulative - sorted_probs < request.top_p
        # The most likely token whatever top_p: one so small it is 0 in single precision (1e-300) kept
        # none, and the draw from nothing failed the engine with every request in it.
        keep[0] = True
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probabilities = torch.zeros_like(probabilities).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probabilities, 1, generator=request.generator).item())


class Stage:
    """The layers ``layers`` of the model with their slice of the KV cache: the whole model on one pod,
    or one pipeline stage of a replica split over several (``stage_layers``). The first stage also
    embeds the tokens, the last one also turns hidden states into logits."""

    def __init__(self, model: TinyGPT, layers: range, max_batch: int, threads: int = 1) -> None:
        config = model.config
        self.model = model.eval()
        self.layers = layers
        self.first = layers.start == 0
        self.last = layers.stop == config.depth
        self.context = config.context
        self.heads = config.heads
        self.width = config.width
        self.device = next(model.parameters()).device
        # On a CPU, the torch threads a wide model's steps use (``step_threads``).
        self.threads = threads
        # The precision the model was loaded in (``--dtype``): the cache's and the hidden states'.
        self.dtype = dtype = next(model.parameters()).dtype
        # A decoded token's scores as keys x query ([span, 1] per head) rather than query x keys
        # ([1, span]) on a CPU in half precision: its batched product of a cache slice read in place
        # (rows strided by the context) copies the transposed keys first, the other way round not; in
        # float32 the opposite holds. Width 512, 8 heads, 32 requests at position 40, per layer: 62-73
        # against 162-175 us for the scores in bfloat16, 96-103 against 290-338 in float32.
        self.keys_first = self.device.type == "cpu" and dtype != torch.float32
        # Prompts' causal attention written out as two batched products from this many prompts on, on a
        # CPU in half precision (None: always the fused kernel): its kernel takes each (prompt, head) on
        # its own. 32-token prompts, width 512, 8 heads, one layer in bfloat16: 1 prompt 62 against 116
        # us, 4: 202 against 165, 16: 781 against 381, 32: 1,771 against 711; in float32 no clear gain.
        self.prompts_written_from = WRITTEN_PROMPTS if self.keys_first else None
        # keys and values of every slot: [layer of this stage, k|v, slot, head, position, head width]. Slots
        # last but three, so that a run of consecutive slots is one contiguous block of a layer's keys.
        self.cache = torch.zeros(
            (len(layers), 2, max_batch, config.heads, config.context, config.width // config.heads),
            device=self.device,
            dtype=dtype,
        )
        # Each block's weights, read once: queries, keys and values fused into one product (the model
        # keeps them apart for tensor parallelism in training; a server is faster with one matrix), and
        # the layers called as functions, without nn.Module's per-call dispatch (decoding a small model
        # is many small operations: their overhead is the cost).
        pack = self.device.type == "cpu" and config.width >= WIDE_MODEL and onednn_available(dtype)
        self._weights: dict[int, _BlockWeights] = {}
        with torch.no_grad():
            for layer in layers:
                block = cast(Block, model.blocks[layer])
                projections = (block.query, block.key, block.value)
                first, last = cast(nn.Linear, block.mlp[0]), cast(nn.Linear, block.mlp[2])
                self._weights[layer] = _BlockWeights(
                    norm_attention=block.norm_attention,
                    qkv=Product.of(
                        torch.cat([p.weight for p in projections]),
                        torch.cat([p.bias for p in projections]),
                        pack,
                    ),
                    projection=Product.of(block.projection.weight, block.projection.bias, pack),
                    norm_mlp=block.norm_mlp,
                    mlp_in=Product.of(first.weight, first.bias, pack),
                    mlp_out=Product.of(last.weight, last.bias, pack),
                )

    def release_blocks(self) -> None:
        """Drops the model's own modules of this stage's blocks: their weights are the stage's products
        now (packed, or q, k and v fused: ``Product``), so a server that owns its model holds each weight
        once. The model cannot run its blocks after this."""
        for layer in self.layers:
            self.model.blocks[layer] = nn.Identity()

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[batch, length] tokens at [batch, length] positions -> [batch, length, width]."""
        model = self.model
        assert model.tokens is not None  # serving loads whole models
        assert model.positions is not None
        out: torch.Tensor = model.tokens(tokens) + model.positions(positions)
        return out

    def embed_prompts(self, slots: list[int], prompts: list[list[int]]) -> tuple[Prefill, torch.Tensor]:
        """The first stage's input for new prompts (padded to the longest) into ``slots``, and each
        prompt's last position."""
        tokens, last = padded(prompts)
        on = self.device
        x = self.embed(tokens.to(on), torch.arange(tokens.shape[1], device=on)[None, :])
        return Prefill(x, torch.tensor(slots, device=on)), last

    def embed_tokens(self, slots: list[int], positions: list[int], tokens: list[int]) -> Decode:
        """The first stage's input for the running requests' next ``tokens``."""
        at = torch.tensor(positions, device=self.device)
        x = self.embed(torch.tensor(tokens, device=self.device)[:, None], at[:, None])
        return Decode(x, slots, at, max(positions) + 1)

    def embed_step(
        self, arrivals: list[tuple[int, list[int]]], running: Running | None
    ) -> tuple[Prefill | None, list[int], Decode | None]:
        """The first stage's input for an iteration: new prompts ((slot, tokens) each) with each one's last
        position, and the running requests' next tokens."""
        prefill, last = None, []
        if arrivals:
            prefill, positions = self.embed_prompts([s for s, _ in arrivals], [t for _, t in arrivals])
            last = positions.tolist()
        decode = self.embed_tokens(running.slots, running.positions, running.tokens) if running else None
        return prefill, last, decode

    def step_logits(
        self, prefilled: torch.Tensor | None, decoded: torch.Tensor | None, last: list[int]
    ) -> torch.Tensor:
        """The last stage's logits for an iteration, in one product: each running request's, then each
        prompt's at its ``last`` position."""
        rows = []
        if decoded is not None:
            rows.append(decoded[:, -1])
        if prefilled is not None:
            prompts = torch.arange(prefilled.shape[0], device=self.device)
            rows.append(prefilled[prompts, torch.tensor(last, device=self.device)])
        return self.head(rows[0] if len(rows) == 1 else torch.cat(rows))

    def step(
        self, prefill: Prefill | None, decode: Decode | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """New prompts and the running requests' next tokens through this stage's layers in one pass:
        the per-token products (projections, MLP) run on all their rows at once, the attention apart
        (causal over a prompt; over its slot's cached positions for a decoded token). One pass, not a
        prefill and a decoding pass: under a steady load nearly every iteration has both, and a small
        model's pass costs its operations' overhead, whatever its rows.

        A decoded token reads its slot's keys up to ``decode.longest`` (or the whole context: ``read_span``);
        consecutive ascending slots (``slot_run``) are read in place, others gathered, a copy of every
        slot's cache per layer and step, which is most of a large batch's decoding time on a CPU."""
        width, heads = self.width, self.heads
        head_width = width // heads
        rows: list[torch.Tensor] = []
        if decode is not None:
            decoded = decode.x.shape[0]
            rows.append(decode.x.reshape(decoded, width))
            slots = torch.tensor(decode.slots, device=self.device)
            # Where each decoded token's key and value go in a layer's cache, as rows of
            # [k|v x slot x head x position, head width]: one copy per layer writes both, where indexing
            # by slot and position wrote each apart at several times the cost.
            cache_rows = self._cache_rows(slots, decode.positions)
            run = slot_run(decode.slots)
            span = read_span(decode.longest, self.context, self.device, in_place=run is not None)
            read = run if run is not None else slots
            visible = torch.arange(span, device=self.device)[None, :] <= decode.positions[:, None]
            # Attention written out, the mask added once per step (not per layer, as the fused kernel
            # does): its kernel costs more than the products themselves for one query of a small model.
            hidden = ~visible[:, :, None] if self.keys_first else ~visible[:, None, :]
            unseen = torch.zeros(hidden.shape, dtype=decode.x.dtype, device=self.device)
            mask = unseen.masked_fill_(hidden, float("-inf")).repeat_interleave(heads, dim=0)
            scale = head_width**-0.5
        else:
            decoded = 0
        if prefill is not None:
            prompts, length = prefill.x.shape[:2]
            rows.append(prefill.x.reshape(prompts * length, width))
            written = self.prompts_written_from is not None and prompts >= self.prompts_written_from
            causal = causal_mask(length, self.dtype, self.device) if written else None
            # What the slots' earlier requests left past the prompts: decoding reads it, masked and
            # weighted 0, and a non-finite value there (a float16 overflow) would make that NaN.
            self.cache[:, :, prefill.slots, :, length:] = 0
        x = rows[0] if len(rows) == 1 else torch.cat(rows)
        self._use_threads()
        for index, layer in enumerate(self.layers):
            weights = self._weights[layer]
            fused = weights.qkv(_norm(weights.norm_attention, x))
            attended: list[torch.Tensor] = []
            if decode is not None:
                q = fused[:decoded, :width].reshape(decoded, heads, head_width)
                layer_cache = self.cache[index].view(-1, head_width)
                layer_cache.index_copy_(0, cache_rows, fused[:decoded, width:].reshape(-1, head_width))
                keys = self.cache[index, 0, read, :, :span].reshape(decoded * heads, span, head_width)
                values = self.cache[index, 1, read, :, :span].reshape(decoded * heads, span, head_width)
                if self.keys_first:
                    queries = q.reshape(decoded * heads, head_width, 1)
                    scores = torch.baddbmm(mask, keys, queries, alpha=scale)
                    weighting = torch.softmax(scores.transpose(1, 2), dim=-1)  # a view, contiguous
                else:
                    queries = q.reshape(decoded * heads, 1, head_width)
                    scores = torch.baddbmm(mask, queries, keys.transpose(1, 2), alpha=scale)
                    weighting = torch.softmax(scores, dim=-1)
                out = torch.bmm(weighting, values)
                attended.append(out.reshape(decoded, width))
            if prefill is not None:
                q, k, v = (
                    t.reshape(prompts, length, heads, head_width).transpose(1, 2)
                    for t in fused[decoded:].chunk(3, dim=1)
                )
                self.cache[index, 0, prefill.slots, :, :length] = k
                self.cache[index, 1, prefill.slots, :, :length] = v
                if causal is None:
                    out = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                else:
                    out = written_attention(q, k, v, causal)
                attended.append(out.transpose(1, 2).reshape(prompts * length, width))
            x = x + weights.projection(attended[0] if len(attended) == 1 else torch.cat(attended))
            hidden = weights.mlp_in(_norm(weights.norm_mlp, x), gelu=True)
            x = x + weights.mlp_out(hidden)
        return (
            x[decoded:].view(prompts, length, width) if prefill is not None else None,
            x[:decoded].view(decoded, 1, width) if decode is not None else None,
        )

    def _cache_rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The rows of a layer's cache (``cache[layer].view(-1, head width)``) that decoded tokens at
        ``positions`` of ``slots`` write: [token, k|v, head] flattened, the order of their projections."""
        max_batch, heads, context = self.cache.shape[2:5]
        kinds = torch.arange(2, device=self.device)[None, :, None]
        each_head = torch.arange(heads, device=self.device)[None, None, :]
        rows = ((kinds * max_batch + slots[:, None, None]) * heads + each_head) * context
        return (rows + positions[:, None, None]).reshape(-1)

    def head(self, rows: torch.Tensor) -> torch.Tensor:
        """Hidden states ([rows, width]) after the last layer -> logits ([rows, vocabulary])."""
        assert self.model.head is not None  # serving loads whole models
        assert self.model.norm is not None
        out: torch.Tensor = self.model.head(self.model.norm(rows))
        return out.float()  # sampled in single precision whatever the model's

    def nothing(self) -> torch.Tensor:
        """No rows of hidden states: what a message without a step carries down the pipeline."""
        return torch.zeros((0, self.width), dtype=self.dtype, device=self.device)

    def _use_threads(self) -> None:
        if self.device.type == "cpu" and self.threads > 1:
            wanted = step_threads(self.width, self.threads)
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)


@dataclass(frozen=True, slots=True)
class Prefill:
    """Prompts' hidden states ([prompts, length, width], shorter ones padded at the end: under the causal
    mask a real position never sees a later one, and decoding overwrites a padded position's cache
    entry before it can see it) and their cache slots."""

    x: torch.Tensor
    slots: torch.Tensor


@dataclass(frozen=True, slots=True)
class Decode:
    """One token's hidden state per running request ([requests, 1, width]), its cache slot and position,
    and one past the furthest position: what is read of the cache."""

    x: torch.Tensor
    slots: list[int]
    positions: torch.Tensor
    longest: int


@dataclass(frozen=True, slots=True)
class Product:
    """A linear layer's weight and bias, and on a CPU for a wide model (``WIDE_MODEL``) the weight
    packed once for oneDNN, which then computes every step's product, the GELU fused into the first
    MLP product; ``functional.linear`` (MKL on a CPU) repacks the weight at every call. The packed copy
    doubles the memory of those weights."""

    weight: torch.Tensor | None  # where it is not packed
    bias: torch.Tensor
    packed: torch.Tensor | None

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor, pack: bool) -> Product:
        if pack:  # the plain weight is then never read: this keeps no copy of it (q/k/v's is one)
            return cls(None, bias, torch.ops.mkldnn._reorder_linear_weight(weight))
        return cls(weight, bias, None)

    def __call__(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """``x`` ([rows, in]) through the product (and the exact GELU the model was trained with)."""
        if self.packed is not None:
            # The algorithm "none" is the exact (erf) GELU.
            attr, algorithm = ("gelu", "none") if gelu else ("none", "")
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], algorithm)
            return cast(torch.Tensor, out)
        assert self.weight is not None
        out = functional.linear(x, self.weight, self.bias)
        return functional.gelu(out) if gelu else out


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch has oneDNN's packed linear products for ``dtype`` on this CPU (a private
    operator inductor uses: a torch without it serves with ``functional.linear``). oneDNN packs
    bfloat16 and float16 weights only on CPUs with the instructions for them (AVX512-BF16, AMX,
    AVX-NE-CONVERT): elsewhere the packing raises, and a model in bfloat16 served nothing."""
    mkldnn = torch.ops.mkldnn
    available = bool(
        torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )
    if not available or dtype == torch.float32:
        return available
    supported = {
        torch.bfloat16: "_is_mkldnn_bf16_supported",
        torch.float16: "_is_mkldnn_fp16_supported",
    }.get(dtype)
    return supported is not None and hasattr(mkldnn, supported) and bool(getattr(mkldnn, supported)())


@dataclass(frozen=True, slots=True)
class _BlockWeights:
    norm_attention: nn.LayerNorm
    qkv: Product
    projection: Product
    norm_mlp: nn.LayerNorm
    mlp_in: Product
    mlp_out: Product


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# On a CPU, a model this wide or wider runs every step on every thread with oneDNN's packed products
# (``Product``); a narrower one runs on one thread with ``functional.linear``. Measured on 2 cores
# (AVX-512), a decoding step of width 512, depth 8 for 1, 2, 4 and 8 requests: 10.0, 14.9, 14.3 and
# 17.3 ms on one thread with MKL (which does not split one row's product, and slows down at two), 6.0,
# 6.2, 5.8 and 7.2 ms on two with oneDNN; for 32 requests 26 ms with MKL on two, 16 with oneDNN; width
# 1024 alike; width 256 gains from 2 requests on (a lone one 1.08 against 1.15 ms). A narrow model's
# requests are short, so under load the front end (HTTP, JSON) has many of them to handle and needs a
# core of its own exactly when a burst of arrivals makes a large prefill: width 64, 32 clients on 2
# cores, a prefill of 32 prompts alone took 5.9 ms on one thread and 3.5 on two, yet the server gave
# 26,600 tokens/s on one thread, 24,500 on two, and a lower p99.
WIDE_MODEL = 256


# From how many prompts on a CPU in half precision computes their attention as two batched products
# (``Stage.prompts_written_from``).
WRITTEN_PROMPTS = 4


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[length, length]: 0 where a position may see another (itself and earlier ones), -inf elsewhere."""
    later = torch.ones((length, length), dtype=torch.bool, device=device).triu(1)
    return torch.zeros((length, length), dtype=dtype, device=device).masked_fill_(later, -math.inf)


def written_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: torch.Tensor
) -> torch.Tensor:
    """Prompts' attention ([prompts, heads, length, head width] each) under ``causal`` as two batched
    products (``Stage.prompts_written_from``)."""
    prompts, heads, length, head_width = q.shape
    batch = prompts * heads
    q, k, v = (t.reshape(batch, length, head_width) for t in (q, k, v))  # copies: [prompt, head] first
    scores = torch.baddbmm(causal.expand(batch, length, length), q, k.transpose(1, 2), alpha=head_width**-0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v).view(prompts, heads, length, head_width)


def step_threads(width: int, cores: int) -> int:
    """The torch threads for the steps of a model of ``width`` on ``cores``: one, or all of them."""
    return cores if width >= WIDE_MODEL else 1


def read_span(longest: int, context: int, device: torch.device, in_place: bool) -> int:
    """How many positions of the cache a decoding step reads: up to the furthest position in the batch,
    or on a CPU, where the slots are read in place (``slot_run``; gathered ones are copied whatever is
    read), the whole context once that is over 5/8 of it. A slice of the positions is strided by the
    context, and the CPU's batched products copy a strided operand before they multiply (bfloat16 always,
    float32 by its orientation); the whole cache is one contiguous block, read in place. Measured for 32
    requests, width 512, 8 heads, the attention of 8 layers: context 64, 41 positions 2.5 ms in bfloat16
    and 4.0 in float32 against 2.1 and 3.1 for all 64; context 256, 160 positions 10.2 and 12.7 ms
    against 7.9 and 12.1 for all 256, while 129 of 256 took 8.0 and 10.0."""
    return context if in_place and device.type == "cpu" and longest * 8 > context * 5 else longest


def slot_run(slots: list[int]) -> slice | None:
    """``slots`` as a slice when they are consecutive and ascending, else None."""
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one [batch, longest] tensor padded at the end, and each one's last position."""
    longest = max(len(prompt) for prompt in prompts)
    tokens = torch.tensor([prompt + [0] * (longest - len(prompt)) for prompt in prompts])
    return tokens, torch.tensor([len(prompt) - 1 for prompt in prompts])


class Forward(Protocol):
    """How the engine gets logits (in host memory): from the whole model here, or through a pipeline."""

    def step(
        self, arrivals: list[tuple[int, list[int]]], running: Running | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The logits of new prompts ((slot, tokens) each) at their last position and of the running
        requests' next tokens."""
        ...


@dataclass(frozen=True, slots=True)
class Running:
    """The running requests' cache slots, positions and last tokens."""

    slots: list[int]
    positions: list[int]
    tokens: list[int]


class LocalForward:
    """Every layer on this process (a replica of one pod), new prompts and running requests in one pass
    (``Stage.step``)."""

    def __init__(self, stage: Stage) -> None:
        if not (stage.first and stage.last):
            raise ValueError("a local forward needs every layer")
        self.stage = stage

    def step(
        self, arrivals: list[tuple[int, list[int]]], running: Running | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        stage = self.stage
        prefill, last, decode = stage.embed_step(arrivals, running)
        prefilled, decoded = stage.step(prefill, decode)
        logits = stage.step_logits(prefilled, decoded, last).cpu()  # the engine samples in host memory
        return split_logits(logits, arrivals, running)


def split_logits(
    logits: torch.Tensor, arrivals: list[tuple[int, list[int]]], running: Running | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An iteration's logits (the running requests' rows, then the prompts') as the prompts' and the
    running requests'."""
    split = len(running.slots) if running else 0
    return (logits[split:] if arrivals else None), (logits[:split] if running else None)


class Engine:
    """Runs requests through ``forward`` on one thread of its own (``run``), ``max_batch`` at a time."""

    def __init__(self, forward: Forward, context: int, max_batch: int = 32, max_waiting: int = 64) -> None:
        self.forward = forward
        self.context = context
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.device = torch.device("cpu")
        self._free = list(range(max_batch))
        self._running: list[Request] = []
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.heartbeat_seconds = 30.0
        # Why the engine stopped serving, if it failed.
        self.failure: str | None = None
        # Called after each iteration (its tokens delivered): the engine's process sends what it produced.
        self.after_iteration: Callable[[], None] = lambda: None
        # Told of each iteration: how many requests it decoded together.
        self.observe_batch: Callable[[int], None] = lambda size: None
        # Where requests come from when they come from this thread (a process of its own reads its pipe
        # here, between iterations): called before each iteration with how long it may block (none while
        # requests run; the heartbeat's interval while idle), it submits what arrived. Without it, other
        # threads ``submit`` and the engine waits on its lock while idle.
        self.take_input: Callable[[float], None] | None = None

    @classmethod
    def local(cls, model: TinyGPT, max_batch: int = 32, max_waiting: int = 64, threads: int = 1) -> Engine:
        """The whole model on this process."""
        stage = Stage(model, range(model.config.depth), max_batch, threads)
        return cls(LocalForward(stage), model.config.context, max_batch, max_waiting)

    # -- the caller's side (any thread) -------------------------------------------------------------

    def submit(self, request: Request) -> bool:
        """Queues ``request``; False when the waiting queue is full (the caller answers 429)."""
        if not request.prompt or request.max_tokens < 1:
            raise ValueError("a request needs a prompt and max_tokens of at least 1")
        if len(request.prompt) + request.max_tokens > self.context:
            raise ValueError("the prompt plus max_tokens must fit the model's context")
        if request.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
        with self._lock:
            if self._stopped or len(self._waiting) >= self.max_waiting:
                return False
            self._waiting.append(request)
            self._lock.notify()
        return True

    def stats(self) -> EngineStats:
        with self._lock:
            cached = sum(r.position for r in self._running)
            return EngineStats(len(self._running), len(self._waiting), cached, self.max_batch * self.context)

    def start(self) -> None:
        """Runs the engine on a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="largo-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops after the current iteration (telling a pipeline's members), and waits for that."""
        with self._lock:
            self._stopped = True
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the engine's thread ------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            take_input = self.take_input
            if take_input is not None:
                take_input(0.0 if self._running or self._waiting else self.heartbeat_seconds)
            with self._lock:
                idle_since = time.monotonic()
                while take_input is None and not self._stopped and not self._running and not self._waiting:
                    self._lock.wait(self.heartbeat_seconds)
                    if time.monotonic() - idle_since >= self.heartbeat_seconds:
                        break
                if self._stopped:
                    break
                idle = not self._running and not self._waiting
            if idle:
                # A pipeline's members hear from the leader even when no request comes.
                try:
                    self._heartbeat()
                except Exception as error:
                    self._fail(f"{type(error).__name__}: {error}", [])
                    return
                continue
            with self._lock:
                admitted, dropped = [], []
                if any(request.cancelled for request in self._waiting):
                    # Their clients went away while they waited: they leave now, batch full or not, and
                    # free their places in the queue (the front end counts them until they finish).
                    dropped = [request for request in self._waiting if request.cancelled]
                    self._waiting = deque(request for request in self._waiting if not request.cancelled)
                while self._waiting and self._free:
                    request = self._waiting.popleft()
                    # The lowest free slot: the running slots stay a consecutive run (``slot_run``).
                    request.slot = heapq.heappop(self._free)
                    admitted.append(request)
            for request in dropped:
                request.on_finish("cancelled")
            if admitted or self._running:
                try:
                    with torch.inference_mode():
                        self._step(admitted, sorted(self._running, key=lambda request: request.slot))
                except Exception as error:  # a pipeline member gone, for one: nothing more can be served
                    self._fail(f"{type(error).__name__}: {error}", admitted)
                    return
                self._retire()
            self.after_iteration()
        # Stopped: what is still here is ended (the server drained what it could), and the pipeline's
        # members are told from this thread, never mid-step.
        with self._lock:
            leftover = [*self._running, *self._waiting]
            self._waiting.clear()
        self._running = []
        for request in leftover:
            request.on_finish("error")
        self.after_iteration()
        close = getattr(self.forward, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()

    def _heartbeat(self) -> None:
        beat = getattr(self.forward, "heartbeat", None)
        if beat is not None:
            beat()

    def _step(self, arrivals: list[Request], batch: list[Request]) -> None:
        """The arrivals' prompts (padded to the longest) and the running batch's next tokens."""
        running = (
            Running([r.slot for r in batch], [r.position for r in batch], [r.next_token for r in batch])
            if batch
            else None
        )
        prefilled, decoded = self.forward.step([(r.slot, r.prompt) for r in arrivals], running)
        if prefilled is not None:
            for request, token in zip(arrivals, sample_batch(prefilled, arrivals), strict=True):
                request.position = len(request.prompt)
                self._running.append(request)
                self._emit(request, token)
        if decoded is not None:
            self.observe_batch(len(batch))
            for request, token in zip(batch, sample_batch(decoded, batch), strict=True):
                request.position += 1
                self._emit(request, token)

    def _fail(self, reason: str, admitted: list[Request]) -> None:
        """Ends every request with ``error`` and stops: the server turns unready and exits."""
        with self._lock:
            self.failure = reason
            self._stopped = True
            doomed = [*self._running, *(r for r in admitted if r not in self._running), *self._waiting]
            self._waiting.clear()
        self._running = []
        for request in doomed:
            request.on_finish("error")
        self.after_iteration()

    def _emit(self, request: Request, token: int) -> None:
        request.next_token = token
        request.generated += 1
        request.on_token(token)

    def _retire(self) -> None:
        """Requests that are done leave the batch and free their slots."""
        still = []
        for request in self._running:
            reason = None
            if request.cancelled:
                reason = "cancelled"
            elif request.should_stop():
                reason = "stop"
            elif request.generated >= request.max_tokens or request.position >= self.context:
                reason = "length"
            if reason is None:
                still.append(request)
                continue
            request.on_finish(reason)
            with self._lock:
                heapq.heappush(self._free, request.slot)
        self._running = still
