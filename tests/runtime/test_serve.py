"""The built-in model server on a real model trained for a few steps in the test: the engine's continuous
batching (a request's greedy tokens alone = in a batch), and the HTTP server as a process (completions,
streaming, errors, overload, metrics, a refused checkpoint, drain on SIGTERM)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import http.client
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from damage import flip_a_byte_of_the_weights, mark_a_record_with_an_unknown_compression
from largo.dev.cluster import free_port, wait_for
from largo.runtime import checkpoint, pipeline
from largo.runtime.engine import (
    WRITTEN_PROMPTS,
    Decode,
    Engine,
    LocalForward,
    Product,
    Request,
    Running,
    Stage,
    onednn_available,
    read_span,
    sample,
    sample_batch,
    slot_run,
    step_threads,
)
from largo.runtime.engine_host import ModelError, load_model, resolve
from largo.runtime.engine_process import freeze_heap
from largo.runtime.model import ModelConfig, TinyGPT, stage_layers
from largo.runtime.serve import _overlap, _stop_at_end, parse_args
from prometheus_client.parser import text_string_to_metric_families
from torch import nn
from torch.nn import functional

pytestmark = pytest.mark.runtime

TRAIN_ARGS = ["--batch-size", "8", "--context", "32", "--width", "32", "--log-every", "10"]
PROMPTS = ["def ", "import os\n", "class Foo", "return self", "for i in ", "# ", "if __name__", "    x = "]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the reference model after 40 steps on Python sources."""
    checkpoints = tmp_path_factory.mktemp("served") / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LARGO_CHECKPOINT_DIR": str(checkpoints)}
    command = [
        sys.executable,
        "-m",
        "largo.runtime.train",
        *TRAIN_ARGS,
        "--steps",
        "40",
        "--checkpoint-every",
        "20",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return checkpoints


def _generate(engine: Engine, prompts: list[str], max_tokens: int = 12) -> list[list[int]]:
    """Greedy tokens of each prompt, all submitted at once (they share the running batch)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)
    for index, prompt in enumerate(prompts):
        request = Request(prompt=list(prompt.encode()), max_tokens=max_tokens, temperature=0.0)
        request.on_token = outputs[index].append
        request.on_finish = lambda reason: finished.release()
        assert engine.submit(request)
    for _ in prompts:
        assert finished.acquire(timeout=60)
    return outputs


def _alone_and_together(engine: Engine) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt's greedy tokens sent alone, then all of them at once, on ``engine`` (started here)."""
    engine.start()
    try:
        alone = [_generate(engine, [prompt])[0] for prompt in PROMPTS]
        return alone, _generate(engine, PROMPTS)
    finally:
        engine.stop()


def test_greedy_tokens_are_the_same_alone_and_in_a_batch(trained: Path) -> None:
    model, step = load_model(trained, None, torch.device("cpu"))
    assert step == 40
    engine = Engine.local(model, max_batch=8)
    sizes: list[int] = []
    engine.observe_batch = sizes.append
    alone, together = _alone_and_together(engine)
    assert together == alone
    assert all(len(tokens) == 12 for tokens in alone)
    assert max(sizes) >= 4  # they really ran together
    # And the cached decoding is the model's own maths: the full forward pass agrees on every token.
    for prompt, tokens in zip(PROMPTS, alone, strict=True):
        sequence = list(prompt.encode())
        for token in tokens:
            with torch.inference_mode():
                x = torch.tensor([sequence])
                positions = torch.arange(len(sequence))
                hidden = model.tokens(x) + model.positions(positions)
                for block in model.blocks:
                    hidden = block(hidden)
                expected = int(torch.argmax(model.head(model.norm(hidden[:, -1]))[0]))
            assert token == expected
            sequence.append(token)


def test_a_float16_checkpoint_is_served_in_float32_on_a_cpu(tmp_path: Path) -> None:
    """float16 is served on a GPU only, as when asked for by name: ``auto`` took a float16 checkpoint's
    own precision and served it on a CPU, without fast products for it."""
    model = TinyGPT(ModelConfig(width=32, depth=1, context=16)).half()
    checkpoint.save(tmp_path, 3, {"model": model.state_dict(), "config": dataclasses.asdict(model.config)})
    served, step = load_model(tmp_path, None, torch.device("cpu"))
    assert step == 3
    assert {p.dtype for p in served.parameters()} == {torch.float32}
    asked, _ = load_model(tmp_path, None, torch.device("cpu"), "bfloat16")
    assert {p.dtype for p in asked.parameters()} == {torch.bfloat16}


def test_a_model_served_in_bfloat16_keeps_its_maths_and_batches_as_alone(trained: Path) -> None:
    full, _ = load_model(trained, None, torch.device("cpu"))
    half, _ = load_model(trained, None, torch.device("cpu"), "bfloat16")
    assert {p.dtype for p in full.parameters()} == {torch.float32}  # auto: the checkpoint's own
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    # The model's logits within bfloat16's precision (8 bits of mantissa), not another model's.
    prompts = torch.tensor([list(prompt.encode()[:2]) for prompt in PROMPTS])
    with torch.inference_mode():
        expected, got = full(prompts)[:, -1], half(prompts)[:, -1].float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75
    # Its engine: bfloat16 cache, logits sampled in float32, and a request's tokens alone = in a batch.
    engine = Engine.local(half, max_batch=8)
    stage = cast(LocalForward, engine.forward).stage
    assert stage.cache.dtype == torch.bfloat16
    alone, together = _alone_and_together(engine)
    assert together == alone
    with torch.inference_mode():
        assert stage.head(torch.zeros(1, stage.width, dtype=torch.bfloat16)).dtype == torch.float32


def test_a_corrupt_or_foreign_checkpoint_is_refused(tmp_path: Path, trained: Path) -> None:
    with pytest.raises(ModelError, match="no complete checkpoint"):
        load_model(tmp_path, None, torch.device("cpu"))
    with pytest.raises(ModelError, match="step 7 not found"):
        load_model(trained, 7, torch.device("cpu"))
    bad = tmp_path / "bad"
    bad.mkdir()
    checkpoint.save(bad, 5, {"model": {"something.else": torch.zeros(3)}})
    with pytest.raises(ModelError, match="not a checkpoint of the reference model"):
        load_model(bad, 5, torch.device("cpu"))
    path = checkpoint.checkpoint_path(bad, 6)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot be read"):
        load_model(bad, 6, torch.device("cpu"))
    # A flipped bit in the weights: torch.load would read it and the server would answer garbage.
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for step, source in checkpoint.complete(trained):
        shutil.copy(source, checkpoint.checkpoint_path(flipped, step))
    newest, older = (step for step, _ in checkpoint.complete(flipped))
    record = flip_a_byte_of_the_weights(checkpoint.checkpoint_path(flipped, newest))
    with pytest.raises(ModelError, match=f"damaged: record {record} does not match its checksum"):
        load_model(flipped, newest, torch.device("cpu"))
    _, step = load_model(flipped, None, torch.device("cpu"))  # the newest whole one instead
    assert step == older
    # A damaged header: zipfile raises what it raises (here NotImplementedError), told as unreadable.
    mark_a_record_with_an_unknown_compression(checkpoint.checkpoint_path(flipped, older))
    with pytest.raises(ModelError, match="cannot be read: That compression method is not supported"):
        load_model(flipped, older, torch.device("cpu"))


def test_a_pipeline_member_loads_only_its_stage(trained: Path) -> None:
    whole, step = load_model(trained, None, torch.device("cpu"))
    depth = whole.config.depth
    for stage in range(2):
        part, part_step = load_model(trained, None, torch.device("cpu"), "bfloat16", stages=2, stage=stage)
        kept = {name for name, _ in part.named_parameters()}
        held = [f"blocks.{layer}." for layer in stage_layers(depth, 2, stage)]
        held += ["tokens.", "positions."] if stage == 0 else ["norm.", "head."]
        expected = {name for name, _ in whole.named_parameters() if name.startswith(tuple(held))}
        assert kept == expected
        assert part_step == step
        assert all(p.dtype == torch.bfloat16 for p in part.parameters())
        for name, weight in part.named_parameters():  # the checkpoint's weights, in the precision asked
            assert torch.equal(weight, whole.get_parameter(name).bfloat16())
    with pytest.raises(ModelError, match=f"as stage 0 of {depth + 1}"):
        load_model(trained, None, torch.device("cpu"), stages=depth + 1)


@pytest.mark.parametrize("width", [64, 256])  # the narrow model fuses q, k and v; the wide one also packs
def test_a_server_s_stage_holds_each_weight_once(width: int) -> None:
    torch.manual_seed(0)
    model = TinyGPT(ModelConfig(width=width, depth=2, heads=4, context=16)).eval()
    reference = copy.deepcopy(model)
    stage = Stage(model, range(2), max_batch=4)
    query = weakref.ref(model.blocks[0].query.weight)
    mlp_in = weakref.ref(cast(nn.Linear, model.blocks[1].mlp[0]).weight)
    stage.release_blocks()
    gc.collect()
    assert query() is None  # held once, fused with the keys' and values'
    packed = stage._weights[1].mlp_in.packed is not None
    assert (mlp_in() is None) == packed  # held once: packed, or as the model's own weight
    assert {name for name, _ in model.named_parameters()} == {
        "tokens.weight",
        "positions.weight",
        "norm.weight",
        "norm.bias",
        "head.weight",
    }
    prompts = torch.randint(0, 256, (4, 8))
    with torch.inference_mode():
        prefilled = prefill(stage, list(range(4)), prompts.tolist())
        assert torch.allclose(stage.head(prefilled[:, -1]), reference(prompts)[:, -1], atol=1e-4)


class Served:
    """``python -m largo.runtime.serve`` as a process, as the leader's container runs it."""

    def __init__(self, model_dir: Path, workdir: Path, *extra: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "LARGO_MODEL_DIR": str(model_dir),
            "LARGO_HTTP_PORT": str(self.port),
            "LARGO_METRICS_PORT": str(self.metrics_port),
            "LARGO_SERVED_MODEL_NAME": "tiny",
        }
        self.log = workdir / f"serve-{self.port}.log"
        command = [sys.executable, "-m", "largo.runtime.serve", "--host", "127.0.0.1", *extra]
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )
        wait_for(lambda: self.status("/healthz")[0] == 200, 60, "the server up", self.alive)

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"server exited {self.process.returncode}:\n{self.log.read_text()}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def status(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    def post(self, body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
        request = urllib.request.Request(
            self.url("/v1/completions"), json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read().decode()
        except OSError:  # refused: the server is gone
            return 0, {}, ""

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for point in family.samples:
                label = ",".join(f"{k}={v}" for k, v in sorted(point.labels.items()))
                values[f"{point.name}{{{label}}}" if label else point.name] = point.value
        return values

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.process.kill()


@pytest.fixture
def served(trained: Path, tmp_path: Path) -> Iterator[Served]:
    server = Served(trained, tmp_path)
    wait_for(lambda: server.status("/readyz")[0] == 200, 60, "the model loaded", server.alive)
    yield server
    server.stop()


def test_completions_streaming_models_and_metrics(served: Served) -> None:
    status, _, text = served.post({"model": "tiny", "prompt": "def ", "max_tokens": 10, "temperature": 0})
    assert status == 200
    body = json.loads(text)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}
    whole = body["choices"][0]["text"]

    status, headers, text = served.post(
        {"prompt": "def ", "max_tokens": 10, "temperature": 0, "stream": True}
    )
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 2  # tokens arrive as they are made
    assert all("usage" not in chunk for chunk in chunks)  # unless asked for, as in OpenAI's API
    counted = {"include_usage": True}
    _, _, text = served.post(
        {"prompt": "def ", "max_tokens": 10, "temperature": 0, "stream": True, "stream_options": counted}
    )
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    *texts, usage = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in texts) == whole
    assert usage["choices"] == []  # the usage comes in a chunk of its own, before [DONE]
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}

    # A stop sequence ends the text before it; the same seed samples the same text.
    stop = whole[2:4] if len(whole) >= 4 else whole[:1]
    _, _, text = served.post({"prompt": "def ", "max_tokens": 10, "temperature": 0, "stop": stop})
    stopped = json.loads(text)["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == whole[: whole.index(stop)]
    sampled = [
        json.loads(served.post({"prompt": "x = ", "max_tokens": 8, "temperature": 1.0, "seed": 7})[2])
        for _ in range(2)
    ]
    assert sampled[0]["choices"][0]["text"] == sampled[1]["choices"][0]["text"]

    status, models = served.status("/v1/models")
    assert status == 200
    assert [model["id"] for model in json.loads(models)["data"]] == ["tiny"]

    metrics = served.metrics()
    assert metrics["largo_serve_requests_total{code=200}"] >= 5
    assert metrics["largo_serve_requests_in_flight"] == 0
    assert metrics["largo_serve_time_to_first_token_seconds_count"] >= 5
    assert metrics["largo_serve_generated_tokens_total"] >= 30
    assert metrics["largo_serve_prompt_tokens_total"] >= 20
    assert metrics["largo_serve_model_load_seconds"] > 0


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def test_only_the_engine_s_process_loads_torch(served: Served) -> None:
    """The HTTP front end never imports torch (its engine's process does): it needs a few tens of MB,
    not the ~500 MB torch takes, and answers /healthz before torch has loaded."""

    def maps(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    engines = [pid for pid in _children(served.process.pid) if "libtorch" in maps(pid)]
    assert len(engines) == 1
    assert "libtorch" not in maps(served.process.pid)
    assert "aiohttp" in maps(served.process.pid)  # the front end's own C extensions are there


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"prompt": ""}, 400, "prompt must be a non-empty string"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be a number in [1, 1048576]"),
        ({"prompt": "hi", "max_tokens": 100}, 400, "exceeds the model's context of 32 tokens"),
        ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "hi", "stop": [1]}, 400, "stop must be"),
        ({"prompt": "hi", "model": "gpt-9"}, 404, "is not served here"),
    ],
)
def test_bad_requests_get_an_openai_style_error(
    served: Served, body: dict[str, Any], status: int, says: str
) -> None:
    code, _, text = served.post(body)
    assert code == status
    error = json.loads(text)["error"]
    assert says in error["message"]
    assert error["type"]


