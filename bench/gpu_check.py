"""The prepared GPU check: one run on a machine with a GPU (CPU works too, for rehearsal).

1. trains the reference model (width 512, depth 8: compute dominates) on the device for a few hundred
   steps, one process, and writes a checkpoint;
2. serves it on the device (`largo.runtime.serve --device cuda`) and on the CPU, and compares their
   greedy completions;
3. measures the device server with continuous batching against the same server one request at a time
   (`--max-batch 1`), at concurrency 1, 8 and 32: tokens/s, p50 and p99 latency;
4. serves it in bfloat16 and float16 (`--dtype`) on the device and compares each one's greedy
   completions run alone with the same prompts run at once (a batch), and with float32's;
5. trains it with FSDP under largo's launcher (``python -m largo.runtime.launch``, torchrun), 60 steps
   straight and 40 then resumed to 60, compares the two runs' losses, and serves the sharded
   checkpoint on the device and on the CPU;
6. serves it as a 2-stage pipeline replica (two processes) on the device, with the stages' process
   group on gloo (activations through host memory) and on NCCL (which needs one GPU per stage: on a
   one-GPU machine it must refuse), and compares the pipeline's greedy completions with one stage's.

Needs only torch, aiohttp and largo.runtime (PYTHONPATH=operator/src). Prints one JSON document and
writes it to --out.

    python bench/gpu_check.py [--device cuda] [--steps 300] [--out gpu-check.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

NEW_TOKENS = 32
SHAPE = ["--width", "512", "--depth", "8", "--heads", "8", "--context", "64"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def prompts(count: int) -> list[str]:
    """32-byte windows of Python's own sources (ASCII, so 32 tokens each)."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_bytes().decode("ascii", "ignore")
    step = max(1, (len(text) - 64) // count)
    return [text[i * step : i * step + 32] for i in range(count)]


def train(
    directory: Path, device: str, steps: int, log: Path, *extra: str, every: int = 0, launcher: bool = False
) -> dict[str, Any]:
    """The reference trainer, as one process or one worker under largo's torchrun (``launcher``)."""
    backend = "nccl" if device == "cuda" else "gloo"
    start = [sys.executable, "-m", "largo.runtime.train"]
    if launcher:
        start = [sys.executable, "-m", "largo.runtime.launch", "--standalone", "--nproc-per-node", "1"]
        start += ["-m", "largo.runtime.train"]
    command = [*start, *SHAPE, "--batch-size", "32", "--backend", backend, *extra]
    command += [
        "--steps",
        str(steps),
        "--checkpoint-dir",
        str(directory),
        "--checkpoint-every",
        str(every or steps),
    ]
    command += ["--log-every", "10", "--report-every-seconds", "1000"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    log.write_text(result.stdout + result.stderr)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    resumed = re.search(r"resumed from checkpoint of step (\d+)", result.stderr)
    return {
        "exit_code": result.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "final_loss": lines[-1]["loss"] if lines else None,
        "tokens_per_second": round(lines[-1]["tokens_per_second"]) if lines else None,
        "resumed_from": int(resumed.group(1)) if resumed else None,
    }


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def serving(
    model_dir: Path, logs: Path, name: str, *extra: str, members: int = 1, wait: float = 120
) -> Iterator[int | str]:
    """A server (and its pipeline's other members); yields its HTTP port, or the reason it never
    became ready."""
    port, rendezvous = free_port(), free_port()
    base = [sys.executable, "-m", "largo.runtime.serve", "--model-dir", str(model_dir), *extra]
    base += ["--metrics-port", "0", "--drain-seconds", "1"]
    stage = ["--members", str(members), "--leader-addr", "127.0.0.1", "--leader-port", str(rendezvous)]
    children = []
    for member in range(members - 1, -1, -1):
        log = (logs / f"{name}-member{member}.log").open("wb")
        command = [*base, *stage, "--member", str(member)] + (["--port", str(port)] if member == 0 else [])
        children.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + wait
        while not ready(port):
            if any(child.poll() is not None for child in children) or time.monotonic() > deadline:
                tail = "".join((logs / f"{name}-member{m}.log").read_text()[-1500:] for m in range(members))
                yield f"never ready: {tail}"
                return
            time.sleep(0.5)
        yield port
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


async def complete(session: aiohttp.ClientSession, port: int, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {answer}")
        text: str = answer["choices"][0]["text"]
        return text


async def greedy(port: int, texts: list[str]) -> list[str]:
    async with aiohttp.ClientSession() as session:
        return [await complete(session, port, prompt) for prompt in texts]


async def greedy_at_once(port: int, texts: list[str]) -> list[str]:
    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(complete(session, port, prompt) for prompt in texts)))


async def load(port: int, texts: list[str], concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    queue = list(texts)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            while queue:
                prompt = queue.pop()
                started = time.perf_counter()
                await complete(session, port, prompt)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "tokens_per_second": round(len(texts) * NEW_TOKENS / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, 1),
    }


def same(left: list[str], right: list[str]) -> dict[str, int]:
    return {"identical": sum(a == b for a, b in zip(left, right, strict=True)), "of": len(left)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="the default model (a rehearsal on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    args = parser.parse_args()
    if args.small:
        SHAPE[:] = []
    report: dict[str, Any] = {"device": args.device}
    try:
        import torch

        report["torch"] = torch.__version__
        if args.device == "cuda":
            report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as error:  # report whatever this machine lacks, and go on
        report["torch"] = f"{type(error).__name__}: {error}"
    logs = args.out.parent / "gpu-check-logs"
    logs.mkdir(parents=True, exist_ok=True)
    checks = prompts(16)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "checkpoints"
        report["train"] = train(model_dir, args.device, args.steps, logs / "train.log")
        print(json.dumps(report), flush=True)
        with serving(model_dir, logs, "cpu", "--device", "cpu") as port:
            cpu = asyncio.run(greedy(port, checks)) if isinstance(port, int) else None
            report["serve_cpu"] = "ready" if cpu is not None else port
        with serving(model_dir, logs, "device", "--device", args.device) as port:
            if isinstance(port, int):
                one_stage = asyncio.run(greedy(port, checks))
                report["serve_device_vs_cpu"] = same(one_stage, cpu) if cpu is not None else None
                texts = prompts(args.requests)
                report["batched"] = {c: asyncio.run(load(port, texts, c)) for c in (1, 8, 32)}
            else:
                one_stage, report["serve_device"] = None, port
        print(json.dumps(report), flush=True)
        with serving(model_dir, logs, "one-at-a-time", "--device", args.device, "--max-batch", "1") as port:
            if isinstance(port, int):
                texts = prompts(args.requests)
                report["one_at_a_time"] = {c: asyncio.run(load(port, texts, c)) for c in (1, 8, 32)}
        for dtype in ("bfloat16", "float16") if args.device == "cuda" else ():
            with serving(model_dir, logs, dtype, "--device", args.device, "--dtype", dtype) as port:
                if isinstance(port, int):
                    alone = asyncio.run(greedy(port, checks))
                    report[dtype] = {
                        "batched_vs_alone": same(asyncio.run(greedy_at_once(port, checks)), alone),
                        "vs_float32": same(alone, one_stage) if one_stage is not None else None,
                    }
                else:
                    report[dtype] = port
        print(json.dumps(report), flush=True)
        fsdp = {"straight": Path(scratch) / "fsdp-straight", "resumed": Path(scratch) / "fsdp-resumed"}
        report["fsdp"] = {
            "straight": train(
                fsdp["straight"], args.device, 60, logs / "fsdp.log", "--fsdp", every=20, launcher=True
            ),
            "first_40": train(
                fsdp["resumed"], args.device, 40, logs / "fsdp-40.log", "--fsdp", every=20, launcher=True
            ),
            "resumed": train(
                fsdp["resumed"], args.device, 60, logs / "fsdp-60.log", "--fsdp", every=20, launcher=True
            ),
        }
        with serving(fsdp["straight"], logs, "fsdp-cpu", "--device", "cpu") as port:
            fsdp_cpu = asyncio.run(greedy(port, checks)) if isinstance(port, int) else port
        with serving(fsdp["straight"], logs, "fsdp-device", "--device", args.device) as port:
            fsdp_device = asyncio.run(greedy(port, checks)) if isinstance(port, int) else port
        report["fsdp"]["served_device_vs_cpu"] = (
            same(fsdp_device, fsdp_cpu)
            if isinstance(fsdp_device, list) and isinstance(fsdp_cpu, list)
            else {"device": fsdp_device, "cpu": fsdp_cpu}
        )
        print(json.dumps(report), flush=True)
        for backend in ("gloo", "nccl"):
            extra = ("--device", args.device, "--pipeline-backend", backend)
            with serving(model_dir, logs, f"pipeline-{backend}", *extra, members=2, wait=90) as port:
                if isinstance(port, int) and one_stage is not None:
                    report[f"pipeline_{backend}_vs_one_stage"] = same(
                        asyncio.run(greedy(port, checks)), one_stage
                    )
                else:
                    report[f"pipeline_{backend}"] = port if isinstance(port, str) else "no one-stage outputs"
    text = json.dumps(report, indent=2)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
