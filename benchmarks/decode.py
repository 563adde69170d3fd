"""Decode speed of GLM-4-9B-Chat (random weights, bf16) on one GPU: plain generate(), static cache, glmkit's
fast path (default: Triton GEMVs at batch 1; and with cuBLAS), against the memory-bandwidth roofline measured in the
same run; then a batch sweep of the fast path.

    python benchmarks/decode.py --checkpoint /tmp/glm9b
Writes benchmarks/results/decode.json (and to $OUT).
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
        save_result("decode", {"method": f"bf16, 32-token prompt, {args.new_tokens} new tokens, decode tok/s excludes "
                                         "the first token; roofline = copy bandwidth / weight bytes per token", **result})

    fast_options: dict = {}
    try:  # the fast path compiles its layer and captures a CUDA graph: fall back step by step if that fails here
        measure_decode(model, "fast", 1, 32, 16)
    except Exception as exc:
        result["fast_fallback"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(result["fast_fallback"], flush=True)
        fast_options = {"compile": False}
    # the fast path twice: its default (glmkit's Triton GEMVs at batch 1) and with cuBLAS for every projection
    cublas = {**fast_options, "gemv": False}
    variants = [("fast", fast_options), ("fast", cublas), ("generate", None)]
    variants += [] if args.skip_static else [("static", None)]
    for path, options in variants:
        # warm-up with the measured shapes: the static path compiles for each cache length it sees
        measure_decode(model, path, 1, 32, args.new_tokens, fast_options=options)
        row = measure_decode(model, path, 1, 32, args.new_tokens, fast_options=options)
        row["fraction_of_roofline"] = row["decode_tok_s"] / result["roofline_tok_s"]
        result["batch1"].append(row)
        print(row, flush=True)
        save()
    fast = max(r["decode_tok_s"] for r in result["batch1"] if r["path"] == "fast")
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
    for b in args.batches:
        try:
            row = measure_decode(model, "fast", b, 32, 128, fast_options=fast_options)
        except torch.OutOfMemoryError as exc:
            row = {"path": "fast", "batch_size": b, "oom": str(exc)[:200]}
        result["batch_sweep"].append(row)
        print(row, flush=True)
        save()


if __name__ == "__main__":
    main()
