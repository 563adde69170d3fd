"""GLM-4-9B's bf16 batch-1 step with q/k/v and o_proj through glmkit's 16-bit CUDA kernel (``glmkit.gemv16_one``,
leaving SMs to the decode attention) against the Triton GEMVs, on one GPU, one run.

Variants take turns (three rounds: clock and temperature drift touch them alike): per variant the CUDA graph of one
step replayed back to back around 40/100/160/220/262 cached tokens (µs a token) and ``decode_speed`` (tok/s of the token
loop, 32 prompt + 256 new tokens); against the copy-bandwidth roofline measured in the same run; the greedy tokens and
the first step's logits against the Triton variant's. Alone (weights past L2, launched back to back in one CUDA
graph, plainly and with programmatic dependent launch): q/k/v (norm and bias folded in) and o_proj (residual add)
through both kernels, with their error against fp32.

    PYTHONPATH=.:benchmarks python benchmarks/gemv16_step.py --checkpoint /tmp/glm9b     # about 2.5 minutes on an H200
Writes benchmarks/results/gemv16_step.json (or --name; and to $OUT).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any

import torch
from nf4_fused import PROMPT, ROUNDS, against_reference, every_row, gpu_uuids, take_turns, warmed
from step_roles import step_us

from glmkit import gemv16_one
from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.gemv import dependent_launches
from glmkit.gemv import gemv as triton_gemv
from glmkit.gemv_tuning import graph_time
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

VARIANTS = {"Triton GEMVs": False, "CUDA q/k/v and o_proj (default)": True}
POSITIONS = (40, 100, 160, 220, 262)


def kernel(on: bool) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if on else gemv16_one.turned_off()



def alone() -> list[dict[str, Any]]:
    """q/k/v and o_proj at GLM-4-9B's shapes through both kernels, alone."""
    g = torch.Generator("cuda").manual_seed(0)
    return [row for name, n, k in (("qkv", 4608, 4096), ("o_proj", 4096, 4096)) for row in projection(name, n, k, g)]


def projection(name: str, n: int, k: int, g: torch.Generator) -> list[dict[str, Any]]:
    """One projection through both kernels: µs a launch (weights past L2), TB/s, error against fp32."""
    copies = max(4, -(-600_000_000 // (n * k * 2)))  # past L2
    ws = [(torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, 1, k, device="cuda", generator=g).to(torch.bfloat16)
    bias = (torch.randn(n, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    norm = (torch.rand(k, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    residual = torch.randn(1, 1, n, device="cuda", generator=g).to(torch.bfloat16)
    fns: dict[str, Callable[[int], torch.Tensor]]
    if name == "qkv":
        fns = {"triton": lambda i: triton_gemv(x, ws[i], bias, norm_weight=norm),
               "cuda": lambda i: gemv16_one.gemv_16_one(x, ws[i], bias, norm_weight=norm, role="qkv")}
        want = gemv16_one._reference(x, ws[0], bias, norm, 1e-5, None)
    else:
        fns = {"triton": lambda i: triton_gemv(x, ws[i], None, residual=residual),
               "cuda": lambda i: gemv16_one.gemv_16_one(x, ws[i], residual=residual, role="o_proj")}
        want = gemv16_one._reference(x, ws[0], None, None, 1e-5, residual)
    rows = []
    for label, fn in fns.items():
        row = {"projection": name, "kernel": label, "rows": n, "columns": k,
               "rel_err_to_fp32": ((fn(0).float() - want).norm() / want.norm()).item(),
               "us": graph_time(fn, copies) * 1e6}
        with dependent_launches():
            row["us_pdl"] = graph_time(fn, copies) * 1e6
        row["tb_s_pdl"] = n * k * 2 / row["us_pdl"] / 1e6
        print(row, flush=True)
        rows.append(row)
    return rows


def timed_variants(decoders: dict[str, Any], rows: dict[str, dict[str, Any]],
                   around: Callable[[str], contextlib.AbstractContextManager[Any]], reference: str) -> None:
    """After the variants took turns (``take_turns``): each one's step replayed at ``POSITIONS``, its best round, and
    its best against ``reference``'s (decode tok/s, and the replayed step), into its row (``mlp16_step.py`` too)."""
    for v, decoder in decoders.items():
        row = rows[v]
        with around(v):
            row["replay_at_us"] = {p: step_us(decoder, p) for p in POSITIONS}
        row["best_replay_us"], row["best_tok_s"] = min(row["replay_us"]), max(row["decode_tok_s"])
    base = rows[reference]
    for row in rows.values():
        row["over_triton"] = row["best_tok_s"] / base["best_tok_s"]
        row["replay_over_triton"] = base["best_replay_us"] / row["best_replay_us"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--name", default="gemv16_step")
    args = ap.parse_args()
    ensure_random_checkpoint(args.checkpoint)
    if not gemv16_one.check("cuda", torch.bfloat16):
        raise SystemExit("glmkit.gemv16_one does not run on this GPU (its first-run check failed: see the warning).")
    bw = copy_bandwidth()
    alone_rows = alone()
    model = load_precision(args.checkpoint, "bf16", device_map="cuda:0")
    roofline = bw / bytes_read_per_token(model)
    decoders = {}
    for v, on in VARIANTS.items():
        with kernel(on):
            decoders[v] = warmed(model)
    rows = {v: {"variant": v, "cuda_kernel": on, "replay_us": [], "decode_tok_s": []} for v, on in VARIANTS.items()}
    around = lambda v: kernel(VARIANTS[v])  # noqa: E731
    take_turns(decoders, rows, around=around)
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    reference = "Triton GEMVs"
    against_reference(decoders, rows, ids, reference, "tokens_as_triton", "first_logits_rel_diff", around, every_row)
    timed_variants(decoders, rows, around, reference)
    for row in rows.values():
        row["fraction_of_roofline"] = row["best_tok_s"] / roofline
        print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
               if k not in ("replay_us", "decode_tok_s")}, flush=True)
    save_result(args.name, {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": bw, "roofline_tok_s": roofline,
                            "rounds": ROUNDS, "prompt": PROMPT, "new_tokens": 256, "gpu_uuids": gpu_uuids(),
                            "gpu_note": "read with nvidia-smi in the same call", "alone": alone_rows,
                            "rows": list(rows.values())})


if __name__ == "__main__":
    main()
