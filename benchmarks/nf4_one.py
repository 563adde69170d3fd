"""glmkit's batch-1 CUDA 4-bit kernel (``glmkit.gemv4bit_one``) against its Triton per-row kernel: GLM-4-9B's four
nf4 projections at one token on one GPU, one run, in CUDA graphs over enough weight copies to leave the L2 cache
behind. Per projection: the Triton kernel as the one-token step runs it (norm or residual add folded in) and plain,
the CUDA kernel plain at several launch shapes (``OneShape``: groups of warps a CTA, warps a group, stages in
flight, the lookup table wide or narrow) and folded at its shipped shape (``gemv4bit_one.shape_for``), launched
plainly and (where the GPU has it) with programmatic dependent launch as the step launches it; µs, TB/s of packed
weights and fraction of copy bandwidth; the error against ``dequantize`` + ``F.linear`` in fp32 (plain) and against
the Triton kernel's folded result (folded).

    PYTHONPATH=.:benchmarks python benchmarks/nf4_one.py       # about 2 minutes on an H200
Writes benchmarks/results/nf4_one.json (or --name; and to $OUT).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from glmkit import gemv4bit, gemv4bit_one
from glmkit.bench import copy_bandwidth, save_result
from glmkit.gemv import dependent_launches, pdl_supported
from glmkit.gemv4bit import _Fusion, _launch, normed_stream, quantize
from glmkit.gemv4bit_one import OneShape
from glmkit.gemv_tuning import graph_time, projections

SHAPES = [OneShape(4, 4, 2), OneShape(3, 4, 2), OneShape(4, 4, 3), OneShape(2, 8, 2), OneShape(4, 4, 2, wide=False)]
SHAPES_SWIGLU = [OneShape(4, 4, 2), OneShape(3, 4, 2), OneShape(2, 8, 2), OneShape(4, 4, 2, wide=False)]


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def projection(name: str, n: int, k: int, has_bias: bool, swiglu: bool, bw: float) -> dict[str, Any]:
    rows = 2 * n if swiglu else n
    dev = "cuda"
    packed = rows * k // 2 + rows * k // 64 * 4  # bytes and fp32 scales a copy
    copies = max(4, -(-600_000_000 // packed))
    g = torch.Generator(dev).manual_seed(0)
    split = [4096, 256, 256] if name == "qkv" else [rows]  # q, k, v: three weights, one launch
    wsets = [tuple(quantize(torch.randn(r, k, device=dev, generator=g) * 0.02, "nf4") for r in split)
             for _ in range(copies)]
    x = (torch.randn(1, 1, k, device=dev, generator=g)).to(torch.bfloat16)
    norm = (torch.rand(k, device=dev, generator=g) + 0.5).to(torch.bfloat16)
    bias = (torch.randn(rows, device=dev, generator=g) * 0.1).to(torch.bfloat16) if has_bias else None
    residual = torch.randn(1, 1, rows, device=dev, generator=g).to(torch.bfloat16)
    out_norm = (torch.rand(rows, device=dev, generator=g) + 0.5).to(torch.bfloat16)
    folded = "residual" if name in ("o_proj", "down_proj") else "normed"
    stream = normed_stream(x, norm)  # its sums of squares as the step's residual launches write them: 256 parts
    stream = stream._replace(squares=x.float().pow(2).reshape(256, -1).sum(-1)) if folded == "normed" else stream

    def fusion() -> _Fusion:
        if folded == "normed":
            return _Fusion(squares=stream.squares, eps=1e-5)
        blocks = gemv4bit._row_blocks([rows], gemv4bit.config_for(wsets[0][0]), gemv4bit._paired(False))
        return _Fusion(residual=residual, norm_weight=out_norm, scaled=torch.empty_like(residual),
                       partials=torch.empty(blocks, device=dev))

    tri_f = fusion()
    one_partials = torch.empty(gemv4bit_one.tiles([rows], swiglu), device=dev)
    one_scaled = torch.empty_like(residual)
    xin = stream.scaled if folded == "normed" else x

    def triton_plain(i: int) -> torch.Tensor:
        return _launch(x, wsets[i], bias, swiglu, None, mma=False)

    def triton_folded(i: int) -> torch.Tensor:
        return _launch(xin, wsets[i], bias, swiglu, None, mma=False, fusion=tri_f)

    def one(i: int, shape: OneShape | None = None, fold: bool = False) -> torch.Tensor:
        if not fold:
            return gemv4bit_one.gemv_4bit_one(x, wsets[i], bias, swiglu, shape=shape)
        if folded == "normed":
            return gemv4bit_one.gemv_4bit_one(xin, wsets[i], bias, swiglu, squares=stream.squares, eps=1e-5,
                                              shape=shape)
        return gemv4bit_one.gemv_4bit_one(x, wsets[i], bias, swiglu, residual=residual, norm_weight=out_norm,
                                          scaled=one_scaled, partials=one_partials, shape=shape)

    w32 = torch.cat([w.dequantize(torch.float32) for w in wsets[0]])
    want = F.linear(x.float(), w32, None if bias is None else bias.float())
    if swiglu:
        gate, up = want.chunk(2, dim=-1)
        want = up * F.silu(gate)
    row: dict[str, Any] = {"projection": name, "rows": rows, "columns": k, "packed_bytes": packed, "copies": copies,
                           "folded": folded, "roofline_us": packed / bw * 1e6}

    def timed(label: str, fn: Any, **extra: Any) -> dict[str, Any]:
        s = graph_time(fn, copies)
        r = {"variant": label, "us": s * 1e6, "tb_s": packed / s / 1e12, "fraction_of_copy_bandwidth": packed / s / bw,
             **extra}
        print(name, r, flush=True)
        return r

    row["triton_plain"] = timed("triton", triton_plain, rel_err=_rel(triton_plain(0), want))
    row["triton_folded"] = timed("triton, folded", triton_folded)
    row["one"] = []
    for shape in SHAPES_SWIGLU if swiglu else SHAPES:
        if shape.smem_bytes(swiglu, k) > gemv4bit_one.smem_limit(torch.device(dev)):  # (a shape this GPU cannot run)
            continue
        r = timed("one", lambda i, s=shape: one(i, s), groups=shape.groups, warps=shape.warps, depth=shape.depth,
                  wide=shape.wide, rel_err=_rel(one(0, shape), want))
        row["one"].append(r)
    row["one_best"] = min(row["one"], key=lambda r: r["us"])
    shape = gemv4bit_one.shape_for(swiglu, k)  # folded as the step runs it: at the shipped shape
    tri = triton_folded(0)
    got = one(0, shape, fold=True)
    extra: dict[str, Any] = {"groups": shape.groups, "warps": shape.warps, "depth": shape.depth, "wide": shape.wide,
                             "rel_diff_to_triton_folded": _rel(got, tri)}
    if folded == "residual":
        extra["scaled_rel_diff"] = _rel(one_scaled, tri_f.scaled)
        extra["squares_rel_diff"] = abs(one_partials.sum().item() - tri_f.partials.sum().item()) / \
            tri_f.partials.sum().item()
    row["one_folded"] = timed("one, folded", lambda i: one(i, shape, fold=True), **extra)
    if pdl_supported(dev):  # launched as the step launches them where the GPU has it: each while the one before ends
        with dependent_launches():
            row["one_folded_pdl"] = timed("one, folded, PDL", lambda i: one(i, shape, fold=True),
                                          same_as_plain=bool(torch.equal(one(0, shape, fold=True), got)))
    row["one_folded_over_triton_folded"] = row["triton_folded"]["us"] / row["one_folded"]["us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="nf4_one")
    args = ap.parse_args()
    bw = copy_bandwidth()
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": bw, "projections": []}
    for name, (n, k, bias, swiglu) in projections(quantized=True).items():
        result["projections"].append(projection(name, n, k, bias, swiglu, bw))
        save_result(args.name, result)
    layer = {v: sum(p[v]["us"] for p in result["projections"])
             for v in ("triton_folded", "one_folded", "one_folded_pdl") if all(v in p for p in result["projections"])}
    result["layer_us"] = layer
    print("layer", layer, flush=True)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