def _post_raw(server: Served, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", "/v1/completions", body, {"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_what_the_server_does_not_do_is_refused_and_nothing_fails_its_engine(served: Served) -> None:
    """Each of these once crashed the engine (every request in flight failed, the pod restarted), was
    answered 500, or was answered as if honoured; a null is the default, as in OpenAI's API."""
    refused = {
        "seed past torch's": ({"prompt": "hi", "seed": 1 << 64}, "seed must be an integer in"),
        "seed below torch's": ({"prompt": "hi", "seed": -(1 << 63) - 1}, "seed must be an integer in"),
        "n": ({"prompt": "hi", "n": 2}, "n other than 1 is not supported"),
        "best_of": ({"prompt": "hi", "best_of": 3}, "best_of other than 1 is not supported"),
        "echo": ({"prompt": "hi", "echo": True}, "echo is not supported"),
        "logprobs": ({"prompt": "hi", "logprobs": 2}, "logprobs is not supported"),
        "penalty": ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty is not supported"),
        "prompts": ({"prompt": ["a", "b"]}, "one prompt per request, not a list of 2"),
        "stream options alone": (
            {"prompt": "hi", "stream_options": {"include_usage": True}},
            "stream_options is only allowed with stream",
        ),
        "surrogate prompt": ({"prompt": "\ud800"}, "must be valid Unicode text"),
        "surrogate stop": ({"prompt": "hi", "stop": ["\udc00"]}, "must be valid Unicode text"),
        "token ids past a byte": ({"prompt": [100, 256]}, "token ids must be in [0, 255]"),
        "stop of no kind": ({"prompt": "hi", "stop": 0}, "stop must be a string or a list"),
        "prompt of no kind": ({"prompt": {"text": "hi"}}, "list of token ids"),
    }
    for what, (body, says) in refused.items():
        code, text = _post_raw(served, json.dumps(body).encode())
        assert code == 400, what
        assert says in json.loads(text)["error"]["message"], what
    code, text = _post_raw(served, b'{"prompt": "hi"}', "application/json; charset=no-such-charset")
    assert code == 400
    assert "not valid JSON" in text
    # Nested deeper than the parser goes (it once gave aiohttp's plain-text 500, which clients retry),
    # and a body over the limit (a plain-text 413): OpenAI-style errors, counted.
    code, text = _post_raw(served, b"[" * 100_000 + b"]" * 100_000)
    assert code == 400
    assert "not valid JSON" in json.loads(text)["error"]["message"]
    code, text = _post_raw(served, json.dumps({"prompt": "x" * (3 << 20)}).encode())
    assert code == 413
    assert "request body is over" in json.loads(text)["error"]["message"]
    # Accepted: the widest seeds, nulls as defaults, and a temperature so small its division overflows
    # (it is greedy, as temperature 0).
    greedy = json.loads(served.post({"prompt": "def ", "max_tokens": 8, "temperature": 0})[2])
    for body in (
        {"prompt": "def ", "max_tokens": 8, "seed": (1 << 64) - 1, "temperature": 0},
        {"prompt": "def ", "max_tokens": 8, "seed": -(1 << 63), "temperature": 0},
        {"prompt": "def ", "max_tokens": 8, "temperature": 1e-45},
        {"prompt": "def ", "max_tokens": 8, "temperature": 0, "top_p": None, "stream": None, "n": None},
        {"prompt": ["def "], "max_tokens": 8, "temperature": 0, "n": 1, "echo": False, "logprobs": None},
        # The model's tokens are its bytes: a prompt of token ids, alone or in a list of one.
        {"prompt": list(b"def "), "max_tokens": 8, "temperature": 0},
        {"prompt": [list(b"def ")], "max_tokens": 8, "temperature": 0},
    ):
        code, _, text = served.post(body)
        assert code == 200, (body, text)
        assert json.loads(text)["choices"][0]["text"] == greedy["choices"][0]["text"], body
    code, _, text = served.post({"prompt": "def ", "max_tokens": None, "temperature": None, "seed": 1})
    assert code == 200
    assert json.loads(text)["usage"]["completion_tokens"] == 16  # max_tokens' default
    unset = {"prompt": "def ", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": None}}
    code, _, text = served.post(unset)
    assert code == 200
    assert '"usage"' not in text
    # A stream is counted as its handler ends, which may be just after its client read the last byte.
    answered = "largo_serve_requests_total{code=200}"
    wait_for(lambda: served.metrics().get(answered, 0) >= 10, 10, "the last stream counted", served.alive)
    metrics = served.metrics()
    assert metrics[answered] == 10
    assert metrics["largo_serve_errors_total{code=400}"] == len(refused) + 2
    assert metrics["largo_serve_errors_total{code=413}"] == 1
    assert "largo_serve_errors_total{code=503}" not in metrics
    served.alive()


def test_a_client_that_goes_away_frees_its_place_in_the_engine(trained: Path, tmp_path: Path) -> None:
    """A whole (not streamed) answer's client that disconnects cancels its request: it leaves the queue
    or the batch, rather than run to max_tokens and hold a slot and a place within the 429 bound."""
    server = Served(trained, tmp_path, "--max-batch", "1", "--max-waiting", "64")
    try:
        wait_for(lambda: server.status("/readyz")[0] == 200, 60, "ready", server.alive)
        body = json.dumps({"prompt": "def ", "max_tokens": 28, "temperature": 0}).encode()
        connections = []
        for _ in range(48):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            connections.append(connection)
        # One at a time in a batch of one: most are still queued when their clients go away.
        wait_for(lambda: server.metrics()["largo_serve_requests_in_flight"] >= 24, 30, "requests in flight")
        for connection in connections:
            connection.close()
        wait_for(lambda: server.metrics()["largo_serve_requests_in_flight"] == 0, 30, "the requests gone")
        metrics = server.metrics()
        gone = metrics["largo_serve_requests_total{code=499}"]
        finished = metrics.get("largo_serve_requests_total{code=200}", 0)
        assert gone >= 24
        assert gone + finished == 48
        assert metrics["largo_serve_request_seconds_count"] == 48  # the ones gone count in the latency too
        # The cancelled ones generated (almost) nothing: run out, 48 would have made 28 tokens each.
        assert metrics["largo_serve_generated_tokens_total"] <= 28 * (finished + 1) < 28 * 48 / 2
        assert server.post({"prompt": "def ", "max_tokens": 4})[0] == 200
    finally:
        server.stop()


def test_overload_is_refused_with_retry_after_not_queued_without_bound(trained: Path, tmp_path: Path) -> None:
    server = Served(trained, tmp_path, "--max-batch", "1", "--max-waiting", "1")
    try:
        wait_for(lambda: server.status("/readyz")[0] == 200, 60, "ready", server.alive)
        body = {"prompt": "def ", "max_tokens": 25, "temperature": 0}
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: server.post(body), range(16)))
        codes = [code for code, _, _ in results]
        assert codes.count(200) >= 1
        assert codes.count(429) >= 1
        assert set(codes) <= {200, 429}
        assert all(headers.get("Retry-After") == "1" for code, headers, _ in results if code == 429)
        assert server.metrics()["largo_serve_errors_total{code=429}"] == codes.count(429)
    finally:
        server.stop()


