"""Where the time of one decode step goes: torch.profiler over GLM-4-9B-Chat (random weights, bf16) for the
glmkit fast path (eager layer; compiled layer with cuBLAS or with glmkit's Triton GEMVs; the latter replayed as a CUDA
graph, with the RMSNorms and residual adds folded into the GEMVs as it decodes, and kept apart to compare) and for one
plain forward with a dynamic cache.

    python benchmarks/profile_step.py --checkpoint /tmp/glm9b [--precision nf4] [--fast-only]
Writes benchmarks/results/profile_step.json (profile_step_nf4.json ...) (and to $OUT): per path, GPU kernel time by
kernel name, the kernels per step, the time of the kernels that are not weight-reading GEMVs (the part of a step that
does not shrink with the weights) and the step's wall time.
"""

from __future__ import annotations

import argparse
import time

from glmkit.bench import save_result
from glmkit.models import ensure_random_checkpoint

GEMV_NAMES = ("gemv", "nvjet", "gemm", "splitkreduce", "matmul")  # kernel names (lower case) of the projections


PDL_PATH = "fast, uncompiled layer, Triton GEMV, CUDA graph, PDL (the default)"


def profile(fn, steps: int = 5) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            kernels[e.key[:80]] = {"us_per_step": t / steps, "calls_per_step": e.count / steps}
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_step"])[:20])
    gpu = sum(v["us_per_step"] for v in kernels.values())
    launches = sum(v["calls_per_step"] for v in kernels.values())
    # the projections: glmkit's GEMVs (_gemv_kernel, _gemv4_kernel) or cuBLAS' (nvjet/gemv/gemm, split-K reductions)
    gemv = {k: v for k, v in kernels.items() if any(p in k.lower() for p in GEMV_NAMES)}
    gemv_us = sum(v["us_per_step"] for v in gemv.values())
    return {"wall_ms": 1000 * wall, "gpu_kernel_ms": gpu / 1000, "kernels_per_step": launches,
            "gemv_kernel_ms": gemv_us / 1000, "gemv_kernels_per_step": sum(v["calls_per_step"] for v in gemv.values()),
            "non_gemv_kernel_ms": (gpu - gemv_us) / 1000,
            "non_gemv_kernels_per_step": launches - sum(v["calls_per_step"] for v in gemv.values()),
            "launch_gaps_ms": 1000 * wall - gpu / 1000, "top_kernels": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--precision", default="bf16", help="bf16 (all paths), or fp16 / nf4 / nf4-dq (fast Triton paths)")
    ap.add_argument("--name", help="result file name (default: profile_step, or profile_step_PRECISION)")
    ap.add_argument("--fast-only", action="store_true",
                    help="only the fast path as it decodes (compiled, CUDA graph; bf16: also with sdpa attention and "
                         "with the norms apart)")
    args = ap.parse_args()
    import torch

    from glmkit.fast_decode import FastDecoder
    from glmkit.generation import cache_argument
    from glmkit.loading import load_model

    ensure_random_checkpoint(args.checkpoint)
    if args.precision == "bf16":
        model = load_model(args.checkpoint, dtype=torch.bfloat16, device_map="cuda:0")
        paths = (("fast, eager layer", {"compile": False, "cuda_graph": False, "gemv": False}),
                 ("fast, compiled layer", {"compile": True, "cuda_graph": False, "gemv": False}),
                 ("fast, compiled layer, Triton GEMV", {"compile": True, "cuda_graph": False, "gemv": "triton"}),
                 # rope + cache write + SDPA instead of glmkit's decode-attention kernel (the default, last)
                 ("fast, compiled layer, Triton GEMV, CUDA graph, sdpa attention",
                  {"gemv": "triton", "attention": "sdpa", "compile": True}),
                 # the RMSNorms and residual adds as kernels of their own instead of folded into the GEMVs
                 ("fast, compiled layer, Triton GEMV, CUDA graph, norms apart",
                  {"gemv": "triton", "fuse_norms": False, "compile": True}),
                 # all fused, the layer compiled (plain launches: each kernel's time is its own)
                 ("fast, compiled layer, Triton GEMV, CUDA graph", {"gemv": "triton", "compile": True}),
                 # the default: the same kernels uncompiled, with programmatic dependent launch where the GPU has it
                 # (kernels then overlap: their summed times exceed the wall time; only the wall time compares)
                 (PDL_PATH, {"gemv": "triton"}))
    else:
        from glmkit.quantization import load_precision

        model = load_precision(args.checkpoint, args.precision, device_map="cuda:0")
        paths = (("fast, eager layer, Triton GEMV", {"compile": False, "cuda_graph": False, "gemv": "triton"}),
                 ("fast, compiled layer, Triton GEMV", {"compile": True, "cuda_graph": False, "gemv": "triton"}),
                 ("fast, compiled layer, Triton GEMV, CUDA graph", {"gemv": "triton"}))
    if args.fast_only:  # the decoding path as it runs (compiled, in a CUDA graph), and its variants
        paths = tuple(p for p in paths if "cuda_graph" not in p[1])
    ids = torch.randint(0, 1000, (1, 32), device="cuda")
    out = {}
    for label, opts in paths:
        dec = FastDecoder(model, max_len=64, **opts)
        dec.prefill(ids)
        token = torch.tensor([1], device="cuda")
        out[label] = profile(lambda d=dec, t=token: d.decode_step(t, 32))
        print(label, {k: v for k, v in out[label].items() if k != "top_kernels"}, flush=True)
    if not args.fast_only:  # plain forward with a dynamic cache, for comparison
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(ids, use_cache=True, **{cache_argument(model): cache})
        step = ids[:, -1:]

        def plain():
            with torch.inference_mode():
                model(step, use_cache=True, **{cache_argument(model): cache})
                cache.crop(-1)  # drop the step's token: back to 32 cached (a negative count: transformers 5.17 and 5.24)

        out["plain forward (dynamic cache)"] = profile(plain)
        print("plain", {k: v for k, v in out["plain forward (dynamic cache)"].items() if k != "top_kernels"}, flush=True)
    name = args.name or ("profile_step" if args.precision == "bf16" else f"profile_step_{args.precision}")
    method = ("torch.profiler, CUDA activity, 5 steps after 3 warm-up; batch 1, 32 cached tokens; no CUDA graph (a "
              "graph replays the same kernels without launch gaps); gemv_kernel_ms: kernels named like "
              f"{', '.join(GEMV_NAMES)} (the projections), non_gemv_kernel_ms: all others; launch_gaps_ms: wall "
              "minus kernel time")
    save_result(name, {"precision": args.precision, "method": method, "paths": out})


if __name__ == "__main__":
    main()
