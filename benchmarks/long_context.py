"""Longest prompt on an emulated consumer card: plain generate() vs glmkit's chunked prefill, against the planner.

Caps this process's PyTorch allocator at the card's size (torch.cuda.set_per_process_memory_fraction), then for
each prompt length runs (a) plain generate() and (b) glmkit's chunked prefill (attention through
glmkit.generation.gqa_attention: no mask, no K/V copy per query head) + generate(), 4 new tokens, and records
which fit and the planner's prediction. bf16 on a 24 GiB card (2048-token chunks) and nf4 on a 12 GiB card
(256-token chunks: less room; with 512 a 128K prompt missed by 28 MiB) by default.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/long_context.py --checkpoint /tmp/glm9b
Writes benchmarks/results/long_context.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import gc

from glmkit.bench import save_result, try_generate
from glmkit.models import ensure_random_checkpoint

SETUPS = {"bf16@24GiB": ("bf16", 24, 2048), "nf4@12GiB": ("nf4", 12, 256)}  # precision, GiB, prefill chunk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--setups", nargs="+", default=list(SETUPS))
    ap.add_argument("--plain", nargs="+", type=int, default=[16384, 24576, 32768])
    ap.add_argument("--chunked", nargs="+", type=int, default=[65536, 98304, 131000])
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: per setup)")
    ap.add_argument("--dynamic-cache", nargs="*", type=int, default=[],
                    help="prompt lengths to also run chunked with transformers' DynamicCache (grows by concatenation)")
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig, DynamicCache

    from glmkit.planning import max_context
    from glmkit.quantization import PRECISIONS, load_precision

    ensure_random_checkpoint(args.checkpoint)
    config = AutoConfig.from_pretrained(args.checkpoint)
    total = torch.cuda.get_device_properties(0).total_memory
    runs = []
    for setup in args.setups:
        precision, gib, chunk = SETUPS[setup]
        chunk = args.chunk or chunk
        dtype, quantization = PRECISIONS[precision]
        budget = gib * 2**30
        torch.cuda.set_per_process_memory_fraction(budget / total, 0)
        model = load_precision(args.checkpoint, precision, device_map="cuda:0")
        # The cap limits PyTorch's allocator only: plan with no CUDA-context share for a like-for-like prediction.
        kw = dict(dtype=dtype, quantization=quantization, cuda_context=0)
        predicted = {"plain": max_context(config, [budget], **kw),
                     "chunked": max_context(config, [budget], prefill_chunk=chunk, **kw)}
        print(setup, "planner:", predicted, flush=True)
        for mode, lengths in (("plain", args.plain), ("chunked", args.chunked), ("chunked, DynamicCache", args.dynamic_cache)):
            for n in lengths:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                ids = torch.randint(0, 1000, (1, n), device="cuda")
                row = {"setup": setup, "mode": mode, "prompt_len": n,
                       "planner_max_context": predicted["plain" if mode == "plain" else "chunked"],
                       **({"chunk": chunk} if mode != "plain" else {})}
                own = DynamicCache(config=config) if mode == "chunked, DynamicCache" else None
                row |= try_generate(model, ids, 4, chunk if mode != "plain" else None, cache=own)
                row["peak_reserved"] = torch.cuda.max_memory_reserved()
                row["peak_allocated"] = torch.cuda.max_memory_allocated()
                del ids, own  # the caches hold GBs: drop them before the next run
                runs.append(row)
                print(row, flush=True)
                save_result("long_context", {"method": "allocator capped with set_per_process_memory_fraction; 4 new "
                                                       "tokens; chunked = glmkit.generation.chunked_prefill "
                                                       "(gqa_attention)", "runs": runs})
        del model
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


if __name__ == "__main__":
    main()