def _sigterm_with_requests_in_flight(
    server: Served, max_tokens: int, in_flight: int, stream: bool = False
) -> list[tuple[int, dict[str, str], str]]:
    """48 requests sent at once to a server with a batch of one (queued one behind the other), SIGTERM
    once ``in_flight`` of them are, and what each got."""
    wait_for(lambda: server.status("/readyz")[0] == 200, 60, "ready", server.alive)
    body = {"prompt": "def ", "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    with ThreadPoolExecutor(48) as pool:
        pending = [pool.submit(server.post, body) for _ in range(48)]
        wait_for(
            lambda: server.metrics()["largo_serve_requests_in_flight"] >= in_flight, 30, "requests in flight"
        )
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: server.status("/readyz")[0] in (503, 0), 30, "unready while draining")
        return [future.result(timeout=60) for future in pending]


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(trained: Path, tmp_path: Path) -> None:
    server = Served(trained, tmp_path, "--max-batch", "1")
    results = _sigterm_with_requests_in_flight(server, 25, 8)
    codes = [code for code, _, _ in results]
    # Everything in flight at the signal (8 at least) finished whole; a request that came after it
    # was refused (503 with Retry-After while draining, no connection once the server is gone), never
    # cut short.
    assert codes.count(200) >= 8
    assert set(codes) <= {200, 503, 0}
    assert all(
        json.loads(text)["usage"]["completion_tokens"] == 25 for code, _, text in results if code == 200
    )
    assert all(headers.get("Retry-After") for code, headers, _ in results if code == 503)
    assert server.process.wait(timeout=60) == 0


