"""The kernels Nsight Compute profiled for the 4-bit GEMV's bottleneck: glmkit's per-row 4-bit kernel on GLM-4-9B's
gate_up (SwiGLU) and o_proj shapes, and the bf16 GEMV on the same shapes, three times each.

    PYTHONPATH=. python benchmarks/nf4_ncu.py     # runs Nsight Compute on this script
"""

import torch

from glmkit.gemv import gemv, gemv_swiglu
from glmkit.gemv4bit import gemv_4bit, gemv_4bit_swiglu, quantize

torch.manual_seed(0)
x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
gate_up = torch.randn(27392, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
o_proj = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
gate_up4, o_proj4 = quantize(gate_up, "nf4"), quantize(o_proj, "nf4")
for _ in range(3):
    gemv_4bit_swiglu(x, gate_up4)
    gemv_4bit(x, o_proj4)
    gemv_swiglu(x, gate_up)
    gemv(x, o_proj)
torch.cuda.synchronize()
