"""GLM-4-9B's batch-1 step with its MLP as one CUDA kernel (``glmkit.mlp16_one``) against the two Triton GEMVs
(gate/up, then down), in bf16 and fp16 on one GPU, one run.

Per dtype the variants take turns (three rounds: clock and temperature drift touch them alike): the CUDA graph of one
step replayed back to back around 40/100/160/220/262 cached tokens (µs a token) and ``decode_speed`` (tok/s of the
token loop, 32 prompt + 256 new tokens); against the copy-bandwidth roofline measured in the same run (the best of a
measurement before the decoders and one after them, the card warm); the greedy tokens and the first step's logits
against the Triton variant's. Alone (weights past L2, launched back to back in one CUDA graph with programmatic
dependent launch): GLM-4-9B's MLP through both, with the error of each against fp32.

    PYTHONPATH=.:benchmarks python benchmarks/mlp16_step.py --checkpoint /tmp/glm9b     # about 2 minutes on an H200
Writes benchmarks/results/mlp16_step.json (or --name; and to $OUT).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
from typing import Any

import torch
from gemv16_step import timed_variants
from nf4_fused import PROMPT, ROUNDS, against_reference, every_row, gpu_uuids, take_turns, warmed

from glmkit import mlp16_one
from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.gemv import dependent_launches, gemv_swiglu
from glmkit.gemv import gemv as triton_gemv
from glmkit.gemv_tuning import graph_time
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

TRITON, KERNEL = "Triton gate/up and down", "one-kernel MLP (default)"
VARIANTS = {TRITON: False, KERNEL: True}


def kernel(on: bool) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if on else mlp16_one.turned_off()


def alone(dtype: torch.dtype) -> list[dict[str, Any]]:
    """GLM-4-9B's MLP (4096 x 13696) through both: µs a launch (weights past L2), TB/s, error against fp32."""
    hidden, inter, copies = 4096, 13696, 4
    g = torch.Generator("cuda").manual_seed(0)
    sets = [((torch.randn(2 * inter, hidden, device="cuda", generator=g) * 0.02).to(dtype),
             (torch.randn(hidden, inter, device="cuda", generator=g) * 0.02).to(dtype)) for _ in range(copies)]
    x = torch.randn(1, 1, hidden, device="cuda", generator=g).to(dtype)
    norm = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(dtype)
    ws = mlp16_one.Workspace(x.device, hidden, inter, dtype)
    fns = {TRITON: lambda i: triton_gemv(gemv_swiglu(x, sets[i][0], norm_weight=norm), sets[i][1], residual=x),
           KERNEL: lambda i: mlp16_one.mlp_16_one(x, sets[i][0], sets[i][1], norm, 1e-5, ws)}
    want = mlp16_one.reference(x, *sets[0], norm, 1e-5).float()
    rows = []
    for label, fn in fns.items():
        err = ((fn(0).float() - want).norm() / (want - x.float()).norm()).item()
        with dependent_launches():
            us = graph_time(fn, copies) * 1e6
        row = {"dtype": str(dtype).removeprefix("torch."), "kernel": label, "hidden": hidden, "inter": inter,
               "rel_err_to_fp32": err, "us_pdl": us, "tb_s_pdl": 3 * hidden * inter * 2 / us / 1e6}
        print(row, flush=True)
        rows.append(row)
    return rows


def step_rows(checkpoint: str, precision: str, bw: list[float]) -> list[dict[str, Any]]:
    """The step of ``precision`` through both variants, taking turns; ``bw``: copy bandwidths measured so far (one
    more is added once the decoders are warm)."""
    model = load_precision(checkpoint, precision, device_map="cuda:0")
    decoders = {}
    for v, on in VARIANTS.items():
        with kernel(on):
            decoders[v] = warmed(model)
    bw.append(copy_bandwidth())
    rows = {v: {"precision": precision, "variant": v, "mlp_kernel": on, "replay_us": [], "decode_tok_s": []}
            for v, on in VARIANTS.items()}
    around = lambda v: kernel(VARIANTS[v])  # noqa: E731
    take_turns(decoders, rows, around=around)
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    against_reference(decoders, rows, ids, TRITON, "tokens_as_triton", "first_logits_rel_diff", around, every_row)
    timed_variants(decoders, rows, around, TRITON)
    row_bytes = bytes_read_per_token(model)
    for row in rows.values():
        row["bytes_read_per_token"] = row_bytes
    del decoders, model
    gc.collect()
    torch.cuda.empty_cache()
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--name", default="mlp16_step")
    ap.add_argument("--precisions", default="bf16,fp16")
    args = ap.parse_args()
    ensure_random_checkpoint(args.checkpoint)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    precisions = args.precisions.split(",")
    for p in precisions:
        if not mlp16_one.check("cuda", dtypes[p]):
            raise SystemExit(f"glmkit.mlp16_one does not run on this GPU in {p} (its first-run check failed: see the "
                             "warning; it needs compute capability 9.0).")
    bw = [copy_bandwidth()]
    alone_rows = [row for p in precisions for row in alone(dtypes[p])]
    rows = [row for p in precisions for row in step_rows(args.checkpoint, p, bw)]
    best_bw = max(bw)
    for row in rows:
        row["roofline_tok_s"] = best_bw / row.pop("bytes_read_per_token")
        row["fraction_of_roofline"] = row["best_tok_s"] / row["roofline_tok_s"]
        print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
               if k not in ("replay_us", "decode_tok_s")}, flush=True)
    save_result(args.name, {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": best_bw,
                            "copy_bandwidth_measured_bytes_s": bw, "rounds": ROUNDS, "prompt": PROMPT,
                            "new_tokens": 256, "gpu_uuids": gpu_uuids(), "gpu_note": "read with nvidia-smi in the same call",
                            "alone": alone_rows, "rows": rows})


if __name__ == "__main__":
    main()