def test_what_the_drain_could_not_finish_is_answered_503(trained: Path, tmp_path: Path) -> None:
    """Requests still in flight when the drain period ends get a 503 saying so (the router retries them
    elsewhere), not a connection cut mid-answer. With no drain period at all, what is queued behind a
    batch of one at the signal is left."""
    server = Served(trained, tmp_path, "--max-batch", "1", "--drain-seconds", "0")
    results = _sigterm_with_requests_in_flight(server, 28, 24)
    assert server.process.wait(timeout=60) == 0
    said = [json.loads(text)["error"]["message"] for code, _, text in results if code == 503]
    left = [message for message in said if "the server stopped before this request finished" in message]
    # Each of the 24 in flight at the signal was answered, whole or with that 503; later ones were refused
    # as draining, or found the server gone (0).
    assert left
    assert sum(code == 200 for code, _, _ in results) + len(left) >= 24
    assert all(message in left or "draining" in message for message in said)
    assert all(headers.get("Retry-After") == "1" for code, headers, _ in results if code == 503)


def test_a_stream_the_drain_ended_before_its_first_token_gets_503(trained: Path, tmp_path: Path) -> None:
    """A stream still queued when the drain ends has sent nothing: it gets the 503 a whole answer gets
    (the router retries it elsewhere), not a 200 with an error event. One cut mid-stream has its 200
    sent already: it ends with an error event."""
    server = Served(trained, tmp_path, "--max-batch", "1", "--drain-seconds", "0")
    results = _sigterm_with_requests_in_flight(server, 28, 24, stream=True)
    assert server.process.wait(timeout=60) == 0
    queued = [text for code, _, text in results if code == 503 and "stopped before" in text]
    assert len(queued) >= 20  # a batch of one: all but the running one were queued
    assert all(headers.get("Retry-After") == "1" for code, headers, _ in results if code == 503)
    streamed = [text for code, _, text in results if code == 200]
    assert all(text.endswith("data: [DONE]\n\n") for text in streamed)
    assert all('"finish_reason": "length"' in text or '"error"' in text for text in streamed)


def test_a_server_without_its_model_is_alive_but_never_ready(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = Served(empty, tmp_path)
    try:
        seen: list[tuple[int, str]] = []

        def told_why() -> bool:
            seen.append(server.status("/readyz"))
            return "no complete checkpoint" in seen[-1][1]

        # Unready while the engine's process starts ("loading"), then unready saying why, for good.
        wait_for(told_why, 60, "the reason in /readyz", server.alive)
        assert all(status == 503 for status, _ in seen)
        assert server.status("/readyz")[0] == 503
        code, headers, text = server.post({"prompt": "hi"})
        assert code == 503
        assert "model not loaded" in json.loads(text)["error"]["message"]
        assert headers.get("Retry-After")
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("arguments", "why"),
    [
        (["--device", "cpu", "--dtype", "float16"], "float16 is served on a GPU only"),
        (["--max-batch", str(10**9)], "RuntimeError: "),  # a KV cache too large to allocate
    ],
)
def test_a_server_asked_for_what_it_cannot_serve_is_alive_but_never_ready(
    trained: Path, tmp_path: Path, arguments: list[str], why: str
) -> None:
    server = Served(trained, tmp_path, *arguments)
    try:
        wait_for(lambda: why in server.status("/readyz")[1], 60, "why", server.alive)
        assert server.status("/readyz")[0] == 503
        assert server.status("/healthz")[0] == 200  # not a crash loop: only a new spec mends it
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("depth", "stages", "expected"),
    [
        (2, 1, [[0, 1]]),
        (2, 2, [[0], [1]]),
        (5, 3, [[0, 1], [2, 3], [4]]),
        (8, 3, [[0, 1, 2], [3, 4, 5], [6, 7]]),
    ],
)
def test_the_model_is_split_into_contiguous_even_stages(
    depth: int, stages: int, expected: list[list[int]]
) -> None:
    assert [list(stage_layers(depth, stages, stage)) for stage in range(stages)] == expected


def test_more_stages_than_blocks_are_refused() -> None:
    with pytest.raises(ValueError, match="3 stages cannot split 2 blocks"):
        stage_layers(2, 3, 0)


def test_the_device_and_the_pipeline_backend_are_decided_on_the_torch_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("LARGO_DEVICE", "LARGO_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    left = parse_args([])
    assert (left.device, left.pipeline_backend, left.pipeline_timeout) == ("auto", "auto", None)
    decided = resolve(left)
    cuda = torch.cuda.is_available()
    assert decided.device == ("cuda" if cuda else "cpu")
    assert decided.pipeline_backend == ("nccl" if cuda else "gloo")
    assert decided.pipeline_timeout == pipeline.TIMEOUT_SECONDS
    assert decided.max_batch == left.max_batch  # the rest as parsed
    # A GPU device means NCCL; an explicit backend (gloo between GPUs) and timeout are kept.
    assert resolve(parse_args(["--device", "cuda:1"])).pipeline_backend == "nccl"
    kept = resolve(parse_args(["--device", "cuda", "--pipeline-backend", "gloo", "--pipeline-timeout", "5"]))
    assert (kept.device, kept.pipeline_backend, kept.pipeline_timeout) == ("cuda", "gloo", 5.0)
    monkeypatch.setenv("LARGO_DEVICE", "cpu")
    assert resolve(parse_args([])).pipeline_backend == "gloo"
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve(parse_args(["--device", "tpu"]))


def test_the_precision_is_decided_on_the_torch_side(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LARGO_DTYPE", raising=False)
    assert resolve(parse_args(["--device", "cpu"])).dtype == "auto"  # the checkpoint's own
    monkeypatch.setenv("LARGO_DTYPE", "bfloat16")
    assert resolve(parse_args(["--device", "cpu"])).dtype == "bfloat16"
    assert resolve(parse_args(["--device", "cuda", "--dtype", "float16"])).dtype == "float16"
    with pytest.raises(ValueError, match="float16 is served on a GPU only: on a CPU use bfloat16"):
        resolve(parse_args(["--device", "cpu", "--dtype", "float16"]))
    with pytest.raises(ValueError, match="unknown dtype 'int8': one of auto, float32, bfloat16, float16"):
        resolve(parse_args(["--device", "cpu", "--dtype", "int8"]))


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (["--device", "tpu"], "not serving: unknown device 'tpu'"),
        (["--dtype", "float16", "--device", "cpu"], "not serving: float16 is served on a GPU only"),
    ],
)
def test_a_member_that_cannot_serve_stays_idle_saying_why(
    tmp_path: Path, arguments: list[str], reason: str
) -> None:
    command = [sys.executable, "-m", "largo.runtime.serve", "--model-dir", str(tmp_path), "--members", "2"]
    log = tmp_path / "member.log"
    member = subprocess.Popen(
        [*command, "--member", "1", "--metrics-port", "0", *arguments],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def running() -> None:
            if member.poll() is not None:
                raise AssertionError(f"the member exited {member.returncode}:\n{log.read_text()}")

        wait_for(lambda: reason in log.read_text(), 60, "the reason in the log", running)
        assert member.poll() is None  # not a crash loop: its group is not restarted for a spec error
        member.send_signal(signal.SIGTERM)
        assert member.wait(timeout=30) == 0
        assert "Traceback" not in log.read_text()
    finally:
        member.kill()


class Replica:
    """A replica of two pods, as the controller renders it: the leader serves HTTP and drives the
    pipeline, the worker holds the second stage; the leader's address mapped to loopback."""

    def __init__(
        self,
        model_dir: Path,
        workdir: Path,
        *extra: str,
        worker: tuple[Path, list[str]] | None = None,  # the worker's own model directory and arguments
        ready: bool = True,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        rendezvous = free_port()
        stage = ["--members", "2", "--leader-addr", "127.0.0.1", "--leader-port", str(rendezvous)]
        worker_dir, worker_extra = worker if worker is not None else (model_dir, list(extra))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "LARGO_MODEL_DIR": str(worker_dir),
            "LARGO_METRICS_PORT": "0",
            **(worker_env or {}),
        }
        self.worker_log = workdir / "worker.log"
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "largo.runtime.serve", *stage, *worker_extra, "--member", "1"],
            env=env,
            stdout=self.worker_log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.leader = Served(model_dir, workdir, *stage, *extra, "--member", "0")
        if ready:
            wait_for(
                lambda: self.leader.status("/readyz")[0] == 200, 120, "the pipeline formed", self.leader.alive
            )

    def stop(self) -> None:
        for process in (self.leader.process, self.worker):
            process.kill()


