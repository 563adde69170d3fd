"""Planner vs. measured peak memory for GLM-4-9B-Chat (random weights) on one GPU.

For bf16, int8 and nf4, contexts 2K-32K and batch 1 and 4: run a plain ``generate()`` (prompt of
context-2 tokens, 2 new tokens), measure the peak a card must hold (PyTorch's peak reserved memory +
the process's non-PyTorch memory from NVML) and compare it with ``plan_memory``'s total.

    python benchmarks/planner_accuracy.py --checkpoint /tmp/glm9b --allocator expandable
    python benchmarks/planner_accuracy.py --recompute benchmarks/results/planner_accuracy.json

Past 32K, one allocator per process (PyTorch reads its setting once, when CUDA starts):

    python benchmarks/planner_accuracy.py --precisions bf16 --contexts 65536 131072 --batches 1 --no-speed \
        --allocator expandable --name planner_accuracy_long_expandable
    python benchmarks/planner_accuracy.py --precisions bf16 --contexts 65536 131072 --batches 1 --no-speed \
        --allocator default --name planner_accuracy_long_default

Fits and checks: the slack terms (``glmkit.costs.allocator_slack``) were fitted on planner_accuracy.json
(expandable_segments) and planner_accuracy_default_allocator.json (default); planner_validation.json and the two
long runs were kept aside to check them (``tests/test_planning.py`` fails when any case is off by 5% or more).

Measurements are stored raw; ``--recompute`` re-derives the predictions and errors from them with the
current planner (pure arithmetic, no GPU), so a planner change is checked against the same measurements.
Writes benchmarks/results/NAME.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
from typing import Any

from glmkit.bench import (
    NvmlBaseline,
    decode_tokens_per_second,
    measure_generate_peak,
    save_result,
)
from glmkit.env import use_expandable_segments
from glmkit.models import ensure_random_checkpoint
from glmkit.vocabulary import ALLOC_CONF_ENV, ALLOCATORS, EXPANDABLE_SEGMENTS, PRECISIONS, expandable_in

MEASURED = ("bf16", "nf4", "int8")  # names from glmkit.vocabulary.PRECISIONS


def predict(case: dict[str, Any], total: int, expandable: bool) -> dict[str, Any]:
    """The planner's prediction for one measured case, and its errors against the measurement."""
    from glmkit.models import glm4_9b_chat_config
    from glmkit.planning import plan_memory
    dtype, quantization = PRECISIONS[case["precision"]]
    plan = plan_memory(glm4_9b_chat_config(), {0: total}, dtype=dtype, quantization=quantization,
                       batch_size=case["batch_size"], context_len=case["context_len"], expandable_segments=expandable)
    d = plan.devices[0]
    out = {"planned": {"weights": d.weights, "kv_cache": d.kv_cache, "activations": d.activations,
                       "allocator": d.allocator, "cuda_context": d.cuda_context, "total": d.total},
           "planner_problems": plan.problems}
    if "measured_peak" in case:
        out["error"] = (d.total - case["measured_peak"]) / case["measured_peak"]
        live = d.weights + d.kv_cache + d.activations
        out["allocated_error"] = (live - case["peak_allocated"]) / case["peak_allocated"]
    return out


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [c["error"] for c in cases if "error" in c]
    worst = max(cases, key=lambda c: abs(c.get("error", 0)))
    return {"worst_abs_error": max(map(abs, errors)) if errors else None,
            "worst_case": {k: worst.get(k) for k in ("precision", "batch_size", "context_len", "error")},
            "cases_measured": len(errors)}


def recompute(path: Path) -> None:
    result = json.loads(path.read_text())
    expandable = result["allocator"] == "expandable_segments"
    total = result["environment"]["gpus"][0]["total_bytes"]
    for case in result["cases"]:
        case.update(predict(case, total, expandable))
    result.update(summarize(result["cases"]))
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{path.name}: worst |error| {result['worst_abs_error']:.2%} at {result['worst_case']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--precisions", nargs="+", default=list(MEASURED))
    ap.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192, 16384, 32768])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=2)
    ap.add_argument("--name", default="planner_accuracy")
    ap.add_argument("--recompute", nargs="+", type=Path, help="re-derive predictions for stored results; no GPU")
    ap.add_argument("--allocator", choices=ALLOCATORS,
                    help="set PYTORCH_CUDA_ALLOC_CONF for this process (default: the environment's, else expandable)")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurement")
    args = ap.parse_args()
    if args.recompute:
        for path in args.recompute:
            recompute(path)
        return
    if args.allocator:  # before CUDA starts: PyTorch reads it once
        os.environ[ALLOC_CONF_ENV] = EXPANDABLE_SEGMENTS if args.allocator == "expandable" else "expandable_segments:False"
    use_expandable_segments()  # what every glmkit process does (load_model would too, later)
    nvml = NvmlBaseline()  # before the first CUDA call
    import torch

    from glmkit.loading import load_model

    expandable = expandable_in(os.environ.get(ALLOC_CONF_ENV))
    ensure_random_checkpoint(args.checkpoint)
    total = torch.cuda.get_device_properties(0).total_memory
    cases, loads, speeds = [], [], []
    for name in args.precisions:
        dtype, quantization = PRECISIONS[name]
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = load_model(args.checkpoint, dtype=getattr(torch, dtype), device_map="cuda:0", quantization=quantization)
        loaded = torch.cuda.memory_allocated() - before
        planned = predict({"precision": name, "batch_size": 1, "context_len": 1}, total, expandable)
        loads.append({"precision": name, "measured_weights": loaded, "planned_weights": planned["planned"]["weights"]})
        print(loads[-1], flush=True)
        for batch in args.batches:
            for ctx in args.contexts:
                case: dict[str, Any] = {"precision": name, "batch_size": batch, "context_len": ctx}
                if predict(case, total, expandable)["planner_problems"]:
                    case["skipped"] = "the planner rules this case out (see planner_problems); bitsandbytes aborts the process"
                else:
                    try:
                        case |= measure_generate_peak(model, batch, ctx - args.new_tokens, args.new_tokens, nvml)
                    except torch.OutOfMemoryError as exc:
                        case["oom"] = str(exc)[:300]
                        torch.cuda.empty_cache()
                case |= predict(case, total, expandable)
                cases.append(case)
                print({k: (round(v / 2**30, 3) if isinstance(v, int) and v > 2**20 else v)
                       for k, v in case.items() if k != "planned"}, flush=True)
        for batch in () if args.no_speed else (1, 8):
            decode_tokens_per_second(model, 8, batch_size=batch)  # warm-up
            speeds.append({"precision": name, "batch_size": batch,
                           "tok_s": decode_tokens_per_second(model, 64, batch_size=batch)})
            print(speeds[-1], flush=True)
        del model
        save_result(args.name, {
            "allocator": "expandable_segments" if expandable else "default",
            "alloc_conf": os.environ.get(ALLOC_CONF_ENV),
            "method": "plain generate(), prompt = context - new_tokens random ids, sdpa attention; measured_peak = "
                      "torch.cuda.max_memory_reserved() + (NVML used - used before CUDA init - memory_reserved())",
            "loads": loads, "cases": cases, "decode_speed": speeds,
            "decode_method": "plain generate(), dynamic cache, 32-token prompt, 64 new tokens, tok/s summed over the batch",
            **summarize(cases),
        })
    print(summarize(cases))


if __name__ == "__main__":
    main()
