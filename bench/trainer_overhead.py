"""Benchmark: time per step of the reference trainer (largo.runtime.train, with checkpoints every 50
steps, metrics and progress bookkeeping) against a plain loop of the same layout on the same model and
data (bench/plain_loop.py), and each model-parallel layout's step time against plain data parallelism
on the same model and world size (informative: on CPU over gloo, splitting a small model only adds
communication).

Both run under torchrun on gloo, alternately, in the same run; prints the best and the median seconds
per step of each over the rounds, and the ratios (target for trainer / plain loop: <= 1.05 in every
layout, on the best rounds: on a shared machine interference only ever slows a run, so the fastest
round is the closest to each loop's own cost; the medians show the spread).

    .venv/bin/python bench/trainer_overhead.py [--steps 200] [--rounds 3] [--world 2]
        [--layouts dp,tp2,pp2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from largo.dev.cluster import free_port

HERE = Path(__file__).resolve().parent
BATCH, CONTEXT = 16, 64


def torchrun(world: int, args: list[str]) -> list[dict[str, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(world),
    ]
    command += ["--master-port", str(free_port()), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def layout_flags(name: str) -> list[str]:
    """'dp' -> [], 'tp2' -> ['--tp', '2'], 'pp2tp2' -> ['--pp', '2', '--tp', '2']."""
    flags: list[str] = []
    rest = name
    while rest and rest != "dp":
        kind, rest = rest[:2], rest[2:]
        digits = ""
        while rest[:1].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        flags += [f"--{kind}", digits]
    return flags


def trainer_seconds_per_step(world: int, steps: int, flags: list[str]) -> float:
    with tempfile.TemporaryDirectory() as checkpoints:
        lines = torchrun(
            world,
            [
                "-m",
                "largo.runtime.train",
                "--backend",
                "gloo",  # a CPU benchmark, also where a GPU is visible
                *flags,
                "--steps",
                str(steps),
                "--checkpoint-dir",
                checkpoints,
                "--checkpoint-every",
                "50",
                "--metrics-port",
                str(free_port()),
                "--log-every",
                "50",
            ],
        )
    # The trainer reports tokens/s over its whole loop: back to seconds per step.
    return BATCH * CONTEXT * world / lines[-1]["tokens_per_second"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world", type=int, default=2, help="processes (one machine)")
    parser.add_argument("--layouts", default="dp", help="comma-separated: dp, tp2, pp2, pp2tp2, ...")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    plain: dict[str, list[float]] = {name: [] for name in layouts}
    largo: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name in layouts:
            flags = layout_flags(name)
            lines = torchrun(
                args.world,
                [str(HERE / "plain_loop.py"), "--steps", str(args.steps), *flags],
            )
            plain[name].append(lines[-1]["seconds_per_step"])
            largo[name].append(trainer_seconds_per_step(args.world, args.steps, flags))
    shape = f"TinyGPT (batch {BATCH} per process, context {CONTEXT})"
    print(f"{args.steps} steps x {args.rounds} rounds, {args.world} processes on gloo, {shape}")
    baseline = min(largo[layouts[0]])
    for name in layouts:
        p, g = min(plain[name]), min(largo[name])
        pm, gm = statistics.median(plain[name]), statistics.median(largo[name])
        row = f"plain loop {p * 1000:7.2f} ms/step   largo.runtime.train {g * 1000:7.2f} ms/step"
        print(f"  {name:8} {row} (best)")
        row = f"plain loop {pm * 1000:7.2f} ms/step   largo.runtime.train {gm * 1000:7.2f} ms/step"
        print(f"  {'':8} {row} (median)")
        print(
            f"           trainer / plain {g / p:.3f}x best (target <= 1.05), {gm / pm:.3f}x median"
            f"   vs {layouts[0]} {g / baseline:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
