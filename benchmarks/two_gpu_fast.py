"""The fast decode path across a layer split: one GPU's FastDecoder against the 20/20 split's.

GLM-4-9B-Chat architecture, random weights built on the GPU, bf16, an 8K static cache (batch 16: see below; its
memory is an 8K context's; glmkit's decode attention reads only the positions written so far, so a step costs what it
costs at the 32-token prompt plus the tokens decoded), 128 new tokens, decode tok/s summed over the batch, median of 3
runs after a warm-up.

- With two GPUs: one GPU uncapped against the 20/20 split on two cards capped at 12 GiB each
  (``torch.cuda.set_per_process_memory_fraction``, an RTX 3060 each).
- With one GPU: the one-GPU proxy of the split, both halves on cuda:0 (a map that names the card twice, 0 and
  "cuda:0": two segments, two CUDA graphs per step and the hand-over between them; only the NVLink hop is
  missing, 18 µs per token on 2×H200), against the one-device decoder in the same run.
Batch sizes: 1 and the largest the planner fits on 2×12 GiB at 8K (``plan_memory(..., fast_decode=True)`` when
the planner has it, prompts prefilled in 2,048-token chunks), and 16 (at 8K if it fits, else at the longest context
the planner gives it; both sides of a row use the same context). The same greedy tokens on both sides are checked (64 tokens).
Tensor parallelism's rows (``--tp 2 --fast-decode``: ``TPDecoder``, one process per GPU under torchrun) come from
``benchmarks/tp_fast.py`` (``tp_fast.json``), against one GPU in its own run.

    python benchmarks/two_gpu_fast.py
Writes benchmarks/results/two_gpu_fast.json (and to $OUT). About 4 minutes on one H200.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from typing import Any

from glmkit.bench import save_result

CARD = 12 * 2**30
CONTEXT = 8192


def _plan_kwargs() -> dict[str, Any]:
    """The planner's arguments for the fast split: prompts prefilled in 2,048-token chunks (what a 12 GiB card
    needs at 8K), no CUDA-context share (the cap limits PyTorch's allocator only), the fast-path budget (fused
    q/k/v copy, static cache, graph pools)."""
    return {"prefill_chunk": 2048, "cuda_context": 0, "fast_decode": True}


def planned_rows(config: Any, device_map: dict[str, Any]) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """(batch, context) rows: batch 1 and the planner's largest batch at 8K on 2×12 GiB, and batch 16 at 8K if it
    fits, else at the longest context the planner gives batch 16."""
    from glmkit.planning import max_context, plan_memory

    kw = _plan_kwargs()

    def fits(b: int) -> bool:
        return plan_memory(config, [CARD, CARD], device_map=device_map, context_len=CONTEXT, batch_size=b, **kw).fits

    lo, hi = 0, 1
    while hi <= 256 and fits(hi):  # doubling, then bisection: the largest batch that fits
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    ctx16 = CONTEXT if lo >= 16 else max_context(config, [CARD, CARD], batch_size=16, device_map=device_map, **kw)
    ctx16 = min(CONTEXT, ctx16 // 256 * 256)
    rows = list(dict.fromkeys([(1, CONTEXT), (max(lo, 1), CONTEXT)] + ([(16, ctx16)] if ctx16 >= 512 else [])))
    return rows, {"largest_batch_at_8k": lo, "batch16_context": ctx16, "planner": "plan_memory(fast_decode=True)",
                  "plan_kwargs": kw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", nargs="+", type=int, help="at 8K (default: 1, the planner's largest, 16)")
    ap.add_argument("--hop", choices=["peer", "host"], default="peer",
                    help="the split's hand-over: device to device, or through pinned host memory (no peer-to-peer)")
    ap.add_argument("--name", default="two_gpu_fast")
    args = ap.parse_args()
    import torch
    from accelerate import dispatch_model

    from glmkit.device_map import split_layers
    from glmkit.fast_decode import FastDecoder
    from glmkit.models import glm4_9b_chat_config, random_model

    two = torch.cuda.device_count() >= 2
    config = glm4_9b_chat_config()
    split_devices = [0, 1] if two else [0, "cuda:0"]  # one GPU: the card named twice = two segments on it
    device_map = split_layers(config, [20, 20], devices=split_devices)
    rows, plan = planned_rows(config, split_layers(config, [20, 20]))
    if args.batches:
        rows = [(b, CONTEXT) for b in args.batches]
    result: dict[str, Any] = {
        "mode": "two GPUs, each capped at 12 GiB" if two else "one-GPU proxy: both halves of the split on cuda:0",
        "new_tokens": args.new_tokens, "hop": args.hop, "plan": plan, "rows": [],
    }

    method = ("GLM-4-9B architecture, random weights, bf16, FastDecoder defaults (compiled layer, CUDA graphs, "
              "Triton GEMVs at batch 1), static cache of the row's context (the decode attention reads the positions "
              "written so far), "
              f"32-token prompt, {args.new_tokens} new tokens, median of {args.repeats} runs after a warm-up")

    def save() -> None:
        save_result(args.name, {"method": method, **result})

    def measure(model: torch.nn.Module, label: str, b: int, context: int) -> dict[str, Any]:
        gc.collect()
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
        row: dict[str, Any] = {"path": label, "batch_size": b, "context": context}
        try:
            dec = FastDecoder(model, max_len=context, batch_size=b, graph_batch_sizes=[b], hop=args.hop)
            runs = [dec.tokens_per_second(32, args.new_tokens) for _ in range(args.repeats)]
            row |= {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                    "runs_tok_s": [r["decode_tok_s"] for r in runs], "gemv": dec.gemv,
                    "segments": [r[:3] for r in dec.rows()]}
            del dec
        except torch.OutOfMemoryError as exc:
            row["oom"] = str(exc)[:200]
        row["peak_allocated"] = [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]
        print(row, flush=True)
        return row

    def greedy(model: torch.nn.Module) -> list[int]:
        ids = torch.randint(0, 1000, (1, 32), device="cuda:0", generator=torch.Generator("cuda").manual_seed(1))
        out = FastDecoder(model, max_len=CONTEXT, graph_batch_sizes=[1]).generate(ids, 64, ignore_eos=True)
        return out[0, 32:].tolist()

    model = random_model(config, "cuda:0")
    one = {r: measure(model, "one GPU", *r) for r in rows}  # uncapped
    want = greedy(model)
    model = dispatch_model(model, device_map, main_device="cuda:0")  # the split: layers 20..39 + head move (2 GPUs)
    gc.collect()
    torch.cuda.empty_cache()
    if two:
        for i in (0, 1):
            torch.cuda.set_per_process_memory_fraction(CARD / torch.cuda.get_device_properties(i).total_memory, i)
    hop = ", hop through host memory" if args.hop == "host" else ""
    label = (f"split 20/20{hop}, two GPUs capped at 12 GiB" if two
             else f"split 20/20{hop}, one-GPU proxy (both halves on cuda:0)")
    got = greedy(model)
    result["greedy_tokens_identical"] = got == want
    for r in rows:
        row = measure(model, label, *r)
        if "decode_tok_s" in row and "decode_tok_s" in one[r]:
            row["over_one_gpu"] = row["decode_tok_s"] / one[r]["decode_tok_s"]
        result["rows"] += [one[r], row]
        save()
    print({"greedy_tokens_identical": result["greedy_tokens_identical"]}, flush=True)
    save()


if __name__ == "__main__":
    main()
