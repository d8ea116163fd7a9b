"""Benchmark: one pass of the pure gang scheduler (largo.sched.gang.schedule) on a random cluster,
against the least any scheduler must do in the same run: reading the inventory into free capacity
(largo.sched.inventory.free_by_node). Prints the median time of each and their ratio per size.

    .venv/bin/python bench/gang_schedule.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

from largo.sched.gang import schedule
from largo.sched.inventory import free_by_node
from largo.sched.synthetic import cluster, queue_for, usage_for


def median_seconds(call: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print(f"{'nodes':>6} {'jobs':>5} {'inventory read':>15} {'scheduler pass':>15} {'ratio':>7}")
    for nodes_count, jobs_count in ((200, 50), (1000, 200), (2000, 500)):
        rng = random.Random(5)
        nodes = cluster(rng, nodes_count)
        usage = usage_for(rng, nodes)
        queue = queue_for(rng, jobs_count)
        base = median_seconds(partial(free_by_node, nodes, usage), args.rounds)
        ours = median_seconds(partial(schedule, nodes, usage, queue), args.rounds)
        row = f"{nodes_count:>6} {jobs_count:>5} {base * 1e3:>12.2f} ms {ours * 1e3:>12.2f} ms"
        print(f"{row} {ours / base:>6.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
