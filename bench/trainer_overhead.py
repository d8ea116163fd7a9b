"""Benchmark: time per step of the reference trainer (largo.runtime.train, with checkpoints every 50
steps, metrics and progress bookkeeping) against a plain DDP loop on the same model and data.

Both run under torchrun with 2 processes on gloo, alternately, in the same run; prints the median
seconds per step of each and the ratio (target <= 1.05).

    .venv/bin/python bench/trainer_overhead.py [--steps 200] [--rounds 3]
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


def torchrun(args: list[str]) -> list[dict[str, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(free_port()), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    batch, context = 16, 64
    plain, largo = [], []
    for _ in range(args.rounds):
        lines = torchrun([str(HERE / "plain_ddp.py"), "--steps", str(args.steps)])
        plain.append(lines[-1]["seconds_per_step"])
        with tempfile.TemporaryDirectory() as checkpoints:
            lines = torchrun(
                [
                    "-m",
                    "largo.runtime.train",
                    "--steps",
                    str(args.steps),
                    "--checkpoint-dir",
                    checkpoints,
                    "--checkpoint-every",
                    "50",
                    "--metrics-port",
                    str(free_port()),
                    "--log-every",
                    "50",
                ]
            )
        # The trainer reports tokens/s over its whole loop: back to seconds per step.
        largo.append(batch * context * 2 / lines[-1]["tokens_per_second"])
    p, g = statistics.median(plain), statistics.median(largo)
    shape = f"TinyGPT (batch {batch}, context {context})"
    print(f"{args.steps} steps x {args.rounds} rounds, 2 processes on gloo, {shape}")
    print(f"  plain DDP loop            {p * 1000:7.2f} ms/step")
    print(f"  largo.runtime.train       {g * 1000:7.2f} ms/step  (checkpoint every 50, metrics, progress)")
    print(f"  ratio                     {g / p:.3f}x  (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
