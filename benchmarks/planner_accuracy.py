"""Planner vs. measured peak memory for GLM-4-9B-Chat (random weights) on one GPU.

For bf16, int8 and nf4, contexts 2K-32K and batch 1 and 4: run a plain ``generate()`` (prompt of
context-2 tokens, 2 new tokens), measure the peak a card must hold (PyTorch's peak reserved memory +
the process's non-PyTorch memory from NVML) and compare it with ``plan_memory``'s total.

    python benchmarks/planner_accuracy.py --checkpoint /tmp/glm9b   # builds it first if missing
Writes benchmarks/results/planner_accuracy.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from glmkit.bench import (
    NvmlBaseline,
    build_random_checkpoint,
    decode_tokens_per_second,
    measure_generate_peak,
    save_result,
)

PRECISIONS = {"bf16": (None, "bfloat16"), "nf4": ("nf4", "bfloat16"), "int8": ("int8", "float16")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    ap.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192, 16384, 32768])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=2)
    args = ap.parse_args()
    nvml = NvmlBaseline()  # before the first CUDA call
    import torch
    from transformers import AutoConfig

    from glmkit.loading import load_model
    from glmkit.planning import plan_memory

    if not (Path(args.checkpoint) / "config.json").exists():
        build_random_checkpoint(args.checkpoint)
    total = torch.cuda.get_device_properties(0).total_memory
    config = AutoConfig.from_pretrained(args.checkpoint)
    speeds = []
    cases = []
    loads = []
    for name in args.precisions:
        quantization, dtype = PRECISIONS[name]
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = load_model(args.checkpoint, dtype=getattr(torch, dtype), device_map="cuda:0", quantization=quantization)
        loaded = torch.cuda.memory_allocated() - before
        planned = plan_memory(config, {0: total}, dtype=dtype, quantization=quantization, context_len=1)
        loads.append({"precision": name, "measured_weights": loaded, "planned_weights": planned.devices[0].weights})
        print(f"{name}: weights {loaded / 2**30:.3f} GiB measured, {planned.devices[0].weights / 2**30:.3f} planned", flush=True)
        for batch in args.batches:
            for ctx in args.contexts:
                plan = plan_memory(config, {0: total}, dtype=dtype, quantization=quantization,
                                   batch_size=batch, context_len=ctx)
                d = plan.devices[0]
                row = {"precision": name, "planned": {"weights": d.weights, "kv_cache": d.kv_cache,
                                                      "activations": d.activations, "cuda_context": d.cuda_context,
                                                      "total": d.total}}
                try:
                    row |= measure_generate_peak(model, batch, ctx - args.new_tokens, args.new_tokens, nvml)
                    row["error"] = (d.total - row["measured_peak"]) / row["measured_peak"]
                    row["allocated_error"] = ((d.total - d.cuda_context) - row["peak_allocated"]) / row["peak_allocated"]
                except torch.OutOfMemoryError as exc:
                    row |= {"batch_size": batch, "context_len": ctx, "oom": str(exc)[:300]}
                    torch.cuda.empty_cache()
                cases.append(row)
                print({k: (round(v / 2**30, 3) if isinstance(v, int) and v > 2**20 else v)
                       for k, v in row.items() if k != "planned"}, flush=True)
        for batch in (1, 8):
            decode_tokens_per_second(model, 8, batch_size=batch)  # warm-up
            speeds.append({"precision": name, "batch_size": batch,
                           "tok_s": decode_tokens_per_second(model, 64, batch_size=batch)})
            print(speeds[-1], flush=True)
        del model
        errors = [abs(c["error"]) for c in cases if "error" in c]
        save_result("planner_accuracy", {
            "method": "plain generate(), prompt = context - new_tokens random ids, sdpa attention; measured_peak = "
                      "torch.cuda.max_memory_reserved() + (NVML used - used before CUDA init - memory_reserved())",
            "loads": loads, "cases": cases, "decode_speed": speeds,
            "decode_method": "plain generate(), dynamic cache, 32-token prompt, 64 new tokens, tok/s summed over the batch", "worst_abs_error": max(errors) if errors else None,
        })
    print(f"worst |error| {max(errors):.2%}")


if __name__ == "__main__":
    main()
