"""glmkit's 4-bit tensor-core CUDA kernel (``glmkit.gemv4bit_mma``) on one GPU, in one run, against the Triton
kernel it replaces at batch 1-8 and against bf16.

1. ``check``: the kernel against float64 on the fp32-dequantized weights (``code * absmax``) and against the Triton
   kernel: bf16 and fp16 x, plain and double-quantized scales, q/k/v with a bias, SwiGLU, odd row counts, 1-8
   vectors.
2. ``projections``: each GLM-4-9B projection in nf4 (q/k/v in one launch with their bias, o_proj, gate_up with
   SwiGLU, down_proj) at 1, 2, 4 and 8 vectors, timed in CUDA graphs over ~1 GiB of weight copies
   (``glmkit.gemv_tuning.graph_time``): the CUDA kernel at each launch shape of ``VARIANTS`` (``default``: the shape
   it ships with), the Triton kernels (batch 1: the per-row kernel at its tuned shape and lookup; 2: the per-row
   kernel; more: the tensor-core kernel), glmkit's bf16 kernel (1 vector); bytes per second against the copy
   bandwidth measured in the same run.
What it gives a decoder, per batch size: ``benchmarks/nf4_batch.py``. On an H200 about a minute:

    PYTHONPATH=. python benchmarks/nf4_mma.py
Writes benchmarks/results/nf4_mma.json (and to $OUT) after every stage.
"""

from __future__ import annotations

import argparse
import gc
import math
from typing import Any

import torch
import torch.nn.functional as F
from nf4_gemv import _rel, _swiglu

from glmkit import gemv4bit, gemv4bit_mma
from glmkit.bench import copy_bandwidth, save_result, stage_runner
from glmkit.gemv import device_name, gemv, gemv_swiglu
from glmkit.gemv4bit import quantize
from glmkit.gemv_tuning import graph_time, projections

QKV_ROWS = (4096, 256, 256)  # GLM-4-9B's q, k and v: 32 and 2 heads of 128
# (warps, chunks a stage, chunks a stage for gate/up, programs an SM holds): the launch shapes timed (the
# programs an SM holds apply to gate/up too while a shape is timed)
VARIANTS = [(8, 2, 2, 2), (4, 2, 2, 4), (4, 4, 2, 3), (8, 4, 2, 2), (8, 1, 1, 3), (16, 2, 2, 1)]
SHIPPED = {False: (8, 2, 2, 2), True: (8, 1, 1, 3)}  # what gemv4bit_mma ships, by SwiGLU or not


def _variant(v: tuple[int, ...]) -> None:
    gemv4bit_mma.WARPS, gemv4bit_mma.UNROLL, gemv4bit_mma.UNROLL_SWIGLU, gemv4bit_mma.MIN_BLOCKS = v
    gemv4bit_mma.MIN_BLOCKS_SWIGLU = v[3]


