"""Where glmkit's batch-1 4-bit CUDA kernel's error comes from: its tensor-core products take the 4-bit code table in
16 bits, so each weight is ``round16(code) * absmax`` where the Triton kernel and the fp32 reference use
``code * absmax``. It multiplies in fp16 (``gemv4bit_one.F16_PRODUCTS``, the default: a bf16 token is converted, times
a power of two), or in bf16 as it did before. Per GLM-4-9B projection (random weights, bitsandbytes nf4, one bf16
token), each kernel's relative error against float64 on the exact weights and on the weights with the code rounded to
bf16; the CUDA kernel's with bf16 products, and with fp16 products on a token 10^5 times larger (past fp16's 65504);
beside them what fp16 codes would leave, and what bf16 rounding of the weights themselves (the bf16 fast path's
weights on the same nf4 values) costs, both in float64.

    PYTHONPATH=.:benchmarks python benchmarks/nf4_code_rounding.py      # about 30 s on an H200
Writes benchmarks/results/nf4_code_rounding.json (and to $OUT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nf4_fused import gpu_uuids, products

from glmkit import gemv4bit
from glmkit.bench import save_result
from glmkit.gemv import device_name

SHAPES = {"q/k/v": (4608, 4096), "o_proj": (4096, 4096), "gate_up": (27392, 4096), "down_proj": (4096, 13696)}


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| (``ref`` in float64)."""
    return ((y.double() - ref).norm() / ref.norm()).item()


def projection(n: int, k: int, g: torch.Generator) -> dict[str, float]:
    """One projection's errors (see the module's docstring)."""
    p = gemv4bit.quantize(torch.randn(n, k, device="cuda", generator=g) * 0.02, "nf4")
    x = torch.randn(1, 1, k, device="cuda", generator=g).to(torch.bfloat16)
    exact = p.dequantize(torch.float32)  # code * absmax
    scale = p.absmax.float().repeat_interleave(p.blocksize).view(n, k)
    code = exact / scale  # each weight's code value (up to fp32 rounding)

    def ref(w: torch.Tensor) -> torch.Tensor:
        return F.linear(x.double(), w.double())

    truth = ref(exact)
    code_bf16 = ref(code.to(torch.bfloat16).double() * scale.double())
    cuda = gemv4bit._launch(x, (p,), None, False, None)
    triton = gemv4bit._launch(x, (p,), None, False, None, mma=False)
    with products(False):
        cuda_bf16 = gemv4bit._launch(x, (p,), None, False, None)
    large = (x.double() * 1e5).to(torch.bfloat16)  # past fp16's range: the kernel's scaling keeps it
    cuda_large = gemv4bit._launch(large, (p,), None, False, None)
    return {"cuda_vs_exact": rel(cuda, truth), "triton_vs_exact": rel(triton, truth),
            "cuda_bf16_products_vs_exact": rel(cuda_bf16, truth),
            "cuda_large_x_vs_exact": rel(cuda_large, F.linear(large.double(), exact.double())),
            "cuda_vs_bf16_code": rel(cuda, code_bf16), "triton_vs_bf16_code": rel(triton, code_bf16),
            "bf16_code_vs_exact_fp64": rel(code_bf16, truth),
            "fp16_code_vs_exact_fp64": rel(ref(code.half().double() * scale.double()), truth),
            "bf16_weights_vs_exact_fp64": rel(ref(exact.to(torch.bfloat16)), truth)}


def main() -> None:
    if not gemv4bit.gemv4bit_one.usable(torch.zeros(1, 1, 4096, device="cuda", dtype=torch.bfloat16),
                                        (gemv4bit.quantize(torch.randn(64, 4096, device="cuda"), "nf4"),), False):
        raise SystemExit("glmkit's batch-1 4-bit CUDA kernel does not run here (compute capability 8.0+, "
                         "GLMKIT_4BIT_KERNEL unset): nothing to compare.")
    g = torch.Generator("cuda").manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        errs = [projection(n, k, g) for _ in range(4)]  # 4 weights and tokens each: the mean
        rows.append({"projection": name, "rows": n, "columns": k, **{key: sum(e[key] for e in errs) / len(errs)
                                                                     for key in errs[0]}})
        print(rows[-1], flush=True)
    save_result("nf4_code_rounding", {"what": __doc__.splitlines()[0], "device": device_name(), "gpu_uuids": gpu_uuids(),
                                      "gpu_note": "read with nvidia-smi in the same call", "rows": rows})


if __name__ == "__main__":
    main()
