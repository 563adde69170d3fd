"""Time one decode token's all-reduce (GLM-4-9B: hidden 4096, bf16 = 8 KiB per sequence) between the processes.

Run under torchrun, one process per GPU (NCCL; NVLink multicast stays off) or on CPUs (gloo). Eager calls on any
backend; on GPUs also 80 all-reduces (one token's worth for GLM-4-9B's 40 layers) captured in one CUDA graph, as
``TPDecoder`` replays them.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node 2 benchmarks/allreduce_latency.py
    torchrun --nproc-per-node 2 benchmarks/allreduce_latency.py --name allreduce_latency_cpu   # gloo on CPUs
Writes benchmarks/results/NAME.json from rank 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from glmkit.bench import save_result


def eager_us(t: torch.Tensor, repeats: int, sync: object) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        sync()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def graph_us(t: torch.Tensor, per_token: int, repeats: int) -> float:
    """Per all-reduce, from a graph of ``per_token`` of them (what a decode step replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            dist.all_reduce(t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_token):
            dist.all_reduce(t)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6 / per_token)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--name", default="allreduce_latency")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda") if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for batch in args.batches:
        t = torch.ones(batch, args.hidden, dtype=torch.bfloat16, device=device)
        eager_us(t, 10, sync)  # warm-up: connections, buffers
        row = {"batch_size": batch, "bytes": t.numel() * t.element_size(), "backend": dist.get_backend(),
               "eager_us": eager_us(t, args.repeats, sync)}
        if cuda:
            row["in_cuda_graph_us"] = graph_us(t, 80, max(args.repeats // 10, 5))
        rows.append(row)
        if dist.get_rank() == 0:
            print(row, flush=True)
    if dist.get_rank() == 0:
        save_result(args.name, {"method": "median over repeats; graph: 80 all-reduces (one GLM-4-9B token) per replay",
                                "world_size": dist.get_world_size(), "runs": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