def _reference(x: torch.Tensor, ws: tuple, bias: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    w = torch.cat([v.dequantize(torch.float32) for v in ws]).double()
    y = F.linear(x.double(), w, None if bias is None else bias.double())
    return _swiglu(y) if swiglu else y


def check() -> list[dict[str, Any]]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [("one weight", (100,), 320, False, False), ("q/k/v + bias", (96, 16, 40), 448, True, False),
             ("swiglu", (2 * 72,), 512, False, True), ("glm qkv", QKV_ROWS, 4096, True, False),
             ("glm down", (4096,), 13696, False, False)]
    for dtype in (torch.bfloat16, torch.float16):
        for dq in (False, True):
            for name, heights, k, bias, swiglu in cases:
                ws = tuple(quantize(torch.randn(h, k, device="cuda", generator=g) * 0.02, "nf4", dq) for h in heights)
                b = (torch.randn(sum(heights), device="cuda", generator=g) * 0.02).to(dtype) if bias else None
                for vectors in (1, 2, 5, 8):
                    x = torch.randn(vectors, 1, k, device="cuda", generator=g).to(dtype)
                    ref = _reference(x, ws, b, swiglu)
                    got = gemv4bit_mma.gemv_4bit_mma(x, ws, b, swiglu)
                    tri = gemv4bit._launch(x, ws, b, swiglu, None, mma=False)
                    row = {"dtype": str(dtype).removeprefix("torch."), "double_quant": dq, "case": name,
                           "vectors": vectors, "rel_err_mma": _rel(got, ref), "rel_err_triton": _rel(tri, ref),
                           "mma_vs_triton": _rel(got, tri.double())}
                    rows.append(row)
    worst = max(rows, key=lambda r: r["rel_err_mma"])
    print("check: worst", worst, flush=True)
    return rows


def _weights(name: str, n: int, k: int, bias: bool, swiglu: bool) -> dict[str, Any]:
    """~1 GiB of nf4 copies of one projection (q, k and v as three weights), its bf16 copies and bias."""
    rows = 2 * n if swiglu else n
    heights = QKV_ROWS if name == "qkv" else (rows,)
    copies = max(2, math.ceil(2**30 / (rows * k // 2)))
    w16 = [torch.randn(h, k, device="cuda", dtype=torch.bfloat16) * 0.02 for h in heights]
    ps = [tuple(quantize(w * (1 + 1e-3 * i), "nf4") for w in w16) for i in range(copies)]
    full16 = torch.cat(w16)
    copies16 = max(2, math.ceil(2**30 / full16.numel() / 2))
    return {"rows": rows, "ps": ps, "nbytes": sum(p.data.numel() + p.absmax.numel() * 4 for p in ps[0]),
            "ws16": [full16] + [full16.clone() for _ in range(copies16 - 1)],
            "bias": torch.randn(rows, device="cuda", dtype=torch.bfloat16) * 0.02 if bias else None}


def _time_vectors(name: str, k: int, swiglu: bool, vectors: int, w: dict[str, Any],
                  bandwidth: float) -> dict[str, Any]:
    """One projection at ``vectors`` vectors: each launch shape of VARIANTS, the Triton kernel, bf16 (1 vector)."""
    ps, b, nbytes = w["ps"], w["bias"], w["nbytes"]
    x = torch.randn(vectors, 1, k, device="cuda", dtype=torch.bfloat16)
    ref = _reference(x, ps[0], b, swiglu)

    def mma(i: int) -> torch.Tensor:
        return gemv4bit_mma.gemv_4bit_mma(x, ps[i], b, swiglu)

    def triton(i: int) -> torch.Tensor:
        return gemv4bit._launch(x, ps[i], b, swiglu, None, mma=False)

    row: dict[str, Any] = {"projection": name, "rows": w["rows"], "columns": k, "vectors": vectors,
                           "nf4_bytes": nbytes, "roofline_us": nbytes / bandwidth * 1e6, "mma": []}
    shipped = (gemv4bit_mma.WARPS, gemv4bit_mma.UNROLL, gemv4bit_mma.UNROLL_SWIGLU, gemv4bit_mma.MIN_BLOCKS,
               gemv4bit_mma.MIN_BLOCKS_SWIGLU)
    default = SHIPPED[swiglu]
    for v in VARIANTS:
        _variant(v)
        t = graph_time(mma, len(ps))
        row["mma"].append({"warps": v[0], "unroll": v[1], "unroll_swiglu": v[2], "min_blocks": v[3],
                           "default": v == default, "us": t * 1e6,
                           "fraction_of_copy_bandwidth": nbytes / t / bandwidth, "rel_err": _rel(mma(0), ref)})
    (gemv4bit_mma.WARPS, gemv4bit_mma.UNROLL, gemv4bit_mma.UNROLL_SWIGLU, gemv4bit_mma.MIN_BLOCKS,
     gemv4bit_mma.MIN_BLOCKS_SWIGLU) = shipped
    t = graph_time(triton, len(ps))
    row["triton"] = {"us": t * 1e6, "fraction_of_copy_bandwidth": nbytes / t / bandwidth,
                     "rel_err": _rel(triton(0), ref)}
    if vectors == 1:
        ws16 = w["ws16"]
        t16 = graph_time(lambda i: gemv_swiglu(x, ws16[i]) if swiglu else gemv(x, ws16[i], b), len(ws16))
        row["bf16_triton"] = {"us": t16 * 1e6, "fraction_of_copy_bandwidth": w["rows"] * k * 2 / t16 / bandwidth}
    shipped = next(r for r in row["mma"] if r["default"])
    row["mma_over_triton"] = row["triton"]["us"] / shipped["us"]
    print({k_: v_ for k_, v_ in row.items() if k_ != "mma"}, "shipped shape", shipped, "best",
          min(row["mma"], key=lambda r: r["us"]), flush=True)
    return row


def projection_rows(bandwidth: float) -> list[dict[str, Any]]:
    out = []
    for name, (n, k, bias, swiglu) in projections(quantized=True).items():
        w = _weights(name, n, k, bias, swiglu)
        out += [_time_vectors(name, k, swiglu, vectors, w, bandwidth) for vectors in (1, 2, 4, 8)]
        w.clear()
        gc.collect()
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="check,projections")
    ap.add_argument("--name", default="nf4_mma")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("nf4_mma.py measures a GPU; this machine has none.")
    stages = args.stages.split(",")
    bw = copy_bandwidth()
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "device": device_name(),
                              "copy_bandwidth_bytes_s": bw, "errors": []}
    stage = stage_runner(args.name, result)
    if "check" in stages:
        result["check"] = stage("check", check)
    if "projections" in stages:
        result["projections"] = stage("projections", projection_rows, bw)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