def _greedy(server: Served, prompts: list[str]) -> list[str]:
    texts = []
    for prompt in prompts:
        status, _, text = server.post({"prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert status == 200, text
        texts.append(json.loads(text)["choices"][0]["text"])
    return texts


def test_a_two_pod_replica_answers_as_a_one_pod_replica(
    served: Served, trained: Path, tmp_path: Path
) -> None:
    replica = Replica(trained, tmp_path)
    try:
        with ThreadPoolExecutor(4) as pool:  # batched through the pipeline too
            split = list(pool.map(lambda prompt: _greedy(replica.leader, [prompt])[0], PROMPTS))
        assert split == _greedy(served, PROMPTS)
        assert "stage 1 of 2: blocks [1]" in replica.worker_log.read_text()
    finally:
        replica.stop()


def test_a_two_pod_replica_deleted_whole_drains_its_requests_through_both_stages(
    trained: Path, tmp_path: Path
) -> None:
    """Kubernetes signals every pod of a deleted group at once: the worker's stage keeps serving the
    requests the leader drains, and both exit once the leader stops the pipeline."""
    replica = Replica(trained, tmp_path, "--max-batch", "1")
    try:
        leader = replica.leader
        body = {"prompt": "def ", "max_tokens": 25, "temperature": 0}
        with ThreadPoolExecutor(48) as pool:
            pending = [pool.submit(leader.post, body) for _ in range(48)]
            wait_for(lambda: leader.metrics()["largo_serve_requests_in_flight"] >= 8, 60, "8 in flight")
            replica.worker.send_signal(signal.SIGTERM)
            leader.process.send_signal(signal.SIGTERM)
            results = [future.result(timeout=120) for future in pending]
        codes = [code for code, _, _ in results]
        # Those in flight at the signal (8 at least) finished whole; later ones were refused, never cut.
        assert codes.count(200) >= 8, codes
        assert set(codes) <= {200, 503, 0}
        assert all(
            json.loads(text)["usage"]["completion_tokens"] == 25 for code, _, text in results if code == 200
        )
        assert leader.process.wait(timeout=60) == 0
        assert replica.worker.wait(timeout=60) == 0
        assert "SIGTERM: serving until the leader stops" in replica.worker_log.read_text()
    finally:
        replica.stop()


@pytest.mark.parametrize("without", ["worker", "leader", "worker's memory"])
def test_a_member_without_the_model_makes_the_replica_unready_saying_why(
    trained: Path, tmp_path: Path, without: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    leader_dir, worker_dir = (empty, trained) if without == "leader" else (trained, empty)
    # The worker, having no checkpoint, is asked for the leader's step (40) and says it has not that one.
    why = f"member 1: checkpoint of step 40 not found in {empty}"
    worker_args: list[str] = []
    if without == "leader":
        why = f"no complete checkpoint in {empty}"  # told by the leader at once, then to the worker
    elif without == "worker's memory":  # not a ModelError: a cache too large to allocate
        worker_dir, worker_args = trained, ["--max-batch", str(10**9)]
        why = "member 1: RuntimeError: "
    replica = Replica(leader_dir, tmp_path, worker=(worker_dir, worker_args), ready=False)
    try:
        # Told at once, as the group forms (not after the pipeline's 10-minute rendezvous timeout).
        leader = replica.leader
        wait_for(lambda: why in leader.status("/readyz")[1], 60, "the reason in /readyz", leader.alive)
        assert replica.leader.status("/readyz")[0] == 503
        assert replica.leader.status("/healthz")[0] == 200
        # The worker stays up and idle, saying the same, rather than wait on a pipeline that will not run.
        said = f"not serving: member {0 if without == 'leader' else 1}: {why.removeprefix('member 1: ')}"
        wait_for(lambda: said in replica.worker_log.read_text(), 30, "the worker's reason")
        assert replica.worker.poll() is None
        replica.worker.send_signal(signal.SIGTERM)
        assert replica.worker.wait(timeout=30) == 0
    finally:
        replica.stop()


def test_a_leader_without_the_model_says_why_before_its_members_join(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    # No worker at all: the rendezvous would wait 10 minutes; the reason is in /readyz long before.
    group = ["--members", "2", "--leader-addr", "127.0.0.1", "--leader-port", str(free_port())]
    leader = Served(empty, tmp_path, *group, "--member", "0")
    try:
        said = "no complete checkpoint"
        wait_for(lambda: said in leader.status("/readyz")[1], 60, "the reason", leader.alive)
        assert leader.status("/readyz")[0] == 503
    finally:
        assert leader.stop() == 0


def test_a_leader_whose_member_has_not_joined_says_so(trained: Path, tmp_path: Path) -> None:
    """A member that never comes (its pod unschedulable, its image not pulled) held the leader at
    "loading" for the pipeline's ten minutes."""
    group = ["--members", "2", "--leader-addr", "127.0.0.1", "--leader-port", str(free_port())]
    leader = Served(trained, tmp_path, *group, "--member", "0")
    try:
        said = "waiting for the 1 other member(s) of the replica to join its pipeline at 127.0.0.1:"
        wait_for(lambda: said in leader.status("/readyz")[1], 60, "the wait said", leader.alive)
        status, text = leader.status("/readyz")
        assert status == 503
        assert "the group is restarted after 600s" in text
    finally:
        assert leader.stop() == 0


def test_the_members_of_a_replica_serve_the_leader_s_checkpoint(trained: Path, tmp_path: Path) -> None:
    # The worker would load the newest checkpoint (step 40); the leader serves step 20: so must it.
    replica = Replica(trained, tmp_path, "--step", "20", worker=(trained, []))
    one = Served(trained, tmp_path, "--step", "20")
    try:
        wait_for(lambda: one.status("/readyz")[0] == 200, 60, "the model loaded", one.alive)
        assert "stage 1 of 2: blocks [1] of step 20" in replica.worker_log.read_text()
        assert _greedy(replica.leader, PROMPTS) == _greedy(one, PROMPTS)
    finally:
        one.stop()
        replica.stop()


def test_a_two_pod_replica_in_bfloat16_answers_as_a_one_pod_one(trained: Path, tmp_path: Path) -> None:
    half = ("--dtype", "bfloat16")  # the hidden states cross the pipeline in bfloat16
    one = Served(trained, tmp_path, *half)
    replica: Replica | None = None
    try:
        wait_for(lambda: one.status("/readyz")[0] == 200, 60, "the model loaded", one.alive)
        assert " in bfloat16" in one.log.read_text()
        replica = Replica(trained, tmp_path, *half)
        assert _greedy(replica.leader, PROMPTS) == _greedy(one, PROMPTS)
    finally:
        one.stop()
        if replica is not None:
            replica.stop()


def test_a_member_whose_storage_fails_restarts_the_group(trained: Path, tmp_path: Path) -> None:
    """A network filesystem's moment on one member is not a model that cannot be served: the members
    exit 1 and so does the leader, so that the controller restarts the group (an unready replica idle
    for good would never mend). The worker's reads fail with EIO through a sitecustomize on its path."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sitecustomize.py").write_text(
        "import errno\n"
        "from largo.runtime import checkpoint\n"
        "def _eio(path):\n"
        "    raise OSError(errno.EIO, 'Input/output error', str(path))\n"
        "checkpoint.damaged_record = _eio\n"
    )
    replica = Replica(trained, tmp_path, ready=False, worker_env={"PYTHONPATH": str(faults)})
    try:
        assert replica.worker.wait(timeout=120) == 1
        assert "could not be read from its storage" in replica.worker_log.read_text()
        assert replica.leader.process.wait(timeout=120) == 1  # fatal: the leader's pod fails too
        assert "member 1: checkpoint" in replica.leader.log.read_text()
    finally:
        replica.stop()


def test_a_member_that_found_a_newer_checkpoint_than_the_leader_s_pruned_one_restarts_the_group(
    trained: Path, tmp_path: Path
) -> None:
    """The trainer wrote step 40 and pruned step 20 while the replica loaded: the leader listed before and
    loaded 20, the member after and loaded 40. Told to load 20, the member finds it gone: the group
    restarts (every member then loads 40), where it stayed unready for good. Two directories stand in
    for the one the trainer changed between the two listings."""
    before, after = tmp_path / "before", tmp_path / "after"
    for directory, step in ((before, 20), (after, 40)):
        directory.mkdir()
        name = checkpoint.checkpoint_path(trained, step).name
        shutil.copy(trained / name, directory / name)
    replica = Replica(before, tmp_path, worker=(after, []), ready=False)
    try:
        assert replica.worker.wait(timeout=120) == 1
        assert replica.leader.process.wait(timeout=120) == 1  # fatal: the leader's pod fails too
        said = replica.leader.log.read_text()
        assert "member 1: checkpoint of step 20 not found" in said
        assert "it found step 40, newer: the group restarts to load the newest" in said
    finally:
        replica.stop()


def test_a_member_that_dies_makes_the_leader_unready_and_exit(trained: Path, tmp_path: Path) -> None:
    replica = Replica(trained, tmp_path)
    try:
        replica.worker.kill()
        replica.worker.wait(timeout=30)
        code, _, text = replica.leader.post({"prompt": "def ", "max_tokens": 5, "temperature": 0})
        assert code == 503
        assert "the model failed" in json.loads(text)["error"]["message"]
        # Exiting fails the leader's pod: the controller restarts the whole group.
        assert replica.leader.process.wait(timeout=60) == 1
        assert "the engine failed" in replica.leader.log.read_text()
    finally:
        replica.stop()


class _SteppedForward:
    """A forward that runs one iteration each time the test allows it."""

    def __init__(self, forward: LocalForward) -> None:
        self.forward = forward
        self.allowed = threading.Semaphore(0)
        self.steps = 0

    def step(
        self, arrivals: list[tuple[int, list[int]]], running: Running | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        assert self.allowed.acquire(timeout=30)
        self.steps += 1
        return self.forward.step(arrivals, running)


def test_requests_whose_clients_left_leave_the_queue_while_the_batch_is_full() -> None:
    """They free their places in the bounded queue at the next iteration, not once a slot frees: a
    long generation would otherwise keep new clients out with 429s behind requests nobody waits for."""
    torch.manual_seed(0)
    model = TinyGPT(ModelConfig(context=32, width=32))
    forward = _SteppedForward(LocalForward(Stage(model, range(model.config.depth), 1)))
    engine = Engine(forward, model.config.context, max_batch=1, max_waiting=2)
    ended: dict[str, str] = {}
    requests = {}
    for name in ("running", "left", "also left"):
        request = Request(prompt=list(b"def "), max_tokens=20, temperature=0.0)
        request.on_finish = lambda reason, name=name: ended.__setitem__(name, reason)  # type: ignore[misc]
        requests[name] = request
    engine.start()
    try:
        assert engine.submit(requests["running"])
        forward.allowed.release()  # its prefill
        wait_for(lambda: forward.steps == 1, 30, "the first request admitted")
        assert engine.submit(requests["left"])
        assert engine.submit(requests["also left"])
        assert not engine.submit(Request(prompt=list(b"x"), max_tokens=1))  # the queue is full
        requests["left"].cancelled = requests["also left"].cancelled = True
        forward.allowed.release()
        wait_for(lambda: len(ended) == 2, 30, "the cancelled requests ended")
        assert ended == {"left": "cancelled", "also left": "cancelled"}
        assert engine.stats().waiting == 0
        assert engine.submit(Request(prompt=list(b"x"), max_tokens=1))  # their places are free
    finally:
        for _ in range(64):
            forward.allowed.release()
        engine.stop()


def test_sampling_is_greedy_at_zero_and_nucleus_keeps_the_top_mass() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    assert sample(logits, Request(prompt=[1], max_tokens=1, temperature=0.0)) == 1
    # A temperature whose division would overflow the logits (inf, then NaN probabilities) is greedy.
    assert sample(logits * 1e3, Request(prompt=[1], max_tokens=1, temperature=1e-45)) == 1
    cold = Request(prompt=[1], max_tokens=1, temperature=1e-45)
    assert sample_batch(torch.stack([logits, -logits]), [cold, cold]) == [1, 3]
    # top_p 0.5 keeps only the most likely token (its mass alone is about 0.5); any seed picks it.
    picks = {
        sample(
            logits, Request(prompt=[1], max_tokens=1, top_p=0.5, generator=torch.Generator().manual_seed(s))
        )
        for s in range(20)
    }
    assert picks == {1}
    wide = {
        sample(
            logits, Request(prompt=[1], max_tokens=1, top_p=0.9, generator=torch.Generator().manual_seed(s))
        )
        for s in range(40)
    }
    assert wide == {1, 2}  # the unlikely ones stay out
    # A top_p so small it is 0 in single precision still keeps the most likely token: the draw from
    # nothing raised, and failed the engine with every request in it.
    for tiny in (1e-46, 1e-300):
        assert sample(logits, Request(prompt=[1], max_tokens=1, top_p=tiny, generator=torch.Generator())) == 1


def test_logits_past_the_precision_s_range_are_sampled_as_their_most_likely_token() -> None:
    """float16 logits over 65504 are inf: their softmax is NaN, and the draw's error failed the engine
    with every request in it, greedy neighbours too."""
    warm = Request(prompt=[1], max_tokens=1, temperature=0.7, generator=torch.Generator().manual_seed(1))
    overflowed = torch.tensor([1.0, math.inf, 2.0, -math.inf], dtype=torch.float16)
    assert sample(overflowed, warm) == 1
    assert sample(torch.tensor([math.nan, 0.5, 3.0, 1.0]), warm) == 2
    rows = torch.stack([overflowed.float(), torch.tensor([0.0, 0.0, 9.0, 0.0])])
    assert sample_batch(rows, [warm, warm]) == [1, 2]


def test_a_request_without_a_token_to_make_is_refused_alone() -> None:
    """max_tokens 0 or less passed the context check with a prompt longer than the context, whose
    position embedding then failed the engine with every request in it."""
    engine = Engine.local(TinyGPT(ModelConfig(width=32, depth=1, heads=2, context=16)), max_batch=2)
    for max_tokens in (0, -5):
        with pytest.raises(ValueError, match="max_tokens of at least 1"):
            engine.submit(Request(prompt=list(range(20)), max_tokens=max_tokens, temperature=0.0))


@pytest.mark.parametrize(
    ("text", "stops", "cut"),
    [(b"xab", (b"b", b"ab"), 2), (b"xab", (b"ab", b"b"), 2), (b"xab", (b"b", b"a"), 1), (b"xab", (b"q",), 0)],
)
def test_a_finished_text_loses_the_longest_stop_it_ends_with_and_only_that(
    text: bytes, stops: tuple[bytes, ...], cut: int
) -> None:
    """Overlapping stops (b, ab): none of either is shown; a stop that ends the text once it is cut (a)
    is part of the answer."""
    assert _stop_at_end(text, stops) == cut


@pytest.mark.parametrize(
    ("text", "stop", "held"), [(b"abc", b"cd", 1), (b"abc", b"bcd", 2), (b"abc", b"xy", 0), (b"a", b"abc", 1)]
)
def test_text_that_may_start_a_stop_sequence_is_held_back(text: bytes, stop: bytes, held: int) -> None:
    assert _overlap(bytearray(text), stop) == held


def test_an_idle_pipeline_outlives_its_receive_timeout(trained: Path, tmp_path: Path) -> None:
    replica = Replica(trained, tmp_path, "--pipeline-timeout", "3")
    try:
        # Idle for twice the members' receive timeout: the leader's heartbeats keep them waiting.
        time.sleep(6)
        assert replica.worker.poll() is None, replica.worker_log.read_text()
        code, _, text = replica.leader.post({"prompt": "def ", "max_tokens": 5, "temperature": 0})
        assert code == 200, text
    finally:
        replica.stop()


def prefill(stage: Stage, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Prompts alone through ``stage`` (an iteration without running requests)."""
    prefilled, _ = stage.step(stage.embed_prompts(slots, prompts)[0], None)
    assert prefilled is not None
    return prefilled


def decode(
    stage: Stage, x: torch.Tensor, slots: list[int], positions: torch.Tensor, longest: int | None = None
) -> torch.Tensor:
    """Running requests' hidden states alone through ``stage`` (an iteration without new prompts)."""
    _, decoded = stage.step(None, Decode(x, slots, positions, stage.context if longest is None else longest))
    assert decoded is not None
    return decoded


def decode_tokens(stage: Stage, slots: list[int], positions: list[int], tokens: list[int]) -> torch.Tensor:
    _, decoded = stage.step(None, stage.embed_tokens(slots, positions, tokens))
    assert decoded is not None
    return decoded


def test_consecutive_slots_are_read_in_place_with_the_same_result() -> None:
    assert slot_run([3, 4, 5]) == slice(3, 6)
    assert slot_run([0]) == slice(0, 1)
    assert slot_run([1, 3]) is None
    assert slot_run([4, 3]) is None
    assert slot_run([]) is None
    torch.manual_seed(0)
    stage = Stage(TinyGPT(ModelConfig(width=32, depth=2, context=16)), range(2), max_batch=4)
    with torch.inference_mode():
        prefill(stage, [1, 2, 3], [[5, 6, 7], [8, 9], [10]])
        x = torch.randn(3, 1, 32)
        in_place = decode(stage, x, [1, 2, 3], torch.tensor([3, 2, 1]))
        # The same requests in another order: not a run, so their keys are gathered.
        order = [2, 0, 1]
        gathered = decode(stage, x[order], [3, 1, 2], torch.tensor([1, 3, 2]))
    assert torch.equal(gathered, in_place[order])


def test_new_prompts_and_running_requests_in_one_pass_equal_a_prefill_then_a_decoding_step() -> None:
    torch.manual_seed(0)
    model = TinyGPT(ModelConfig(width=32, depth=2, context=16))
    one_pass, two_passes = (Stage(model, range(2), max_batch=4) for _ in range(2))
    with torch.inference_mode():
        for stage in (one_pass, two_passes):
            prefill(stage, [0, 2], [[5, 6, 7], [8, 9]])  # running in slots 0 and 2
        running = one_pass.embed_tokens([0, 2], [3, 2], [11, 12])
        arrivals, last = one_pass.embed_prompts([1, 3], [[1, 2, 3, 4], [9]])  # into slots 1 and 3
        prefilled, decoded = one_pass.step(arrivals, running)
        apart_prefilled, _ = two_passes.step(arrivals, None)
        _, apart_decoded = two_passes.step(None, running)
    assert prefilled is not None
    assert decoded is not None
    assert apart_prefilled is not None
    assert apart_decoded is not None
    assert torch.allclose(prefilled, apart_prefilled, atol=1e-6)
    assert torch.allclose(decoded, apart_decoded, atol=1e-6)
    assert torch.allclose(one_pass.cache, two_passes.cache, atol=1e-6)  # the same keys and values kept
    assert last.tolist() == [3, 0]
    # The logits a local forward samples from: each prompt at its last position, each running token.
    forward = LocalForward(Stage(model, range(2), max_batch=4))
    with torch.inference_mode():
        prefill(forward.stage, [0, 2], [[5, 6, 7], [8, 9]])
        from_prompts, from_running = forward.step(
            [(1, [1, 2, 3, 4]), (3, [9])], Running([0, 2], [3, 2], [11, 12])
        )
    assert from_prompts is not None
    assert from_running is not None
    with torch.inference_mode():
        expected_prompts = two_passes.head(apart_prefilled[torch.arange(2), last])
        expected_running = two_passes.head(apart_decoded[:, -1])
    assert torch.allclose(from_prompts, expected_prompts, atol=1e-5)
    assert torch.allclose(from_running, expected_running, atol=1e-5)


def test_decoding_reads_only_the_positions_in_use() -> None:
    torch.manual_seed(0)
    stage = Stage(TinyGPT(ModelConfig(width=32, depth=2, context=16)), range(2), max_batch=4)
    with torch.inference_mode():
        prefill(stage, [0, 1, 2], [[5, 6, 7], [8, 9], [10]])
        x = torch.randn(3, 1, 32)
        positions = torch.tensor([3, 2, 1])
        whole_context = decode(stage, x, [0, 1, 2], positions)
        # Poison what no request may see: a read past the furthest position would show it.
        stage.cache[:, :, :, :, 4:] = float("nan")
        in_use = decode(stage, x, [0, 1, 2], positions, longest=4)
    assert torch.allclose(in_use, whole_context, atol=1e-6)
    assert not in_use.isnan().any()


def test_decoding_most_of_the_context_reads_the_whole_cache_with_the_same_result() -> None:
    cpu = torch.device("cpu")
    assert read_span(4, 16, cpu, in_place=True) == 4
    assert read_span(10, 16, cpu, in_place=True) == 10  # 5/8 of the context: not over it
    assert read_span(11, 16, cpu, in_place=True) == 16
    assert read_span(11, 16, cpu, in_place=False) == 11  # gathered slots are copied whatever is read
    assert read_span(11, 16, torch.device("cuda"), in_place=True) == 11
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        torch.manual_seed(0)
        model = TinyGPT(ModelConfig(width=32, depth=2, context=16)).to(dtype)
        stage = Stage(model, range(2), max_batch=4)
        assert stage.keys_first == (dtype == torch.bfloat16)  # the scores' orientation on a CPU
        with torch.inference_mode():
            prefill(stage, [0, 1, 2], [list(range(1, 12)), list(range(1, 10)), [10]])
            x = torch.randn(3, 1, 32, dtype=dtype)
            positions = torch.tensor([11, 9, 1])
            whole = decode(stage, x, [0, 1, 2], positions, longest=12)
            # Junk past each request's position (what finished requests leave): none of it may be seen.
            for slot, position in enumerate(positions.tolist()):
                stage.cache[:, :, slot, :, position + 1 :] = 1e4
            with_junk = decode(stage, x, [0, 1, 2], positions, longest=12)
            order = [2, 0, 1]  # not a run: gathered, and only the 12 positions in use read
            gathered = decode(stage, x[order], [2, 0, 1], positions[order], longest=12)
        assert not with_junk.isnan().any()
        assert torch.allclose(with_junk.float(), whole.float(), atol=tolerance)
        assert torch.allclose(gathered.float(), whole[order].float(), atol=tolerance)


def test_many_prompts_written_out_attend_as_the_fused_kernel_does() -> None:
    torch.manual_seed(0)
    model = TinyGPT(ModelConfig(width=32, depth=2, context=16)).to(torch.bfloat16)
    written, fused = (Stage(model, range(2), max_batch=6) for _ in range(2))
    assert written.prompts_written_from == WRITTEN_PROMPTS  # a CPU in half precision
    single = TinyGPT(ModelConfig(width=32, depth=2, context=16))
    assert Stage(single, range(2), max_batch=6).prompts_written_from is None  # float32: the kernel
    fused.prompts_written_from = None
    # Prompts of several lengths (padded to the longest): each position sees itself and what precedes it.
    prompts = [list(range(1, 1 + n)) for n in (9, 3, 12, 1, 7)]
    assert len(prompts) >= WRITTEN_PROMPTS
    with torch.inference_mode():
        got, expected = (prefill(stage, [0, 1, 2, 3, 4], prompts) for stage in (written, fused))
    assert torch.allclose(got.float(), expected.float(), atol=5e-2)
    assert torch.allclose(written.cache.float(), fused.cache.float(), atol=5e-2)
    with torch.inference_mode():  # a prompt alone, as the fused kernel sees it, gives its rows in the batch
        for index, prompt in enumerate(prompts):
            alone = prefill(fused, [5], [prompt])[0, : len(prompt)]
            assert torch.allclose(got[index, : len(prompt)].float(), alone.float(), atol=5e-2)


def test_what_a_slot_s_earlier_request_left_cannot_reach_the_next_one() -> None:
    torch.manual_seed(0)
    stage = Stage(TinyGPT(ModelConfig(width=32, depth=2, context=16)), range(2), max_batch=4)
    with torch.inference_mode():
        stage.cache[:, :, 0] = float("inf")  # what an overflowing earlier request left in slot 0
        prefill(stage, [0, 1, 2], [[5, 6, 7], list(range(1, 12)), list(range(1, 10))])
        x = torch.randn(3, 1, 32)
        # Slot 0 at position 3 in a batch read to position 11 (the whole context): its positions past 3
        # are read, masked.
        decoded = decode(stage, x, [0, 1, 2], torch.tensor([3, 11, 9]), longest=12)
    assert decoded.isfinite().all()


@pytest.mark.parametrize(
    ("width", "threads"),
    [
        (64, 1),  # the small model: its requests are many and short, the front end needs the other cores
        (128, 1),
        (256, 4),  # wide: every step, a lone request's decoding too, is split over the cores
        (512, 4),
    ],
)
def test_a_wide_model_s_steps_use_every_core(width: int, threads: int) -> None:
    assert step_threads(width, cores=4) == threads


def test_a_cpu_stage_sets_torch_s_threads_for_each_step() -> None:
    before = torch.get_num_threads()
    torch.manual_seed(0)
    wide, narrow = (TinyGPT(ModelConfig(width=w, depth=1, heads=8, context=16)) for w in (256, 64))
    one, several = Stage(wide, range(1), 8, threads=1), Stage(wide, range(1), 8, threads=2)
    small = Stage(narrow, range(1), 8, threads=2)
    seen: list[int] = []
    try:
        with torch.inference_mode():
            for stage in (one, several, small):
                prefill(stage, [0, 1, 2, 3, 4, 5, 6, 7], [[1, 2, 3]] * 8)
            lone = decode_tokens(several, [0], [3], [4])
            seen.append(torch.get_num_threads())
            batch = decode_tokens(several, list(range(8)), [3] * 8, [4] * 8)
            seen.append(torch.get_num_threads())
            decode_tokens(small, list(range(8)), [3] * 8, [4] * 8)
            seen.append(torch.get_num_threads())
            alone = decode_tokens(one, list(range(8)), [3] * 8, [4] * 8)
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2, 1]
    assert torch.allclose(batch, alone, atol=1e-5)  # more threads, the same maths
    assert torch.allclose(lone[0], alone[0], atol=1e-5)


def test_a_wide_model_takes_packed_products_with_the_same_maths() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(1024, 256) * 0.05, torch.randn(1024)
    packed, plain = Product.of(weight, bias, pack=onednn_available()), Product.of(weight, bias, pack=False)
    for rows in (1, 2, 32):
        x = torch.randn(rows, 256)
        expected = functional.linear(x, weight, bias)
        for gelu in (False, True):
            want = functional.gelu(expected) if gelu else expected
            assert torch.allclose(packed(x, gelu=gelu), want, atol=1e-4)
            assert torch.equal(plain(x, gelu=gelu), want)
    # A whole wide model: its prefill gives the model's own logits.
    model = TinyGPT(ModelConfig(width=256, depth=2, heads=4, context=16)).eval()
    stage = Stage(model, range(2), max_batch=8)
    narrow = Stage(TinyGPT(ModelConfig(width=64, depth=1, context=16)), range(1), max_batch=8)
    assert (stage._weights[0].mlp_in.packed is not None) == onednn_available()
    assert narrow._weights[0].mlp_in.packed is None  # small products: packing would only cost
    prompts = torch.randint(0, 256, (8, 8))
    with torch.inference_mode():
        prefilled, _ = stage.step(stage.embed_prompts(list(range(8)), prompts.tolist())[0], None)
        assert prefilled is not None
        assert torch.allclose(stage.head(prefilled[:, -1]), model(prompts)[:, -1], atol=1e-4)
    # In bfloat16 (``--dtype``) the packed products and a wide stage keep the model's maths, within
    # bfloat16's precision.
    half_weight, half_bias = weight.bfloat16(), bias.bfloat16()
    half = Product.of(half_weight, half_bias, pack=onednn_available(torch.bfloat16))
    x = torch.randn(32, 256).bfloat16()
    expected = functional.linear(x, half_weight, half_bias).float()
    assert (half(x).float() - expected).abs().max() < 0.02 * expected.abs().max()
    model = model.bfloat16()
    # Packed only where this CPU packs bfloat16 (AVX512-BF16, AMX): elsewhere functional.linear.
    stage = Stage(model, range(2), max_batch=8)
    assert (stage._weights[0].mlp_in.packed is not None) == onednn_available(torch.bfloat16)
    with torch.inference_mode():
        prefilled, _ = stage.step(stage.embed_prompts(list(range(8)), prompts.tolist())[0], None)
        assert prefilled is not None
        got, want = stage.head(prefilled[:, -1]), model(prompts)[:, -1].float()
        assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_what_loading_left_is_kept_out_of_the_collector_s_sight() -> None:
    loaded = [[index] for index in range(1000)]  # containers the collector tracks

    class Node:
        next: object = None

    try:
        freeze_heap()
        tracked = {id(item) for item in gc.get_objects()}
        assert not any(id(item) in tracked for item in loaded)  # frozen: no collection walks them
        # What serving allocates afterwards is still collected: a cycle made now goes.
        node = Node()
        node.next = node
        alive = weakref.ref(node)
        del node
        gc.collect()
        assert alive() is None
    finally:
        gc.unfreeze()
