"""The baseline for bench/trainer_overhead.py: a plain training loop over the same model, data and
layout as the reference trainer, with none of its bookkeeping (no checkpoints, metrics, progress or
stop flag). Plain data parallelism is DDP; with --tp or --pp the model is split as the trainer splits
it (largo.runtime.parallel.build, torch's pipelining schedule).

Run under torchrun; rank 0 prints {"seconds_per_step": ...} over the whole loop.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from largo.runtime import data, parallel
from largo.runtime.model import ModelConfig, TinyGPT
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    torch.manual_seed(args.seed)
    layout = parallel.Layout(world, args.tp, args.pp)
    model: torch.nn.Module = TinyGPT(ModelConfig(context=args.context))
    schedule = None
    stage, _, _ = layout.coordinates(rank)
    if layout.model_parallel:
        model, mesh = parallel.build(model, layout, rank, torch.device("cpu"))  # type: ignore[arg-type]
        microbatches = layout.microbatches(args.batch_size * args.tp * args.pp)
        schedule = parallel.pipeline_schedule(model, layout, rank, torch.device("cpu"), mesh, microbatches)
    else:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    corpus = data.load_bytes(data.default_corpus())
    shards = layout.data_shards(rank)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets = data.replica_batch(corpus, args.context, args.batch_size, args.seed, step, shards)
        optimizer.zero_grad(set_to_none=True)
        if schedule is None:
            model(inputs, targets).backward()
        elif stage == 0:
            schedule.step(inputs)
        else:
            schedule.step(target=targets if stage == layout.pipeline - 1 else None)
        optimizer.step()
    elapsed = time.perf_counter() - started
    if rank == 0:
        print(json.dumps({"seconds_per_step": elapsed / args.steps}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
