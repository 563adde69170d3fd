"""PyTorch's default caching allocator replayed on GLM-4-9B's prefill: where its slack comes from. CPU only.

The forward of plain ``generate()`` (bf16 prefill plus one decode step, DynamicCache, sdpa) runs on the meta
device, so no memory and no GPU are needed; a dispatch mode records every tensor storage made and freed, in order.
The trace is replayed through a model of ``CUDACachingAllocator`` with its default settings: requests rounded to
512 bytes; up to 1 MiB from 2 MiB segments, under 10 MiB from 20 MiB segments, larger ones from a segment of the
request's size (2 MiB steps); best fit among cached free blocks, split when more than 1 MiB is left, neighbours
merged on free; nothing handed back (no memory pressure). Reserved minus allocated at the peak is the slack the
planner budgets (``glmkit.costs.allocator_slack``), compared here with the slack measured on H100/H200 cards.

    python benchmarks/allocator_replay.py          # about 15 s per case on one core

Writes benchmarks/results/allocator_replay.json. Kernel workspaces and any CUDA-only temporaries are not in the
trace (the meta device runs the same Python code, not the same kernels).
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from glmkit.bench import save_result
from glmkit.models import glm4_9b_chat_config
from glmkit.results import load

MiB, GiB = 2**20, 2**30
CASES = [(1, 2048), (1, 8192), (1, 16384), (1, 32768), (1, 65536), (1, 131072),
         (4, 2048), (4, 8192), (4, 16384), (4, 32768)]  # (batch, context): the measured bf16 default-allocator grid


def trace(model: torch.nn.Module, batch: int, prompt_len: int) -> list[tuple[Any, ...]]:
    """("a", id, bytes, op) / ("f", id) for every storage the prefill and one decode step make and free."""
    from transformers import DynamicCache

    events: list[tuple[Any, ...]] = []
    live: dict[int, list[int]] = {}

    def release(key: int) -> None:
        entry = live[key]
        entry[1] -= 1
        if entry[1] == 0:
            events.append(("f", entry[0]))
            del live[key]

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                    key = t.untyped_storage()._cdata
                    if key not in live:
                        live[key] = [len(events), 0]
                        events.append(("a", len(events), t.untyped_storage().nbytes(), str(func)))
                    live[key][1] += 1
                    weakref.finalize(t, release, key)
            return out

    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), Record():
        for tokens in (prompt_len, 1):
            ids = torch.zeros((batch, tokens), dtype=torch.long, device="meta")
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return events


@dataclass(eq=False)
class Block:
    addr: int
    size: int
    small: bool
    free: bool = True
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)

    def key(self) -> tuple[int, int]:
        return self.size, self.addr


class CachingAllocator:
    """The default ``CUDACachingAllocator``'s block policy (one stream, no memory pressure)."""

    def __init__(self) -> None:
        self.pools: dict[bool, list[tuple[int, int, Block]]] = {True: [], False: []}
        self.reserved = self.allocated = self.peak_reserved = self.peak_allocated = 0
        self.segments = 0

    @staticmethod
    def segment_size(size: int) -> int:
        if size <= MiB:
            return 2 * MiB
        return 20 * MiB if size < 10 * MiB else -(-size // (2 * MiB)) * 2 * MiB

    def malloc(self, nbytes: int) -> Block:
        size = max(512, -(-nbytes // 512) * 512)
        small = size <= MiB
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            block = pool.pop(i)[2]
        else:
            seg = self.segment_size(size)
            block = Block(self.segments << 48, seg, small)
            self.segments += 1
            self.reserved += seg
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        rest = block.size - size
        if rest >= 512 if small else rest > MiB:
            tail = Block(block.addr + size, rest, small, prev=block, next=block.next)
            if block.next:
                block.next.prev = tail
            block.next, block.size = tail, size
            bisect.insort(pool, (*tail.key(), tail))
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        self.allocated -= block.size
        block.free = True
        pool = self.pools[block.small]
        for other in (block.prev, block.next):
            if other is not None and other.free:
                pool.remove((*other.key(), other))
                first, second = (other, block) if other is block.prev else (block, other)
                first.size += second.size
                first.next = second.next
                if second.next:
                    second.next.prev = first
                block = first
        bisect.insort(pool, (*block.key(), block))


def replay(events: list[tuple[Any, ...]]) -> CachingAllocator:
    allocator, blocks = CachingAllocator(), {}
    for event in events:
        if event[0] == "a":
            blocks[event[1]] = allocator.malloc(event[2])
        else:
            allocator.free(blocks.pop(event[1]))
    return allocator


def measured_slack() -> dict[tuple[int, int], int]:
    """Peak reserved minus peak allocated, bf16 with the default allocator, from the committed GPU runs."""
    out = {}
    for name in ("planner_accuracy_default_allocator", "planner_accuracy_long_default"):
        for c in (load(name) or {}).get("cases", []):
            if c["precision"] == "bf16" and "peak_reserved" in c:
                out[(c["batch_size"], c["context_len"])] = c["peak_reserved"] - c["peak_allocated"]
    return out


def main() -> None:
    from transformers import GlmForCausalLM

    config = glm4_9b_chat_config()
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = GlmForCausalLM(config).to(torch.bfloat16).eval()
    measured, rows = measured_slack(), []
    for batch, context in CASES:
        allocator = replay(trace(model, batch, context - 2))
        gate_up = 2 * 2 * config.intermediate_size * batch * context
        row = {"batch_size": batch, "context_len": context, "replayed_peak_allocated": allocator.peak_allocated,
               "replayed_peak_reserved": allocator.peak_reserved,
               "replayed_slack": allocator.peak_reserved - allocator.peak_allocated,
               "measured_slack": measured.get((batch, context)), "gate_up_bytes": gate_up}
        rows.append(row)
        m = row["measured_slack"]
        print(f"batch {batch} x {context}: replayed slack {row['replayed_slack'] / GiB:.3f} GiB "
              f"({row['replayed_slack'] / gate_up:.2f} G), measured "
              f"{'-' if m is None else f'{m / GiB:.3f} GiB ({m / gate_up:.2f} G)'}", flush=True)
    save_result("allocator_replay", {
        "method": "GLM-4-9B bf16 prefill + 1 decode step traced on the meta device (storages made/freed in order), "
                  "replayed through a model of PyTorch's default CUDACachingAllocator (512 B rounding; 2/20 MiB "
                  "segments under 1/10 MiB, else the request's size in 2 MiB steps; best fit; split above 1 MiB; "
                  "merge on free); slack = peak reserved - peak allocated; measured slack from "
                  "planner_accuracy_default_allocator.json / planner_accuracy_long_default.json",
        "cases": rows})


if __name__ == "__main__":
    main()
