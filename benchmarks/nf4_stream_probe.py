"""Where the time of glmkit's 4-bit stream kernel (``glmkit.gemv4bit_mma``, layout "stream") goes at 1 vector, on
one GPU in one run: each GLM-4-9B projection in nf4 timed in CUDA graphs (``glmkit.gemv_tuning.graph_time``) with the
kernel as it ships and with its bytes, scales and x read but nothing looked up or multiplied (``-DPROBE=1``: what
its reads alone cost); beside them the tiles layout and the Triton per-row kernel. On an H200 about a minute:

    PYTHONPATH=.:benchmarks python benchmarks/nf4_stream_probe.py
Writes benchmarks/results/nf4_stream_probe.json (and to $OUT).
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from nf4_mma import _weights

from glmkit import gemv4bit, gemv4bit_mma
from glmkit.bench import copy_bandwidth, save_result
from glmkit.gemv import device_name
from glmkit.gemv_tuning import graph_time, projections

PROBES = {"shipped": [], "reads only": ["-DPROBE=1"]}
# (blocks of a row a piece, warps a program, pieces in a warp's ring, the same for gate/up): the longer a piece's
# rows, the fewer warps a program holds in shared memory
SHAPES = [(4, 16, 4, 2), (8, 8, 3, 2), (16, 4, 3, 2), (16, 8, 2, 1)]


def _time(how: str, x: torch.Tensor, ps: list, b: torch.Tensor | None, swiglu: bool) -> float:
    """Microseconds a launch: the CUDA kernel in layout ``how``, or the Triton kernel (``"triton"``)."""
    if how == "triton":
        return graph_time(lambda i: gemv4bit._launch(x, ps[i], b, swiglu, None, mma=False), len(ps)) * 1e6
    return graph_time(lambda i: gemv4bit_mma.gemv_4bit_mma(x, ps[i], b, swiglu, how), len(ps)) * 1e6


def main() -> None:
    bw = copy_bandwidth()
    rows: list[dict[str, Any]] = []
    for name, (n, k, bias, swiglu) in projections(quantized=True).items():
        w = _weights(name, n, k, bias, swiglu)
        ps, b = w["ps"], w["bias"]
        for vectors in (1,):
            x = torch.randn(vectors, 1, k, device="cuda", dtype=torch.bfloat16)
            row: dict[str, Any] = {"projection": name, "vectors": vectors, "nf4_bytes": w["nbytes"],
                                   "roofline_us": w["nbytes"] / bw * 1e6}
            shipped = (gemv4bit_mma.SPAN, gemv4bit_mma.STREAM_WARPS, gemv4bit_mma.STAGES, gemv4bit_mma.STAGES_SWIGLU)
            for shape in SHAPES:
                gemv4bit_mma.SPAN, gemv4bit_mma.STREAM_WARPS, gemv4bit_mma.STAGES, gemv4bit_mma.STAGES_SWIGLU = shape
                for probe, extra in PROBES.items():
                    gemv4bit_mma.EXTRA_OPTIONS[:] = extra
                    try:
                        row[f"stream {shape}, {probe}"] = _time("stream", x, ps, b, swiglu)
                        if not extra:  # the shipped products: against the tiles layout's
                            want = gemv4bit_mma.gemv_4bit_mma(x, ps[0], b, swiglu, "tiles").float()
                            got = gemv4bit_mma.gemv_4bit_mma(x, ps[0], b, swiglu, "stream").float()
                            row[f"stream {shape}, rel err vs tiles"] = ((got - want).norm() / want.norm()).item()
                    except Exception as exc:  # a shape this GPU cannot hold: say so, time the others
                        row[f"stream {shape}, {probe}"] = repr(exc)[:200]
            gemv4bit_mma.SPAN, gemv4bit_mma.STREAM_WARPS, gemv4bit_mma.STAGES, gemv4bit_mma.STAGES_SWIGLU = shipped
            gemv4bit_mma.EXTRA_OPTIONS[:] = []
            row["tiles"] = _time("tiles", x, ps, b, swiglu)
            row["triton"] = _time("triton", x, ps, b, swiglu)
            print({k_: round(v, 2) if isinstance(v, float) else v for k_, v in row.items()}, flush=True)
            rows.append(row)
        w.clear()
        gc.collect()
        torch.cuda.empty_cache()
    save_result("nf4_stream_probe", {"what": __doc__.splitlines()[0], "device": device_name(),
                                     "copy_bandwidth_bytes_s": bw, "rows": rows})


if __name__ == "__main__":
    main()
