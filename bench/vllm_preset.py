"""The `vllm` runtime preset, run for real: the leader container largo builds for an InferenceService
with `runtime.type: vllm`, started as the pod would start it, on a machine with a GPU and vLLM.

1. builds the InferenceService (one pod, one GPU; the user's `runtime.args` ask for dummy weights, a
   short context and a small share of the GPU) and its leader pod with largo's own `build_pod`;
2. writes a small random Llama configuration and a byte-level tokenizer where the pod mounts its model;
3. runs the container's command, args and env (a `valueFrom` env, resolved by the kubelet in a pod, gets
   this host's address), waits for the readiness probe's path and port to answer;
4. sends completions, eight at once, and reads `/metrics` while they run and after, through the same
   parser the autoscaler uses (`largo.policy.load.replica_load`): the load must be seen, then drained.

Prints one JSON document (and writes it to --out) with "passed". Needs vLLM importable by --python,
and largo's package (PYTHONPATH=operator/src) with pydantic, prometheus-client and aiohttp. The
environment is passed on to vLLM (e.g. VLLM_USE_FLASHINFER_SAMPLER=0 where FlashInfer is not installed).

    python bench/vllm_preset.py [--python python3] [--out vllm-preset.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from largo.api.v1alpha1 import InferenceService, RuntimeType, ScalingMetric
from largo.manifests.inferenceservice import ModelMount, build_pod
from largo.policy.load import replica_load

# What a user would put in `runtime.args` to try the preset without weights (vLLM keeps the last value
# of a repeated flag, and largo places these after its own).
USER_ARGS = [
    "--load-format", "dummy", "--enforce-eager", "--max-model-len", "256",
    "--gpu-memory-utilization", "0.3", "--max-num-seqs", "8",
]  # fmt: skip
# A small Llama: grouped-query attention, 64-wide heads, so every kernel of a real one runs.
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
CONCURRENT = 8


def byte_symbols() -> list[str]:
    """One printable character per byte, as byte-level BPE tokenizers spell them."""
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    printable = {byte for first, last in ranges for byte in range(ord(first), ord(last) + 1)}
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def tokenizer_files() -> dict[str, Any]:
    """A byte-level tokenizer (no merges: one token per byte) in Hugging Face's format."""
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols())}
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    specials = [{"id": 256, "content": "<s>", **flags}, {"id": 257, "content": "</s>", **flags}]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "added_tokens": specials,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "vocab": {**vocab, "<s>": 256, "</s>": 257}, "merges": []},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def leader_container() -> tuple[dict[str, Any], str]:
    """The preset's leader container, as largo builds it, and where it expects the model."""
    service = InferenceService.from_body(
        {
            "metadata": {"name": "tiny", "namespace": "default"},
            "spec": {
                "model": {"claimName": "models", "path": "tiny-llama"},
                "runtime": {"type": "vllm", "args": USER_ARGS},
                "nodesPerReplica": 1,
                "resourcesPerNode": {"nvidia.com/gpu": 1},
            },
        }
    )
    assert service.spec.runtime.type is RuntimeType.VLLM
    mount = ModelMount(claim_name="models", sub_path="tiny-llama")
    pod = build_pod(service, mount, replica=0, member=0, node_name="gpu-node", attempt=0)
    container = pod["spec"]["containers"][0]
    return container, mount.directory


def command_here(container: dict[str, Any], pod_model: str, model: Path, python: str) -> list[str]:
    """The container's command with the pod's model path pointing at ``model``; `vllm` is vLLM's CLI."""
    argv = [*container.get("command", []), *container.get("args", [])]
    argv = [str(model) if arg == pod_model else arg for arg in argv]
    if argv[0] == "vllm" and shutil.which("vllm") is None:
        argv = [python, "-m", "vllm.entrypoints.cli.main", *argv[1:]]
    return argv


def env_here(container: dict[str, Any], pod_model: str, model: Path) -> dict[str, str]:
    env = dict(os.environ)
    for item in container.get("env", []):
        if "value" in item:
            value = str(item["value"])
            env[item["name"]] = str(model) if value == pod_model else value
        else:  # the kubelet's downward API: this pod's address
            env[item["name"]] = "127.0.0.1"
    return env


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except OSError as error:
        return getattr(error, "code", 0) or 0, str(error)


async def complete_all(port: int, during: list[float]) -> list[dict[str, Any]]:
    """``CONCURRENT`` completions at once; ``during`` gets the autoscaler's in-flight reading meanwhile."""
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:

        async def one(index: int) -> dict[str, Any]:
            body = {"model": "tiny", "prompt": f"request {index}: ", "max_tokens": 200, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            async with session.post(f"{url}/v1/completions", json=body) as response:
                return {"status": response.status, **(await response.json())}

        async def watch() -> None:
            while True:
                async with session.get(f"{url}/metrics") as response:
                    load, _ = replica_load(
                        await response.text(), ScalingMetric.IN_FLIGHT, RuntimeType.VLLM, time.time(), None
                    )
                during.append(load or 0.0)
                await asyncio.sleep(0.01)

        watching = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
        finally:
            watching.cancel()


def in_flight_now(port: int) -> float | None:
    text = get(f"http://127.0.0.1:{port}/metrics")[1]
    return replica_load(text, ScalingMetric.IN_FLIGHT, RuntimeType.VLLM, time.time(), None)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python that imports vllm")
    parser.add_argument("--out", type=Path, default=Path("vllm-preset.json"))
    parser.add_argument("--start-timeout", type=float, default=300)
    args = parser.parse_args()
    container, pod_model = leader_container()
    port = container["readinessProbe"]["httpGet"]["port"]
    ready_path = container["readinessProbe"]["httpGet"]["path"]
    report: dict[str, Any] = {"image": container["image"], "args": container.get("args", [])}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(LLAMA))
        for name, content in tokenizer_files().items():
            (model / name).write_text(json.dumps(content))
        argv = command_here(container, pod_model, model, args.python)
        report["command"] = argv
        log = Path(tmp) / "vllm.log"
        started = time.monotonic()
        with log.open("wb") as output:
            child = subprocess.Popen(
                argv, env=env_here(container, pod_model, model), stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            while time.monotonic() - started < args.start_timeout and child.poll() is None:
                if get(f"http://127.0.0.1:{port}{ready_path}")[0] == 200:
                    report["ready_seconds"] = round(time.monotonic() - started, 1)
                    break
                time.sleep(1)
            if "ready_seconds" in report:
                during: list[float] = []
                answers = asyncio.run(complete_all(port, during))
                report["completions"] = [
                    (a["status"], a.get("usage", {}).get("completion_tokens")) for a in answers
                ]
                report["in_flight_seen_by_autoscaler"] = max(during, default=0.0)
                deadline = time.monotonic() + 10  # vLLM updates its gauges once per engine step
                while (after := in_flight_now(port)) != 0 and time.monotonic() < deadline:
                    time.sleep(0.1)
                report["in_flight_after"] = after
        except Exception as error:  # reported with the server's log, not lost
            report["error"] = f"{type(error).__name__}: {error}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
            report["log_tail"] = log.read_text(errors="replace")[-4000:]
            shutil.copy(log, args.out.with_suffix(".log"))
    report["passed"] = bool(
        "ready_seconds" in report
        and report.get("completions") == [(200, 200)] * CONCURRENT
        and report.get("in_flight_seen_by_autoscaler") == CONCURRENT
        and report.get("in_flight_after") == 0
    )
    if report["passed"]:
        report.pop("log_tail")
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
