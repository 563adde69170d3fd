"""The fast decode path across a layer split: one GPU's FastDecoder against the 20/20 split's.

GLM-4-9B-Chat architecture, random weights built on the GPU, bf16, an 8K static cache (every step attends over all
8,192 positions, masked, so a step costs what it costs at an 8K context; the prompt is 32 tokens to keep the run
short), 128 new tokens, decode tok/s summed over the batch, median of 3 runs after a warm-up.

- With two GPUs: one GPU uncapped against the 20/20 split on two cards capped at 12 GiB each
  (``torch.cuda.set_per_process_memory_fraction``, an RTX 3060 each).
- With one GPU: the one-GPU proxy of the split, both halves on cuda:0 (a map that names the card twice, 0 and
  "cuda:0": two segments, two CUDA graphs per step and the hand-over between them; only the NVLink hop is
  missing, 18 µs per token on 2×H200), against the one-device decoder in the same run.
Batch sizes: 1, the largest the planner fits on 2×12 GiB at 8K (``plan_memory(..., fast_decode=True)`` when the
planner has it), and 16 if it fits. The same greedy tokens on both sides are checked (64 tokens).
``result["tensor_parallel"]`` is the slot for the TP rows (``--tp 2``) once that path has a fast decoder.

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


def planned_batch(config: Any, device_map: dict[str, Any], largest: int = 64) -> dict[str, Any]:
    """The largest batch the planner fits at 8K on 2×12 GiB with this map (fast-path budget when it has one)."""
    import inspect

    from glmkit.planning import plan_memory

    fast = "fast_decode" in inspect.signature(plan_memory).parameters
    kw = {"fast_decode": True} if fast else {}
    best = 0
    for b in range(1, largest + 1):
        if not plan_memory(config, [CARD, CARD], device_map=device_map, context_len=CONTEXT, batch_size=b,
                           cuda_context=0, **kw).fits:
            break
        best = b
    return {"batch": best, "planner": "plan_memory(fast_decode=True)" if fast else "plan_memory (plain generate(); "
            "no fast-path budget in this planner yet)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", nargs="+", type=int, help="default: 1, the planner's largest at 8K, 16")
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
    plan = planned_batch(config, split_layers(config, [20, 20]))
    batches = args.batches or sorted({1, plan["batch"], 16} - {0})
    result: dict[str, Any] = {
        "mode": "two GPUs, each capped at 12 GiB" if two else "one-GPU proxy: both halves of the split on cuda:0",
        "context": CONTEXT, "new_tokens": args.new_tokens, "planned_batch_at_8k": plan, "rows": [],
        "tensor_parallel": [],  # slot: FastDecoder rows for --tp 2 (one rank's shard per GPU) when TP has one
    }

    def save() -> None:
        save_result("two_gpu_fast", {"method": "GLM-4-9B architecture, random weights, bf16, FastDecoder defaults "
                                               "(compiled layer, CUDA graphs, Triton GEMVs at batch 1), 8K static "
                                               f"cache, 32-token prompt, {args.new_tokens} new tokens, median of "
                                               f"{args.repeats} runs after a warm-up", **result})

    def measure(model: torch.nn.Module, label: str, b: int) -> dict[str, Any]:
        gc.collect()
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
        row: dict[str, Any] = {"path": label, "batch_size": b}
        try:
            dec = FastDecoder(model, max_len=CONTEXT, batch_size=b, graph_batch_sizes=[b])
            runs = [dec.tokens_per_second(32, args.new_tokens) for _ in range(args.repeats)]
            row |= {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                    "runs_tok_s": [r["decode_tok_s"] for r in runs], "gemv": dec.gemv,
                    "segments": [f"{s.entry!r}: layers {s.layers.start}..{s.layers.stop - 1}" for s in dec.segments]}
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
    one = {b: measure(model, "one GPU", b) for b in batches}  # uncapped
    want = greedy(model)
    model = dispatch_model(model, device_map, main_device="cuda:0")  # the split: layers 20..39 + head move (2 GPUs)
    gc.collect()
    torch.cuda.empty_cache()
    if two:
        for i in (0, 1):
            torch.cuda.set_per_process_memory_fraction(CARD / torch.cuda.get_device_properties(i).total_memory, i)
    label = "split 20/20, two GPUs capped at 12 GiB" if two else "split 20/20, one-GPU proxy (both halves on cuda:0)"
    got = greedy(model)
    result["greedy_tokens_identical"] = got == want
    for b in batches:
        row = measure(model, label, b)
        if "decode_tok_s" in row and "decode_tok_s" in one[b]:
            row["over_one_gpu"] = row["decode_tok_s"] / one[b]["decode_tok_s"]
        result["rows"] += [one[b], row]
        save()
    print({"greedy_tokens_identical": result["greedy_tokens_identical"]}, flush=True)
    save()


if __name__ == "__main__":
    main()
