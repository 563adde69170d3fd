"""A 4-bit model's decode speed by batch size on one GPU, in one run: glmkit's two 4-bit kernels against bitsandbytes'.

For each batch size (1 to 64), tok/s summed over the batch (best of 3; 32-token prompts, 128 new tokens): GLM-4-9B
in nf4 through glmkit's per-row kernel (a program per row and row block: each weight comes from memory once, but
every row pays its own lookups; up to 8 rows), through glmkit's Triton tensor-core kernel (each weight looked up
once for all rows, the products on the tensor cores; 2 rows and more), both with ``GLMKIT_4BIT_KERNEL=triton``,
through glmkit's CUDA tensor-core kernel (``glmkit.gemv4bit_mma``, the default for 2-8 rows), all with the layer
compiled around them (``gemv="triton"``; ``gemv4bit.ROW_KERNEL_MAX_VECTORS`` set to pick the kernel), and through
bitsandbytes' ``matmul_4bit`` (its one-token kernel at batch 1, dequantize-then-GEMM above: ``gemv=False``, eager layers), with
bf16 (the default decoder) beside them. Where the tensor-core kernel overtakes the per-row one is
``ROW_KERNEL_MAX_VECTORS``; where glmkit's kernels stop being faster than bitsandbytes' is ``FOUR_BIT_MAX_BATCH``
(``glmkit.fast_decode``: what ``gemv="auto"`` uses them up to). Random weights of the exact GLM-4-9B architecture.
On an H200 about 5 minutes:

    PYTHONPATH=. python benchmarks/nf4_batch.py
    PYTHONPATH=. python benchmarks/nf4_batch.py --sizes 1 2 4 8 16 --name nf4_batch_mma
Writes benchmarks/results/nf4_batch.json (or --name; and to $OUT). ``nf4_batch.json`` was measured before the CUDA
kernel existed (its rows have no ``nf4_mma``); ``nf4_batch_mma.json`` with it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from glmkit import gemv4bit
from glmkit.bench import save_result, stage_runner
from glmkit.fast_decode import FOUR_BIT_MAX_BATCH, FastDecoder
from glmkit.models import ensure_random_checkpoint

PROMPT, NEW_TOKENS = 32, 128
# name: (precision, decoder options, ROW_KERNEL_MAX_VECTORS while it runs (None: as it is), batch sizes it runs at,
# GLMKIT_4BIT_KERNEL while it runs: "mma" lets 2-8 rows take the CUDA kernel, "triton" keeps them on Triton's)
RUNS = {"nf4_rows": ("nf4", dict(gemv="triton"), gemv4bit.MAX_VECTORS, range(1, 9), "triton"),
        "nf4_tensor_cores": ("nf4", dict(gemv="triton"), 1, range(2, 65), "triton"),
        "nf4_mma": ("nf4", dict(gemv="triton"), None, range(2, 9), "mma"),
        "nf4_bitsandbytes": ("nf4", dict(gemv=False), None, range(1, 65), "mma"),
        "bf16": ("bf16", {}, None, range(1, 65), "mma")}


def batch_row(models: dict[str, torch.nn.Module], b: int) -> dict[str, Any]:
    """Every decoder of ``RUNS`` that runs at batch ``b``: tok/s and whether its step ran a compiled layer."""
    row: dict[str, Any] = {"batch": b}
    default = gemv4bit.ROW_KERNEL_MAX_VECTORS
    for key, (precision, options, rows_max, sizes, kernel) in RUNS.items():
        if b not in sizes:
            continue
        gemv4bit.ROW_KERNEL_MAX_VECTORS = default if rows_max is None else rows_max  # read as each kernel launches
        os.environ["GLMKIT_4BIT_KERNEL"] = kernel
        try:
            decoder = FastDecoder(models[precision], max_len=PROMPT + NEW_TOKENS + 8, batch_size=b, **options)
            row[key] = max(decoder.tokens_per_second(PROMPT, NEW_TOKENS)["decode_tok_s"] for _ in range(3))
            row[f"{key}_compiled"] = bool(decoder.compiled and decoder.layer_fn_for(b) is decoder.layer_fn)
        finally:
            gemv4bit.ROW_KERNEL_MAX_VECTORS = default
            os.environ.pop("GLMKIT_4BIT_KERNEL")
        del decoder
        torch.cuda.empty_cache()
    glmkit = max(row.get("nf4_rows", 0.0), row.get("nf4_tensor_cores", 0.0), row.get("nf4_mma", 0.0))
    if "nf4_mma" in row:
        row["mma_over_triton"] = row["nf4_mma"] / max(row.get("nf4_rows", 0.0), row.get("nf4_tensor_cores", 0.0))
    row["glmkit_over_bitsandbytes"] = glmkit / row["nf4_bitsandbytes"]
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 32, 64])
    ap.add_argument("--name", default="nf4_batch", help="the result's name (nf4_batch_mma: the run of --sizes 1 2 4 8 "
                                                         "16 that measured the CUDA kernel)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("nf4_batch.py measures a GPU; this machine has none.")
    from glmkit.quantization import load_precision

    ensure_random_checkpoint(args.checkpoint)
    models = {p: load_precision(args.checkpoint, p, device_map="cuda:0") for p in ("nf4", "bf16")}
    result: dict[str, Any] = {
        "method": f"{PROMPT}-token prompts, {NEW_TOKENS} new tokens, best of 3 runs, tok/s summed over the batch; "
                  "nf4 through glmkit's per-row 4-bit kernel (up to 8 rows) and its Triton tensor-core kernel (2 rows "
                  "and more) with GLMKIT_4BIT_KERNEL=triton, its CUDA tensor-core kernel (2-8 rows; gemv='triton', "
                  "compiled layers) and bitsandbytes' matmul_4bit (its one-token kernel at batch "
                  "1, dequantize-then-GEMM above; gemv=False, eager layers); bf16 with the default decoder",
        "four_bit_max_batch_in_this_run": FOUR_BIT_MAX_BATCH,
        "row_kernel_max_vectors_in_this_run": gemv4bit.ROW_KERNEL_MAX_VECTORS, "errors": [], "rows": []}
    stage = stage_runner(args.name, result)
    for b in args.sizes:
        row = stage(f"batch {b}", batch_row, models, b)
        if row:
            result["rows"].append(row)
        save_result(args.name, result)


if __name__ == "__main__":
    main()
