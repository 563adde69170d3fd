"""What sending one decoder call from a TP server's rank 0 to rank 1 costs: a pickled ``broadcast_object_list`` of
``("decode_step", tokens, positions)`` (how ``TPLeader`` sent it before) against one int64 tensor broadcast (how it
sends it now), over gloo, as ``glmkit serve --tp 2`` does, at batch 16.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/tp_commands.py
Writes benchmarks/results/tp_commands.json (and to $OUT).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from glmkit.bench import save_result
from glmkit.tp_decode import HEADER

BATCH, CALLS, REPEATS = 16, 500, 5


def per_call_us(send) -> float:
    """Median over REPEATS of the mean microseconds per call of ``send`` (after a warm-up)."""
    for _ in range(50):
        send()
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(CALLS):
            send()
        times.append((time.perf_counter() - t0) / CALLS * 1e6)
    return statistics.median(times)


def main() -> None:
    dist.init_process_group("gloo")
    leader = dist.get_rank() == 0
    tokens, positions = torch.arange(BATCH), torch.arange(BATCH) + 100
    wire = torch.zeros(HEADER + 2 * BATCH, dtype=torch.long)

    def pickled() -> None:
        dist.broadcast_object_list([("decode_step", tokens, positions)] if leader else [None], src=0)

    def tensor() -> None:
        if leader:
            wire[HEADER:HEADER + BATCH], wire[HEADER + BATCH:] = tokens, positions
        dist.broadcast(wire, src=0)

    row = {"pickled_object_us": per_call_us(pickled), "int64_tensor_us": per_call_us(tensor)}
    if leader:
        row["speedup"] = row["pickled_object_us"] / row["int64_tensor_us"]
        print(row, flush=True)
        save_result("tp_commands", {"method": f"gloo, 2 processes on this machine, batch {BATCH}: median of {REPEATS} "
                                              f"means over {CALLS} calls after 50 warm-up calls", **row})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
