"""The built-in model server (``python -m largo.runtime.serve``): the reference model from the trainer's
checkpoints behind an OpenAI-compatible HTTP API, with continuous batching (``largo.runtime.engine``).

The contract with the controller is docs/serving.md: HTTP on ``LARGO_HTTP_PORT`` (``/v1/completions``,
``/v1/models``, ``/healthz``, ``/readyz``), Prometheus metrics on ``LARGO_METRICS_PORT``, the model in
``LARGO_MODEL_DIR`` (step ``LARGO_MODEL_STEP`` when set, else the newest complete checkpoint). A
checkpoint that cannot be loaded keeps the server up but never ready, with the reason in its log and
in ``/readyz``: nothing is served from a model that is not the one asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import logging
import multiprocessing
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from largo.runtime.cpus import torch_threads
from largo.runtime.engine_process import (
    STALLED_DEAD_SECONDS,
    STALLED_UNREADY_SECONDS,
    EngineClient,
    NotLoadedError,
    Output,
    Submission,
    freeze_heap,
)
from largo.runtime.metrics import serve as serve_metrics

logger = logging.getLogger(__name__)

MAX_PROMPT_BYTES = 1 << 20
# A request's body: the prompt escaped in JSON may take more bytes than the prompt.
MAX_BODY_BYTES = 2 * MAX_PROMPT_BYTES
# The seeds torch's generators take.
SEEDS = (-(1 << 63), 1 << 64)
# requests_total's code for a request whose client went away before its answer (as nginx logs it).
CLIENT_GONE = "499"


class Metrics:
    """The series the autoscaler and dashboards read (docs/serving.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge(
            "largo_serve_requests_in_flight", "Requests admitted and not finished.", registry=registry
        )
        self.running = Gauge(
            "largo_serve_requests_running", "Requests in the running batch.", registry=registry
        )
        self.waiting = Gauge(
            "largo_serve_requests_waiting", "Requests queued for the batch.", registry=registry
        )
        self.requests = Counter(
            "largo_serve_requests", "Finished requests by HTTP status code.", ["code"], registry=registry
        )
        # Exported at 0 from the start: a server that has not answered yet has a rate of 0 for the
        # requestsPerSecond autoscaler, not none (a leader without a rate is counted at the target, so
        # a service nobody calls never scaled down or to zero).
        self.requests.labels("200")
        self.latency = Histogram(
            "largo_serve_request_seconds",
            "A request's latency, first byte in to last byte out.",
            # Long generations run for minutes on a GPU: above the last bucket a quantile reads as
            # the bucket itself, so the buckets reach as far as requests go.
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.first_token = Histogram(
            "largo_serve_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            # A long prompt, or a wait in the queue under a burst, takes the first token past 5 s.
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.per_token = Histogram(
            "largo_serve_time_per_output_token_seconds",
            "Mean time between a request's generated tokens after the first.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "largo_serve_prompt_tokens", "Prompt tokens processed.", registry=registry
        )
        self.generated_tokens = Counter(
            "largo_serve_generated_tokens", "Tokens generated.", registry=registry
        )
        self.batch_size = Histogram(
            "largo_serve_batch_size",
            "Requests decoded together in one iteration.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),  # --max-batch may be set above 32
            registry=registry,
        )
        self.cache_usage = Gauge(
            "largo_serve_kv_cache_usage_ratio", "Cached tokens / the KV cache's capacity.", registry=registry
        )
        self.load_seconds = Gauge(
            "largo_serve_model_load_seconds", "How long loading the model took.", registry=registry
        )
        self.errors = Counter(
            "largo_serve_errors",
            "Requests refused or failed, by HTTP status code.",
            ["code"],
            registry=registry,
        )


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, a method the path does not take) in the OpenAI error
    shape, as every other answer of the API: clients read them as such (they were plain text)."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400 or not request.path.startswith("/v1/"):
            raise
        if error.status == 404:
            kind = "not_found_error"
        else:
            kind = "server_error" if error.status >= 500 else "invalid_request_error"
        refused = _error(error.status, f"{request.method} {request.path}: {error.reason}", kind)
        refused.headers.extend((k, v) for k, v in error.headers.items() if k.lower() == "allow")
        return refused


def _error(
    status: int,
    message: str,
    kind: str,
    retry_after: int | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
) -> web.Response:
    """An OpenAI-style error body; ``param`` names the request's field at fault, as clients show it."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _invalid(message: str, param: str | None) -> web.Response:
    """A 400 for a request's field."""
    return _error(400, message, "invalid_request_error", param=param)


@dataclass
class Completion:
    """What the HTTP side keeps of one request while the engine generates it."""

    submission: Submission
    submitted: float = field(default_factory=time.monotonic)
    # Every chunk of a stream carries its request's one creation time, as OpenAI's do.
    created: int = field(default_factory=lambda: int(time.time()))
    # The engine's outputs for this request, put here on the event loop (``EngineClient``).
    outputs: asyncio.Queue[Output] = field(default_factory=asyncio.Queue)
    generated: int = 0
    # A stream's last chunk before [DONE] carries the usage (OpenAI's stream_options.include_usage).
    stream_usage: bool = False


class Server:
    def __init__(
        self, name: str, engine: EngineClient | None, metrics: Metrics, problem: str | None = None
    ) -> None:
        self.name = name
        self.engine = engine
        self.metrics = metrics
        self.problem = problem  # why the model is not loaded, if it is not
        self.draining = False
        self.in_flight = 0
        self.created = int(time.time())
        self.instance = secrets.token_hex(4)  # completions' ids stay unique across the server's restarts
        self.idle = asyncio.Event()
        self.idle.set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_openai_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    def _stalled(self) -> float:
        return self.engine.stalled_for(time.monotonic()) if self.engine is not None else 0.0

    async def healthz(self, _: web.Request) -> web.Response:
        stalled = self._stalled()
        if stalled > STALLED_DEAD_SECONDS:  # the pod fails its liveness probe, and its group restarts
            return web.Response(status=503, text=f"the engine has made no progress for {stalled:.0f}s\n")
        return web.Response(text="ok\n")

    async def readyz(self, _: web.Request) -> web.Response:
        if self.problem is not None:
            return web.Response(status=503, text=f"model not loaded: {self.problem}\n")
        if self.draining:
            return web.Response(status=503, text="draining\n")
        stalled = self._stalled()
        if stalled > STALLED_UNREADY_SECONDS:
            assert self.engine is not None
            message = (
                f"the engine has made no progress for {stalled:.0f}s with {self.engine.outstanding} "
                "request(s) in it (a pipeline member hung?)"
            )
            return web.Response(status=503, text=message + "\n")
        return web.Response(text="ready\n")

    def _model(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "largo"}

    async def models(self, _: web.Request) -> web.Response:
        served = [self._model()] if self.engine is not None else []
        return web.json_response({"object": "list", "data": served})

    async def model(self, request: web.Request) -> web.Response:
        """One model by its id (OpenAI's ``GET /v1/models/{model}``): this server's, once loaded."""
        asked = request.match_info["model"]
        if asked != self.name or self.engine is None:
            message = f"the model {asked!r} does not exist here; this server serves {self.name!r}"
            return _error(404, message, "invalid_request_error", param="model", code="model_not_found")
        return web.json_response(self._model())

    def _parse(self, body: Any) -> tuple[Completion, bool] | web.Response:
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object", "invalid_request_error")
        prompt = _prompt(body.get("prompt"))
        if isinstance(prompt, web.Response):
            return prompt
        unsupported = _unsupported(body)
        if unsupported is not None:
            return _invalid(*unsupported)
        # An explicit null is the default, as OpenAI's API takes it.
        checks: list[tuple[str, Any, type | tuple[type, ...], float, float]] = [
            ("max_tokens", _given(body, "max_tokens", 16), int, 1, 1 << 20),
            ("temperature", _given(body, "temperature", 1.0), (int, float), 0.0, 2.0),
            ("top_p", _given(body, "top_p", 1.0), (int, float), 0.0, 1.0),
        ]
        values: dict[str, Any] = {}
        for name, value, kind, low, high in checks:
            if (
                isinstance(value, bool)
                or not isinstance(value, kind)
                or not low <= cast(float, value) <= high
            ):
                # Whole bounds as they are (``:g`` wrote max_tokens' 1048576 as 1.04858e+06).
                bounds = ", ".join(f"{b:d}" if isinstance(b, int) else f"{b:g}" for b in (low, high))
                return _invalid(f"{name} must be a number in [{bounds}]", name)
            values[name] = value
        if values["top_p"] == 0:
            return _invalid("top_p must be > 0", "top_p")
        seed = body.get("seed")
        whole = isinstance(seed, int) and not isinstance(seed, bool)
        if seed is not None and not (whole and SEEDS[0] <= seed < SEEDS[1]):
            return _invalid("seed must be an integer in [-2^63, 2^64)", "seed")
        stop = _given(body, "stop", [])
        stop = ([stop] if stop else []) if isinstance(stop, str) else stop  # 0 or false is no stop list
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            return _invalid("stop must be a string or a list of at most 4 non-empty strings", "stop")
        stream = _given(body, "stream", False)
        if not isinstance(stream, bool):
            return _invalid("stream must be a boolean", "stream")
        options = _given(body, "stream_options", {})
        if not isinstance(options, dict) or not isinstance(_given(options, "include_usage", False), bool):
            message = "stream_options must be an object whose include_usage is a boolean"
            return _invalid(message, "stream_options")
        if options and not stream:
            return _invalid("stream_options is only allowed with stream", "stream_options")
        model = body.get("model")
        if model is not None and model != self.name:
            return _error(
                404,
                f"model {model!r} is not served here; this server serves {self.name!r}",
                "not_found_error",
                param="model",
                code="model_not_found",
            )
        try:
            encoded = prompt.encode() if isinstance(prompt, str) else prompt
        except UnicodeEncodeError:  # a lone surrogate (JSON's "\\ud800") is no text
            return _invalid("prompt must be valid Unicode text", "prompt")
        try:
            stops = tuple(s.encode() for s in stop)
        except UnicodeEncodeError:
            return _invalid("stop must be valid Unicode text", "stop")
        assert self.engine is not None
        context = self.engine.context
        if len(encoded) + values["max_tokens"] > context:
            return _invalid(
                f"the prompt ({len(encoded)} tokens) plus max_tokens ({values['max_tokens']}) exceeds the "
                f"model's context of {context} tokens",
                "max_tokens",
            )
        submission = Submission(
            id=self.engine.next_id(),
            prompt=encoded,
            max_tokens=values["max_tokens"],
            temperature=float(values["temperature"]),
            top_p=float(values["top_p"]),
            seed=seed,
            stops=stops,
            stream=stream,
        )
        return Completion(submission, stream_usage=bool(options.get("include_usage"))), stream

    async def completions(self, http: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        if self.engine is None:
            return self._refused(_error(503, f"model not loaded: {self.problem}", "service_unavailable", 5))
        if self.draining:
            return self._refused(_error(503, "the server is draining", "service_unavailable", 1))
        if self.engine.failure is not None:  # the server is about to exit; its pod is restarted
            return self._refused(_error(503, self._failed(), "service_unavailable", 1))
        try:
            body = await http.json()
        except web.HTTPRequestEntityTooLarge:
            message = f"the request body is over {MAX_BODY_BYTES} bytes"
            return self._refused(_error(413, message, "invalid_request_error"))
        # ValueError: JSON's and the text's own errors, and an integer of more digits than Python
        # converts (4,300); LookupError: an unknown charset; RecursionError: JSON nested deeper than
        # the parser goes.
        except (ValueError, LookupError, RecursionError):
            return self._refused(_error(400, "the request body is not valid JSON", "invalid_request_error"))
        parsed = self._parse(body)
        if isinstance(parsed, web.Response):
            return self._refused(parsed)
        completion, stream = parsed
        if not self.engine.submit(completion.submission, completion.outputs.put_nowait):
            if self.engine.failure is not None:  # it failed while the body was read
                return self._refused(_error(503, self._failed(), "service_unavailable", 1))
            return self._refused(
                _error(429, "too many requests waiting; retry shortly", "rate_limit_error", 1)
            )
        self.metrics.prompt_tokens.inc(len(completion.submission.prompt))
        self._enter()
        try:
            if stream:
                response = await self._stream(http, completion)
            else:
                response = await self._whole(completion)
        except (asyncio.CancelledError, ConnectionResetError):
            self.engine.cancel(completion.submission.id)  # the client went away: free its slot
            self.metrics.requests.labels(CLIENT_GONE).inc()
            raise
        finally:
            self._leave()
            # Also for a client that gave up: clients that time out are what a slow p99 looks like.
            self.metrics.latency.observe(time.monotonic() - started)
        self.metrics.requests.labels(str(response.status)).inc()
        if response.status >= 400:  # the engine failed, or the drain ended, while it ran
            self.metrics.errors.labels(str(response.status)).inc()
        return response

    def _refused(self, response: web.Response) -> web.Response:
        self.metrics.requests.labels(str(response.status)).inc()
        self.metrics.errors.labels(str(response.status)).inc()
        return response

    def _enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()
        self.metrics.in_flight.set(self.in_flight)

    def _leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self.idle.set()

    def attach(self, engine: EngineClient) -> None:
        self.engine = engine

    async def _tokens(self, completion: Completion) -> AsyncIterator[bytes | str]:
        """Generated bytes safe to show (never the start of a stop sequence), then the finish reason."""
        held = bytearray()
        stops = completion.submission.stops
        first_token_at: float | None = None
        while True:
            output = await completion.outputs.get()
            if output.generated > completion.generated:
                self.metrics.generated_tokens.inc(output.generated - completion.generated)
                completion.generated = output.generated
                if first_token_at is None:
                    first_token_at = time.monotonic()
                    self.metrics.first_token.observe(first_token_at - completion.submitted)
            held += output.text
            if output.finish == "stop":  # at the token that completed a stop sequence: cut it off
                del held[len(held) - _stop_at_end(held, stops) :]
            if output.finish is not None:
                finish = _finish_reason(output.finish)
                if held and finish != "error":
                    yield bytes(held)
                self._observe_per_token(first_token_at, completion.generated)
                yield finish
                return
            # Hold back what could still become a stop sequence; release the rest.
            keep = max((_overlap(held, stop) for stop in stops), default=0)
            if len(held) > keep:
                yield bytes(held[: len(held) - keep])
                del held[: len(held) - keep]

    def _observe_per_token(self, first_token_at: float | None, produced: int) -> None:
        """At a request's finish: the time per output token after the first."""
        if produced > 1 and first_token_at is not None:
            self.metrics.per_token.observe((time.monotonic() - first_token_at) / (produced - 1))

    async def _whole(self, completion: Completion) -> web.Response:
        output = await completion.outputs.get()  # a whole answer comes at once, with its finish
        assert output.finish is not None
        finish = _finish_reason(output.finish)
        if finish == "error":
            return _error(503, self._ended_why(), "service_unavailable", 1)
        text = output.text
        # The engine stops a request at the token that completes a stop sequence: it can only end there.
        ended = _stop_at_end(text, completion.submission.stops) if finish == "stop" else 0
        completion.generated = output.generated
        self.metrics.generated_tokens.inc(output.generated)
        if output.first_token_at is not None:
            self.metrics.first_token.observe(output.first_token_at - completion.submitted)
        self._observe_per_token(output.first_token_at, output.generated)
        answer = text[: len(text) - ended].decode(errors="replace")
        return web.json_response(self._body(completion, answer, finish, usage=True))

    def _failed(self) -> str:
        """What a client is told of a failed engine."""
        engine = self.engine
        failure = (engine.failure or engine.failure_reason) if engine is not None else None
        return f"the model failed: {failure or 'unknown'}"

    def _ended_why(self) -> str:
        """Why a request the engine had was ended unfinished."""
        if self.draining:
            return "the server stopped before this request finished (its drain period ran out)"
        return self._failed()

    async def _stream(self, http: web.Request, completion: Completion) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for item in self._tokens(completion):
            if not response.prepared:
                if item == "error":
                    # Nothing sent yet (it waited in the queue, say): a 503 the router retries elsewhere.
                    return _error(503, self._ended_why(), "service_unavailable", 1)
                # The status goes with the first chunk, so that a stream ended before it is still a 503.
                await response.prepare(http)
            if item == "error":  # the status (200) is sent: an error event, counted as the 503 it would be
                self.metrics.errors.labels("503").inc()
                failed = {"error": {"message": self._ended_why(), "type": "server_error"}}
                await response.write(f"data: {json.dumps(failed)}\n\n".encode())
                break
            if isinstance(item, str):
                tail = decoder.decode(b"", final=True)
                chunk = self._body(completion, tail, item, usage=False)
            else:
                chunk = self._body(completion, decoder.decode(item), None, usage=False)
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if isinstance(item, str) and completion.stream_usage:  # a chunk of its own, as OpenAI's
                usage = {**self._body(completion, "", None, usage=True), "choices": []}
                await response.write(f"data: {json.dumps(usage)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _body(self, completion: Completion, text: str, finish: str | None, usage: bool) -> dict[str, Any]:
        prompt = len(completion.submission.prompt)
        body: dict[str, Any] = {
            "id": f"cmpl-{self.instance}-{completion.submission.id}",
            "object": "text_completion",
            "created": completion.created,
            "model": self.name,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        }
        if usage:
            body["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion.generated,
                "total_tokens": prompt + completion.generated,
            }
        return body


def _prompt(given: Any) -> str | bytes | web.Response:
    """The request's prompt: text, or the model's tokens (its bytes, 0-255), alone or in a list of one."""
    if isinstance(given, list) and len(given) == 1 and isinstance(given[0], str | list):
        given = given[0]
    if isinstance(given, str) and given:
        return given
    tokens = isinstance(given, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in given)
    if tokens and given:
        if not all(0 <= t < 256 for t in given):
            message = "token ids must be in [0, 255]: the model's tokens are bytes"
            return _invalid(message, "prompt")
        return bytes(given)
    if isinstance(given, list) and len(given) > 1 and all(isinstance(p, str | list) for p in given):
        return _invalid(
            f"one prompt per request, not a list of {len(given)}: send each as its own request "
            "(the server batches concurrent requests)",
            "prompt",
        )
    message = "prompt must be a non-empty string or list of token ids, or a list of one"
    return _invalid(message, "prompt")


def _finish_reason(reason: str) -> str:
    """The engine's reason for ending a request as OpenAI's ``finish_reason`` (or ``error``): a request
    cut at the context's end, or cancelled, ended by length."""
    return reason if reason in ("stop", "error") else "length"


def _given(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def _unsupported(body: dict[str, Any]) -> tuple[str, str] | None:
    """Why a request asks for what this server does not do (rather than answer it as if it did), and
    the field that asks. ``true`` equals 1 in Python, and is no count."""
    for name in ("n", "best_of"):
        if body.get(name) is not None and (isinstance(body[name], bool) or body[name] != 1):
            return f"{name} other than 1 is not supported: send each completion as its own request", name
    if body.get("echo") not in (None, False):
        return "echo is not supported", "echo"
    for name in ("logprobs", "suffix"):
        if body.get(name) is not None:
            return f"{name} is not supported", name
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) is not None and (isinstance(body[name], bool) or body[name] != 0):
            return f"{name} is not supported (only 0)", name
    if body.get("logit_bias"):
        return "logit_bias is not supported", "logit_bias"
    return None


def _stop_at_end(text: bytes | bytearray, stops: tuple[bytes, ...]) -> int:
    """The length of the longest stop sequence ``text`` ends with (0 for none): where stops overlap
    (``b`` and ``ab``), none of any of them is shown."""
    return max((len(stop) for stop in stops if text.endswith(stop)), default=0)


def _overlap(text: bytearray, stop: bytes) -> int:
    """The longest end of ``text`` that is a proper start of ``stop``."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="largo.runtime.serve", description=__doc__.split("\n")[0])
    env = os.environ.get
    parser.add_argument("--model-dir", type=Path, default=Path(env("LARGO_MODEL_DIR", "/model")))
    parser.add_argument(
        "--step", type=int, default=int(env("LARGO_MODEL_STEP") or -1), help="default: newest"
    )
    parser.add_argument("--name", default=env("LARGO_SERVED_MODEL_NAME", "largo"), help="the model's name")
    parser.add_argument(
        "--host", default=None, help="the address to listen on; default: every one, IPv4 and IPv6 where there"
    )
    parser.add_argument("--port", type=int, default=int(env("LARGO_HTTP_PORT", "8000")))
    parser.add_argument("--metrics-port", type=int, default=int(env("LARGO_METRICS_PORT", "9400")))
    parser.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    parser.add_argument("--max-waiting", type=int, default=64, help="requests queued before 429s")
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=float(env("LARGO_DRAIN_SECONDS") or 25),
        help="time to finish requests on SIGTERM (the controller sets it from the pod's grace period)",
    )
    parser.add_argument("--members", type=int, default=int(env("LARGO_MEMBERS", "1")), help="pipeline stages")
    parser.add_argument("--member", type=int, default=int(env("LARGO_MEMBER", "0")), help="this pod's stage")
    parser.add_argument("--leader-addr", default=env("LARGO_LEADER_ADDR", "127.0.0.1"))
    parser.add_argument("--leader-port", type=int, default=int(env("LARGO_LEADER_PORT", "29500")))
    parser.add_argument(
        "--pipeline-timeout",
        type=float,
        default=None,
        help="seconds a pipeline member waits for the next message (the leader heartbeats while idle; "
        "default: 10 minutes)",
    )
    # "auto" is decided where torch is imported (``engine_host.resolve``): the front end never imports it.
    parser.add_argument(
        "--device",
        default=env("LARGO_DEVICE") or "auto",
        help="where the model runs (default: $LARGO_DEVICE, else cuda when a GPU is visible, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        default=env("LARGO_DTYPE") or "auto",
        help="the precision the model is served in: auto (the checkpoint's own), float32, bfloat16, or "
        "float16 on a GPU; bfloat16 halves the weights' and the cache's memory and, on a GPU or a CPU "
        "with AVX512_BF16 or AMX, speeds up the products; its tokens may differ from float32's where two "
        "are nearly tied (default: $LARGO_DTYPE, else auto)",
    )
    parser.add_argument(
        "--pipeline-backend",
        choices=("auto", "nccl", "gloo"),
        default=env("LARGO_BACKEND") or "auto",
        help="the stages' process group (default: $LARGO_BACKEND, else nccl on a GPU, gloo on a CPU); "
        "gloo between GPUs passes activations through host memory, for GPUs NCCL cannot pair (one GPU "
        "for several stages, for one)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch_threads(),
        help="the most torch threads a step uses on CPU: a step too small to gain from them runs on one, "
        "leaving the others to the HTTP side (default: $OMP_NUM_THREADS, else the cores the container's "
        "CPU limit allows)",
    )
    return parser.parse_args(argv)


def _engine_process_main(connection: Connection, args: argparse.Namespace) -> None:
    # torch is imported here, in the engine's process only.
    from largo.runtime import engine_host

    engine_host.engine_main(connection, args)


def start_engine_process(args: argparse.Namespace) -> EngineClient:
    """The engine's process, started (spawned: a fork of a process with threads is unsafe)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=_engine_process_main, args=(theirs, args), name="largo-engine", daemon=True
    )
    process.start()
    theirs.close()
    return EngineClient(process, ours, args.max_batch + args.max_waiting)


async def serve(args: argparse.Namespace) -> int:
    """The leader's (or a single pod's) server; returns the process's exit code."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    if args.metrics_port:
        serve_metrics(args.metrics_port, registry)
    # Alive at once, ready once the model is loaded (and the pipeline formed): a slow load is no failure.
    server = Server(args.name, None, metrics, "loading")
    # What is still open after the drain is cut after 2 s: the pod's grace period is nearly over.
    # handler_cancellation: a client that goes away cancels its handler, which frees its slot in the
    # engine (aiohttp's default since 3.9 lets the handler run on to the request's end).
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=2.0, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    exit_code = 0

    engine = start_engine_process(args)
    engine.observe_batch = metrics.batch_size.observe

    def starting(doing: str) -> None:
        if server.engine is None and server.problem is not None and not engine.failure:
            server.problem = doing

    engine.on_starting = starting
    freeze_heap()

    async def load() -> None:
        nonlocal exit_code
        try:
            loaded = await engine.loaded()
        except NotLoadedError as error:
            server.problem = str(error)
            if error.fatal:  # the pipeline could not form, for one: the group is restarted
                logger.error("could not start serving: %s", error)
                exit_code = 1
                stop.set()
            else:  # the model asked for is not there: alive and unready, saying why, until the spec changes
                logger.error("not serving: %s", error)
        else:
            metrics.load_seconds.set(loaded.load_seconds)
            server.attach(engine)
            server.problem = None

    async def watch() -> None:
        nonlocal exit_code
        while True:
            if server.engine is not None:
                stats = server.engine.stats
                metrics.running.set(stats.running)
                metrics.waiting.set(stats.waiting)
                metrics.cache_usage.set(stats.cached_tokens / stats.cache_capacity)
                failure = server.engine.failure
                if failure is not None:
                    # Unready at once; exiting fails the pod, and the controller restarts the group.
                    server.problem = failure
                    logger.error("the engine failed: %s", failure)
                    exit_code = 1
                    stop.set()
                    return
            await asyncio.sleep(0.2)

    tasks = [asyncio.create_task(load()), asyncio.create_task(watch())]
    await stop.wait()
    # Drain: unready at once (the Service stops sending), finish what is in flight, then exit.
    server.draining = True
    logger.info("draining %d request(s)", server.in_flight)
    try:
        async with asyncio.timeout(args.drain_seconds):
            await server.idle.wait()
    except TimeoutError:
        logger.warning("%d request(s) still in flight after %.0fs", server.in_flight, args.drain_seconds)
    for task in tasks:
        task.cancel()
    await engine.stop()
    await runner.cleanup()
    return exit_code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.member > 0:  # a pipeline member runs a stage of the model, no HTTP: the torch side only
        from largo.runtime import engine_host

        return engine_host.member(args)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
