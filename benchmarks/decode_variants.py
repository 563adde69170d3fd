"""Which compilation of the fast path's layer decodes fastest: cuBLAS GEMVs, cuBLAS with inductor's
max-autotune (Triton GEMM templates may win and fuse epilogues), or every projection as an inductor reduction
(``gemv=True``) with coordinate-descent tuning or max-autotune, and attention as reductions instead of SDPA.
GLM-4-9B-Chat, random weights, bf16, batch 1, 32-token prompt.

    python benchmarks/decode_variants.py --checkpoint /tmp/glm9b
Writes benchmarks/results/decode_variants.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import time

from glmkit.bench import bytes_read_per_token, copy_bandwidth, load_random_9b, save_result

VARIANTS = {
    "cublas": {"gemv": False, "compile_options": {}},
    "reduction, coordinate-descent tuned": {"gemv": True,
                                            "compile_options": {"options": {"coordinate_descent_tuning": True}}},
    "cublas, max-autotune": {"gemv": False, "compile_options": {"mode": "max-autotune-no-cudagraphs"}},
    "reduction, max-autotune": {"gemv": True, "compile_options": {"mode": "max-autotune-no-cudagraphs"}},
    "cublas, reduction attention": {"gemv": False, "attention": "reduction"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--max-len", type=int, default=0, help="static cache length (default: 32 + new tokens)")
    args = ap.parse_args()
    import torch

    from glmkit.fast_decode import FastDecoder

    model = load_random_9b(args.checkpoint)
    bw = copy_bandwidth()
    result = {"roofline_tok_s": bw / bytes_read_per_token(model), "variants": []}
    for name in args.variants:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        max_len = args.max_len or 32 + args.new_tokens
        decoder = FastDecoder(model, max_len=max_len, **VARIANTS[name])
        decoder.tokens_per_second(32, 8)  # compile, autotune, capture
        setup = time.perf_counter() - t0
        runs = [decoder.tokens_per_second(32, args.new_tokens)["decode_tok_s"] for _ in range(3)]
        row = {"variant": name, "options": VARIANTS[name], "max_len": max_len, "compile_and_capture_s": setup,
               "decode_tok_s": runs,
               "fraction_of_roofline": max(runs) / result["roofline_tok_s"]}
        result["variants"].append(row)
        print(row, flush=True)
        save_result("decode_variants", {"method": f"bf16, batch 1, 32-token prompt, {args.new_tokens} new tokens, "
                                                  "3 runs each after a warm-up", **result})
        del decoder


if __name__ == "__main__":
    main()
