"""What the two-GPU checks of glmkit's push all-reduce share (``gpu_smoke_push.py``, ``push_variants.py``): one
token's chain of 81 all-reduces, its CUDA graph, NCCL's sum to check against, and the first call that differs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from glmkit.allreduce import PER_TOKEN, PUSH_BLOCK

Sum = Callable[[torch.Tensor], torch.Tensor]


def nccl_sum(t: torch.Tensor) -> torch.Tensor:
    """NCCL's all-reduce on a copy: it sums in place, and a graph's input must stay as it was for the next replay."""
    t = t.clone()
    dist.all_reduce(t)
    return t


def chain(fn: Sum, x: torch.Tensor, gap_cycles: int = 0) -> list[torch.Tensor]:
    """One token's all-reduces one after another, each output halved into the next input (two ranks: the sum halved
    stays the same size), with ``gap_cycles`` of GPU sleep after each; every call's output."""
    outs = []
    for _ in range(PER_TOKEN):
        outs.append(fn(x))
        if gap_cycles:
            torch.cuda._sleep(gap_cycles)
        x = outs[-1] * 0.5
    return outs


def captured(fn: Sum, x: torch.Tensor, gap_cycles: int = 0) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor],
                                                                      torch.Tensor]:
    """``chain`` run once on a side stream, then captured in a CUDA graph: the graph, its outputs and its input.
    Keep the input alive while the graph is replayed: freed, later allocations reuse its memory and the replays
    read whatever they leave there."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(fn, x.clone(), gap_cycles)
    torch.cuda.current_stream().wait_stream(s)
    g, inp = torch.cuda.CUDAGraph(), x.clone()
    with torch.cuda.graph(g):
        outs = chain(fn, inp, gap_cycles)
    return g, outs, inp


def first_wrong(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict | None:
    """The first call whose output differs, with the programs (``PUSH_BLOCK`` values each) that differ, or None."""
    for c, (a, b) in enumerate(zip(got, want)):
        if not torch.equal(a, b):
            wrong = (a != b).view(-1).nonzero().view(-1)
            return {"call": c, "wrong_values": int(wrong.numel()),
                    "programs": sorted({int(i) // PUSH_BLOCK for i in wrong.tolist()})[:16],
                    "max_diff": float((a.float() - b.float()).abs().max())}
    return None
