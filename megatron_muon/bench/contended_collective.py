"""What one collective costs when gloo ranks share fewer cores than there are ranks (the world-4 CPU benchmark:
4 ranks on 2 cores): every rank runs rounds of matmul work, with and without a 64 KB all-reduce after each round;
the difference of the median rounds is the collective's cost, mostly waiting for a descheduled peer, not moving bytes. The
``cpu`` profile of ``optim/plan.py`` ``GPU_PROFILES`` takes its latency from this measurement.

    python tools/bench_contended_collective.py [--ranks 4] [--repeats 7]   (this module's command line)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from multiprocessing.queues import SimpleQueue
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import spawn

ROUNDS = 20
MATMULS_PER_ROUND = 16


def _work(a: torch.Tensor) -> torch.Tensor:
    for _ in range(MATMULS_PER_ROUND):
        a = a @ a
        a = a / a.norm()
    return a


def _rank(rank: int, world: int, port: int, repeats: int, queue: SimpleQueue[Any]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    a = torch.randn(256, 256)
    small = torch.zeros(16384)
    # Rounds alternate plain / with an all-reduce, each timed alone, so load spikes hit both kinds alike.
    rounds: dict[bool, list[float]] = {False: [], True: []}
    dist.barrier()
    for index in range(2 * ROUNDS * repeats):
        with_collective = index % 2 == 1
        started = time.perf_counter()
        a = _work(a)
        if with_collective:
            dist.all_reduce(small)
        rounds[with_collective].append(time.perf_counter() - started)
    if rank == 0:
        queue.put(
            (
                statistics.median(rounds[True]) - statistics.median(rounds[False]),
                statistics.median(rounds[False]),
            )
        )
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Measure one all-reduce's cost among contending gloo ranks and print it; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--port", type=int, default=29577)
    args = parser.parse_args(argv)
    queue = mp.get_context("spawn").SimpleQueue()
    # ignore[no-untyped-call]: torch's spawn has no annotations.
    spawn(_rank, args=(args.ranks, args.port, args.repeats, queue), nprocs=args.ranks)  # type: ignore[no-untyped-call]
    per_collective, plain = queue.get()
    print(
        f"{args.ranks} gloo ranks on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}: rank 0's "
        f"round median {plain * 1e3:.1f} ms plain, {per_collective * 1e3:+.1f} ms with one all-reduce "
        f"({2 * ROUNDS * args.repeats} rounds)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
