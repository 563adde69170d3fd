"""Probe that chose the launch shape of glmkit's tensor-core 4-bit kernel: a first version of it (``tc4_proto.py``:
each weight looked up once for all vectors, the products on the tensor cores, one program's rows over all columns)
in 21 shapes, against glmkit's per-row 4-bit kernel and bitsandbytes' ``matmul_4bit``, on GLM-4-9B's projection
shapes (gate/up unfused) at 1, 4 and 16 vectors, in CUDA graphs over ~1 GiB of weight copies. The kernel that
shipped (``glmkit.gemv4bit._tc4_kernel``) adds a split of the columns over programs and a kernel that sums the
splits; ``nf4_batch.py`` measures it in the decoder.

    PYTHONPATH=. python benchmarks/nf4_tc_probe.py     # about 3 minutes on an H200
Writes benchmarks/results/nf4_tc_probe.json (and to $OUT).
"""
from __future__ import annotations

import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from tc4_proto import tc4  # noqa: E402

from glmkit.bench import copy_bandwidth, save_result  # noqa: E402
from glmkit.gemv4bit import Packed4bit, gemv_4bit, linear_4bit, quantize  # noqa: E402
from glmkit.gemv_tuning import graph_time  # noqa: E402

SHAPES = {"qkv": (4608, 4096), "o_proj": (4096, 4096), "gate_up": (27392, 4096), "down_proj": (4096, 13696)}
VARIANTS = [dict(mode=1, block_n=64, num_warps=4)] + [
    dict(mode=2, block_n=bn, num_warps=w, unroll=unroll, num_stages=stages)
    for (bn, w), unroll, stages in itertools.product([(16, 1), (32, 2), (64, 4), (128, 4), (128, 8)], [1, 2], [3, 4])]


def batch_row(name: str, ps: list[Packed4bit], batch: int, bandwidth: float) -> dict[str, Any]:
    """One projection at one batch size: glmkit's per-row kernel (up to 4 vectors), bitsandbytes, every shape."""
    n, k = ps[0].shape
    nbytes, copies = n * k // 2 + n * k // 64 * 4, len(ps)
    x = torch.randn(batch, 1, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.double(), ps[0].dequantize(torch.float32).double())

    def rel(y: torch.Tensor) -> float:
        return ((y.double() - ref).norm() / ref.norm()).item()

    row: dict[str, Any] = {"projection": name, "rows": n, "columns": k, "batch": batch, "nf4_bytes": nbytes,
                           "roofline_us": nbytes / bandwidth * 1e6}
    if batch <= 4:
        row["glmkit_us"] = graph_time(lambda i: gemv_4bit(x, ps[i]), copies) * 1e6
        row["glmkit_err"] = rel(gemv_4bit(x, ps[0]))
    row["bnb_us"] = graph_time(lambda i: linear_4bit(x, ps[i]), copies) * 1e6
    tried = []
    for v in (VARIANTS if batch == 1 else VARIANTS[1:]):
        def fn(i: int, v: dict = v) -> torch.Tensor:
            return tc4(x, ps[i].data, ps[i].absmax, ps[i].code, n, k, **v)
        try:
            err = rel(fn(0))
            t = graph_time(fn, copies)
            tried.append({**v, "us": t * 1e6, "tb_s": nbytes / t / 1e12, "err": err})
        except Exception as exc:
            tried.append({**v, "error": f"{type(exc).__name__}: {exc!s:.300}"})
    ok = [r for r in tried if "us" in r and r["err"] < 2e-2]
    row["tc_best"] = min(ok, key=lambda r: r["us"]) if ok else None
    row["tc_tried"] = tried
    return row


def main() -> None:
    bandwidth = copy_bandwidth()
    out: dict[str, Any] = {"copy_bandwidth_bytes_s": bandwidth, "rows": [], "errors": []}
    t0 = time.time()
    for name, (n, k) in SHAPES.items():
        copies = max(2, math.ceil(2**30 / (n * k // 2 + n * k // 16)))
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ps = [quantize(w16 * (1 + 1e-3 * i), "nf4") for i in range(copies)]
        for batch in (1, 4, 16):
            row = batch_row(name, ps, batch, bandwidth)
            print(name, batch, {k_: v_ for k_, v_ in row.items() if k_ != "tc_tried"}, f"{time.time() - t0:.0f}s",
                  flush=True)
            out["rows"].append(row)
            save_result("nf4_tc_probe", out)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
