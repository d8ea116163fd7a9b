"""The baseline for bench/trainer_overhead.py: a plain DDP loop over the same model and data as the
reference trainer, with none of its bookkeeping (no checkpoints, metrics, progress or stop flag).

Run under torchrun; rank 0 prints {"seconds_per_step": ...} over the whole loop.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from largo.runtime import data
from largo.runtime.model import ModelConfig, TinyGPT
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(TinyGPT(ModelConfig(context=args.context)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    corpus = data.load_bytes(data.default_corpus())
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets = data.batch(corpus, args.context, args.batch_size, args.seed, step, rank)
        loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - started
    if rank == 0:
        print(json.dumps({"seconds_per_step": elapsed / args.steps}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
