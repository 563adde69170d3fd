"""Time one decode token's all-reduce (GLM-4-9B: hidden 4096, bf16 = 8 KiB per sequence) between the processes:
NCCL's against torch's symmetric-memory one-shot kernel (``glmkit.allreduce``), eagerly and inside a CUDA graph.

Run under torchrun, one process per GPU (NCCL; NVLink multicast stays off) or on CPUs (gloo, where "symm" falls back
to the group's all-reduce and the row says why). Eager calls on any backend; on GPUs also 81 all-reduces (one token's
worth for TP=2 GLM-4-9B: the embedding and 2 per layer) captured in one CUDA graph, as ``TPDecoder`` replays them.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node 2 benchmarks/allreduce_latency.py
    torchrun --nproc-per-node 2 benchmarks/allreduce_latency.py --name allreduce_latency_cpu   # gloo on CPUs
Writes benchmarks/results/NAME.json from rank 0. ``benchmarks/tp_fast.py`` records the same rows in its own run.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from glmkit.allreduce import MODES, PER_TOKEN, latency_rows
from glmkit.bench import save_result
from glmkit.parallel import init_process_group, leave_process_group

METHOD = f"median over repeats; graph: {PER_TOKEN} all-reduces (one TP=2 GLM-4-9B token) per replay, per call"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--allreduce", nargs="+", choices=MODES, default=["nccl", "symm"])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--name", default="allreduce_latency")
    args = ap.parse_args()
    group = init_process_group()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows = latency_rows(group, device, args.allreduce, args.batches, args.hidden, args.repeats)
    if dist.get_rank() == 0:
        for row in rows:
            print(row, flush=True)
        save_result(args.name, {"method": METHOD, "world_size": dist.get_world_size(), "runs": rows})
    leave_process_group(0)  # under NCCL: exit without destroying a group whose all-reduces graphs captured


if __name__ == "__main__":
    main()
