"""Benchmark: what the serving router adds to a request, and the proxy it is built on against a
hand-written one, all measured in this run.

A replica that answers after 20 ms (a model server waiting on its accelerator: the time is its own,
its CPU is idle, so that the path to it is what is timed) is called at concurrency 1 and 32, with
keep-alive connections as an OpenAI client keeps them:
- direct: the replica itself;
- HAProxy: the router's proxy with the configuration the router's agent writes (`largo.router.haproxy`),
  the replica added through the runtime API as the agent adds it;
- aiohttp: the same hop hand-written in Python (an aiohttp server forwarding with an aiohttp client), the
  alternative to a configured proxy.
The proxies run in a pod of their own in a cluster, so here each gets the last CPU to itself while the
client and the replica share the others, in every path alike: otherwise, on a small machine driven at
saturation, the figures measure CPU taken from the replica rather than the hop. Rounds are interleaved
and the median of each figure is kept. Prints p50/p99 of each and the added
latency against direct; the target for the router: p50 added <= 1 ms and p99 added <= 3 ms at 32.

    .venv/bin/python bench/router.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
from aiohttp import web
from largo.dev import tools
from largo.dev.cluster import free_port, wait_for
from largo.router.haproxy import Ports, render_config

LEVELS = (1, 32)
BODY = b'{"prompt": "def ", "max_tokens": 32}'
ANSWER = b'{"choices": [{"text": "    return x\\n", "index": 0, "finish_reason": "length"}]}'


def serve_replica(port: int, seconds: float) -> None:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(seconds)
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", answer)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_python_proxy(port: int, upstream: int) -> None:
    session: aiohttp.ClientSession | None = None

    async def forward(request: web.Request) -> web.StreamResponse:
        assert session is not None
        body = await request.read()
        url = f"http://127.0.0.1:{upstream}{request.rel_url}"
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with session.request(request.method, url, data=body, headers=headers) as answer:
            response = web.StreamResponse(status=answer.status)
            response.content_type = answer.content_type
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def start(_: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def stop(_: web.Application) -> None:
        if session is not None:
            await session.close()

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


CPUS = sorted(os.sched_getaffinity(0))
PROXY_CPUS = set(CPUS[-1:])
OTHER_CPUS = set(CPUS[:-1]) or PROXY_CPUS


@contextmanager
def started(command: list[str], port: int, cpus: set[int]) -> Iterator[None]:
    process = subprocess.Popen(command)
    os.sched_setaffinity(process.pid, cpus)
    try:
        wait_for(lambda: _listening(port), 30, f"{command[0]} on {port}")
        yield
    finally:
        process.terminate()
        process.wait(10)


def runtime_api(path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()


@contextmanager
def haproxy(port: int, replica: int, workdir: Path) -> Iterator[None]:
    admin = workdir / "admin.sock"
    config = workdir / "haproxy.cfg"
    ports = Ports(serve=port, activator=free_port(), exporter=free_port())
    config.write_text(render_config(str(admin), ports))
    # The tools' haproxy is a wrapper that execs HAProxy: the affinity carries over.
    with started([tools.locate().path("haproxy"), "-db", "-f", str(config)], port, PROXY_CPUS):
        for command in (
            f"add server replicas/bench-r0-node-0 127.0.0.1:{replica} check inter 1s fall 2 rise 1",
            "enable health replicas/bench-r0-node-0",
            "set server replicas/bench-r0-node-0 health up",
            "enable server replicas/bench-r0-node-0",
        ):
            runtime_api(admin, command)
        yield


async def drive(port: int, concurrency: int, requests: int) -> list[float]:
    """Seconds of each request, ``concurrency`` at a time over as many keep-alive connections."""
    latencies: list[float] = []
    queue = iter(range(requests))
    url = f"http://127.0.0.1:{port}/v1/completions"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                started_at = time.perf_counter()
                async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200, r.status
                latencies.append(time.perf_counter() - started_at)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replica-ms", type=float, default=20.0, help="the replica's time per request")
    parser.add_argument("--replica", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--python-proxy", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replica:
        serve_replica(args.replica, args.replica_ms / 1e3)
        return 0
    if args.python_proxy:
        serve_python_proxy(*args.python_proxy)
        return 0
    replica, via_haproxy, via_python = free_port(), free_port(), free_port()
    me = [sys.executable, __file__]
    figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with (
        tempfile.TemporaryDirectory() as workdir,
        started([*me, f"--replica={replica}", f"--replica-ms={args.replica_ms}"], replica, OTHER_CPUS),
        haproxy(via_haproxy, replica, Path(workdir)),
        started([*me, "--python-proxy", str(via_python), str(replica)], via_python, PROXY_CPUS),
    ):
        os.sched_setaffinity(0, OTHER_CPUS)
        targets = {"direct": replica, "haproxy": via_haproxy, "aiohttp": via_python}
        for port in targets.values():  # warm-up: connections, caches
            asyncio.run(drive(port, 32, 500))
        for _ in range(args.rounds):
            for concurrency in LEVELS:
                for name, port in targets.items():
                    latencies = asyncio.run(drive(port, concurrency, args.requests))
                    figures.setdefault((name, concurrency), []).append(
                        (percentile(latencies, 0.5), percentile(latencies, 0.99))
                    )
    print(f"{'path':<8} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}")
    medians = {
        key: (statistics.median(p50 for p50, _ in runs), statistics.median(p99 for _, p99 in runs))
        for key, runs in figures.items()
    }
    for concurrency in LEVELS:
        base50, base99 = medians[("direct", concurrency)]
        for name in ("direct", "haproxy", "aiohttp"):
            p50, p99 = medians[(name, concurrency)]
            print(
                f"{name:<8} {concurrency:>4} {p50 * 1e3:>8.2f} {p99 * 1e3:>8.2f} "
                f"{(p50 - base50) * 1e3:>8.2f} {(p99 - base99) * 1e3:>8.2f}"
            )
    for concurrency in LEVELS:
        base50, base99 = medians[("direct", concurrency)]
        added = {
            name: [(medians[(name, concurrency)][i] - base) * 1e3 for i, base in enumerate((base50, base99))]
            for name in ("haproxy", "aiohttp")
        }
        print(
            f"at {concurrency}: router (HAProxy) p50 {added['haproxy'][0]:+.2f} ms (target <= 1), "
            f"p99 {added['haproxy'][1]:+.2f} ms (target <= 3); hand-written aiohttp hop "
            f"p50 {added['aiohttp'][0]:+.2f} ms, p99 {added['aiohttp'][1]:+.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
