"""Four weight rows a program that share each read of x: glmkit's 4-bit GEMV with each thread reading 16 bytes of
four rows and the x values that go with them once (``glmkit.gemv4bit.FOUR_ROWS_WARPS``), against the kernel that
reads x again for every row (Nsight Compute: held by L1 at 87% with DRAM at 39% on gate_up, ``nf4_ncu.json``). Per
GLM-4-9B projection at batch 1, in CUDA graphs over ~1 GiB of weight copies, each against float64; then the nf4
decoder at batch 1 with each, and the bf16 fast path, in the same run.

    PYTHONPATH=. python benchmarks/nf4_four_rows.py --checkpoint /tmp/glm9b     # about 4 minutes on an H200
Writes benchmarks/results/nf4_four_rows.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F

import glmkit.gemv4bit as g4
from glmkit.bench import copy_bandwidth, save_result
from glmkit.fast_decode import FastDecoder
from glmkit.gemv4bit import gemv_4bit, gemv_4bit_multi, gemv_4bit_swiglu, quantize
from glmkit.gemv_tuning import graph_time
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

WARPS = (0, 1, 2, 4)  # 0: the per-row kernel with the card's tuned shapes
PROMPT, NEW = 32, 256


def kernel_call(name: str, n: int, k: int, copies: int) -> tuple[Any, torch.Tensor]:
    """fn(i) multiplying x by weight copy i as the decoder does for this projection, and its float64 result."""
    w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    if name == "qkv":  # three weights (q, k, v) in one launch, as the decoder reads them
        parts = [[quantize(p * (1 + 1e-3 * i), "nf4") for p in w16.split([4096, 256, 256])] for i in range(copies)]
        w = torch.cat([p.dequantize(torch.float32) for p in parts[0]]).double()
        bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        return (lambda i: gemv_4bit_multi(x, parts[i], bias)), F.linear(x.double(), w)
    ws = [quantize(w16 * (1 + 1e-3 * i), "nf4") for i in range(copies)]
    ref = F.linear(x.double(), ws[0].dequantize(torch.float32).double())
    if name == "gate_up":
        gate, up = ref.chunk(2, dim=-1)
        return (lambda i: gemv_4bit_swiglu(x, ws[i])), up * F.silu(gate)
    return (lambda i: gemv_4bit(x, ws[i])), ref


def projection_rows(bandwidth: float) -> list[dict[str, Any]]:
    rows = []
    for name, n, k in (("qkv", 4608, 4096), ("o_proj", 4096, 4096), ("gate_up", 27392, 4096),
                       ("down_proj", 4096, 13696)):
        copies = max(2, math.ceil(2**30 / (n * k // 2 + n * k // 16)))
        fn, ref = kernel_call(name, n, k, copies)
        nbytes = n * k // 2 + n * k // 64 * 4
        for warps in WARPS:
            g4.FOUR_ROWS_WARPS = warps
            err = ((fn(0).double() - ref).norm() / ref.norm()).item()
            t = graph_time(fn, copies)
            row = {"projection": name, "rows": n, "columns": k, "four_rows_warps": warps, "us": t * 1e6,
                   "tb_s": nbytes / t / 1e12, "fraction_of_copy_bandwidth": nbytes / t / bandwidth, "rel_err": err}
            rows.append(row)
            print(row, flush=True)
        g4.FOUR_ROWS_WARPS = 0
        del fn
        torch.cuda.empty_cache()
    return rows


def decode_rows(checkpoint: str, warps_list: list[int]) -> list[dict[str, Any]]:
    ensure_random_checkpoint(checkpoint)
    rows = []
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    model = load_precision(checkpoint, "bf16", device_map="cuda:0")
    decoder = FastDecoder(model, max_len=PROMPT + NEW + 8)
    best = max(decoder.tokens_per_second(PROMPT, NEW)["decode_tok_s"] for _ in range(3))
    rows.append({"path": "bf16 fast", "decode_tok_s": best})
    print(rows[-1], flush=True)
    del decoder, model
    torch.cuda.empty_cache()
    model = load_precision(checkpoint, "nf4", device_map="cuda:0")
    reference = None
    for warps in warps_list:
        g4.FOUR_ROWS_WARPS = warps
        decoder = FastDecoder(model, max_len=PROMPT + NEW + 8)
        best = max(decoder.tokens_per_second(PROMPT, NEW)["decode_tok_s"] for _ in range(3))
        tokens = decoder.generate(ids, 32, ignore_eos=True)[0, PROMPT:].tolist()
        reference = reference or tokens
        rows.append({"path": "nf4 fast", "four_rows_warps": warps, "decode_tok_s": best,
                     "tokens_as_per_row_kernel": sum(a == b for a, b in zip(tokens, reference)), "of": len(tokens)})
        print(rows[-1], flush=True)
        del decoder
        torch._dynamo.reset()
    g4.FOUR_ROWS_WARPS = 0
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--decode-warps", default="", help="default: 0 and the warps of the fastest projections")
    args = ap.parse_args()
    bw = copy_bandwidth()
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": bw}
    result["projections"] = projection_rows(bw)
    save_result("nf4_four_rows", result)
    totals = {w: sum(r["us"] for r in result["projections"] if r["four_rows_warps"] == w) for w in WARPS}
    result["layer_us_by_warps"] = totals
    best = min((w for w in WARPS if w), key=totals.__getitem__)
    warps = [int(w) for w in args.decode_warps.split(",")] if args.decode_warps else [0, best]
    result["decode"] = decode_rows(args.checkpoint, warps)
    save_result("nf4_four_rows", result)


if __name__ == "__main__":
    main()
