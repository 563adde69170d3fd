"""Decode speed of GLM-4-9B-Chat (random weights, bf16) on one GPU: plain generate(), static cache, glmkit's
fast path (default: Triton GEMVs at batch 1; and with cuBLAS), against the memory-bandwidth roofline measured in the
same run; then a batch sweep of the fast path.

    python benchmarks/decode.py --checkpoint /tmp/glm9b
    python benchmarks/decode.py --checkpoint /tmp/glm9b --fast-only --name decode_fused_h200   # ~3 min
Writes benchmarks/results/decode.json (or NAME.json) (and to $OUT). ``--fast-only``: the fast path alone (its default,
the same with the RMSNorms and residual adds kept apart from the GEMVs, and cuBLAS) against the roofline, plus the
greedy-token check against generate(); no static-cache path, no batch sweep.
"""

from __future__ import annotations

import argparse

from glmkit.bench import (
    bytes_read_per_token,
    copy_bandwidth,
    load_random_9b,
    measure_decode,
    save_result,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 32, 64])
    ap.add_argument("--skip-static", action="store_true")
    ap.add_argument("--fast-only", action="store_true", help="only the fast path's variants (and the token check)")
    ap.add_argument("--name", default="decode", help="result file name (benchmarks/results/NAME.json)")
    args = ap.parse_args()
    import torch

    from glmkit.fast_decode import FastDecoder

    model = load_random_9b(args.checkpoint)
    bw = copy_bandwidth()
    per_token = bytes_read_per_token(model)
    result = {"copy_bandwidth_bytes_s": bw, "bytes_read_per_token": per_token, "roofline_tok_s": bw / per_token,
              "batch1": [], "batch_sweep": []}
    print(result, flush=True)

    def save() -> None:
        save_result(args.name, {"method": f"bf16, 32-token prompt, {args.new_tokens} new tokens, decode tok/s excludes "
                                         "the first token; roofline = copy bandwidth / weight bytes per token", **result})

    fast_options: dict = {}
    try:  # the fast path compiles its layer and captures a CUDA graph: fall back step by step if that fails here
        measure_decode(model, "fast", 1, 32, 16)
    except Exception as exc:
        result["fast_fallback"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(result["fast_fallback"], flush=True)
        fast_options = {"compile": False}
    # the fast path three times: its default (glmkit's Triton GEMVs at batch 1, norms and residual adds folded in),
    # with the norms and adds as kernels of their own, and with cuBLAS for every projection
    cublas = {**fast_options, "gemv": False}
    apart = {**fast_options, "fuse_norms": False}
    variants = [("fast", fast_options), ("fast", apart), ("fast", cublas)]
    variants += [] if args.fast_only else [("generate", None)]
    variants += [] if args.skip_static or args.fast_only else [("static", None)]
    for path, options in variants:
        # warm-up with the measured shapes: the static path compiles for each cache length it sees
        measure_decode(model, path, 1, 32, args.new_tokens, fast_options=options)
        row = measure_decode(model, path, 1, 32, args.new_tokens, fast_options=options)
        row["fraction_of_roofline"] = row["decode_tok_s"] / result["roofline_tok_s"]
        result["batch1"].append(row)
        print(row, flush=True)
        save()
    fast = max(r["decode_tok_s"] for r in result["batch1"] if r["path"] == "fast")
    result["fused_over_norms_apart"] = result["batch1"][0]["decode_tok_s"] / result["batch1"][1]["decode_tok_s"]
    if not args.fast_only:
        plain = next(r for r in result["batch1"] if r["path"] == "generate")["decode_tok_s"]
        result["fast_over_generate"] = fast / plain
    ids = torch.randint(0, 1000, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    got = FastDecoder(model, max_len=96, **fast_options).generate(ids, 64, ignore_eos=True)
    same = (ref[0, 32:] == got[0, 32:]).int().tolist()
    result["greedy_match"] = {"tokens": 64, "identical_prefix": same.index(0) if 0 in same else 64,
                              "identical_positions": sum(same)}
    print(result["greedy_match"], flush=True)
    save()
    for b in [] if args.fast_only else args.batches:
        try:
            row = measure_decode(model, "fast", b, 32, 128, fast_options=fast_options)
        except torch.OutOfMemoryError as exc:
            row = {"path": "fast", "batch_size": b, "oom": str(exc)[:200]}
        result["batch_sweep"].append(row)
        print(row, flush=True)
        save()


if __name__ == "__main__":
    main()
