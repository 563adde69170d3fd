"""Attention's share of GPU time in prefill and in one decode step, by prompt length (the guide's flash-attention point).

GLM-4-9B-Chat architecture, random weights built on the GPU, bf16, batch 1, transformers' default attention
(``sdpa``). For each prompt length: torch.profiler over one prefill forward (``logits_to_keep=1``) and over one
plain decode step with the dynamic cache at that context; every kernel is sorted into matmul / attention / other
by ``glmkit.results.kernel_category``.

    python benchmarks/attention_share.py
Writes benchmarks/results/attention_share.json (and to $OUT). About 2 minutes on one H200.
"""

from __future__ import annotations

import argparse
from typing import Any

from glmkit.bench import save_result
from glmkit.results import KINDS, kernel_category


def kernel_ms(fn: Any, repeats: int = 3) -> dict[str, Any]:
    """GPU milliseconds per call of ``fn`` by kernel kind, and the attention kernels' names."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    ms = dict.fromkeys(KINDS, 0.0)
    names = set()
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            kind = kernel_category(e.key)
            ms[kind] += t / repeats / 1000
            if kind == "attention":
                names.add(e.key[:80])
    total = sum(ms.values())
    return {"ms": ms, "total_ms": total, "attention_share": ms["attention"] / total, "attention_kernels": sorted(names)}


def measure(model: Any, n: int) -> dict[str, Any]:
    """One prefill of ``n`` tokens and one decode step at that context, profiled."""
    import torch
    from transformers import DynamicCache

    from glmkit.generation import cache_argument

    ids = torch.randint(0, 1000, (1, n), device="cuda:0")
    with torch.inference_mode():
        prefill = kernel_ms(lambda: model(ids, logits_to_keep=1))
        cache = DynamicCache(config=model.config)
        model(ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
        step = ids[:, -1:]

        def decode() -> None:
            model(step, use_cache=True, **{cache_argument(model): cache})
            cache.crop(-1)  # drop the token just added (a negative count works in every transformers 5)

        decode_step = kernel_ms(decode)
    return {"prompt_len": n, "prefill": prefill, "decode_step": decode_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-lens", nargs="+", type=int, default=[512, 2048, 8192, 32768])
    args = ap.parse_args()
    import torch

    from glmkit.models import glm4_9b_chat_config, random_model

    model = random_model(glm4_9b_chat_config(), "cuda:0")
    rows = []
    for n in args.prompt_lens:
        rows.append(measure(model, n))
        print(n, round(rows[-1]["prefill"]["attention_share"], 3), round(rows[-1]["decode_step"]["attention_share"], 3),
              flush=True)
        torch.cuda.empty_cache()
        save_result("attention_share", {"method": "torch.profiler, CUDA kernels, mean of 3 calls after one "
                                                  "warm-up; batch 1, bf16, sdpa; prefill with logits_to_keep=1, "
                                                  "decode = one plain forward with the dynamic cache",
                                        "rows": rows})


if __name__ == "__main__":
    main()
