"""A 4-bit model's decode speed by batch size on one GPU, in one run: glmkit's 4-bit kernels against bitsandbytes'.

For each batch size (1, 2, 4, 8, 16), tok/s summed over the batch (best of 3; 32-token prompts, 128 new tokens):
GLM-4-9B in nf4 through glmkit's 4-bit kernels (a program per row and row block, so each weight comes from memory
once and the other rows read it from the L2 cache, but every row pays its own lookups: ``gemv="triton"``, the layer
compiled around the ops) and through bitsandbytes' ``matmul_4bit`` (its one-token kernel at batch 1,
dequantize-then-GEMM above: ``gemv=False``, eager layers), with bf16
(the default decoder) beside them. Where glmkit's kernels stop being faster is ``FOUR_BIT_MAX_BATCH``
(``glmkit.fast_decode``): what ``gemv="auto"`` uses them up to. Random weights of the exact GLM-4-9B architecture.
On an H200 about 4 minutes:

    PYTHONPATH=. python benchmarks/nf4_batch.py
Writes benchmarks/results/nf4_batch.json (and to $OUT).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from glmkit.bench import save_result, stage_runner
from glmkit.fast_decode import FOUR_BIT_MAX_BATCH, FastDecoder
from glmkit.models import ensure_random_checkpoint

PROMPT, NEW_TOKENS = 32, 128
RUNS = {"nf4_glmkit": ("nf4", dict(gemv="triton")), "nf4_bitsandbytes": ("nf4", dict(gemv=False)), "bf16": ("bf16", {})}


def batch_row(models: dict[str, torch.nn.Module], b: int) -> dict[str, Any]:
    """Every decoder of ``RUNS`` at batch ``b``: tok/s and whether its step ran a compiled layer."""
    row: dict[str, Any] = {"batch": b}
    for key, (precision, options) in RUNS.items():
        decoder = FastDecoder(models[precision], max_len=PROMPT + NEW_TOKENS + 8, batch_size=b, **options)
        row[key] = max(decoder.tokens_per_second(PROMPT, NEW_TOKENS)["decode_tok_s"] for _ in range(3))
        row[f"{key}_compiled"] = bool(decoder.compiled and decoder.layer_fn_for(b) is decoder.layer_fn)
        del decoder
        torch.cuda.empty_cache()
    row["glmkit_over_bitsandbytes"] = row["nf4_glmkit"] / row["nf4_bitsandbytes"]
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("nf4_batch.py measures a GPU; this machine has none.")
    from glmkit.quantization import load_precision

    ensure_random_checkpoint(args.checkpoint)
    models = {p: load_precision(args.checkpoint, p, device_map="cuda:0") for p in ("nf4", "bf16")}
    result: dict[str, Any] = {
        "method": f"{PROMPT}-token prompts, {NEW_TOKENS} new tokens, best of 3 runs, tok/s summed over the batch; "
                  "nf4 through glmkit's 4-bit kernels (gemv='triton', compiled layers) and bitsandbytes' matmul_4bit "
                  "(its one-token kernel at batch 1, dequantize-then-GEMM above; gemv=False, eager layers); bf16 with "
                  "the default decoder",
        "four_bit_max_batch_in_this_run": FOUR_BIT_MAX_BATCH, "errors": [], "rows": []}
    stage = stage_runner("nf4_batch", result)
    for b in args.sizes:
        row = stage(f"batch {b}", batch_row, models, b)
        if row:
            result["rows"].append(row)
        save_result("nf4_batch", result)


if __name__ == "__main__":
    main()
