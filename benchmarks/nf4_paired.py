"""Two tiles of rows per program in glmkit's per-row 4-bit kernel (``gemv4bit.PAIRED_ROWS``): each thread's x then
serves two rows (as the SwiGLU kernel's gate and up rows already share it), halving x's reads through L1, which
held the kernel back (``nf4_ncu.json``: L1/TEX 74-87% busy, DRAM 22-39%). GLM-4-9B's q/k/v, o_proj and down_proj at
batch 1 on one GPU, one run: the tuner's sweep (``glmkit.gemv_tuning.tune_projection``, ten shapes) without and with
the pairs (µs and TB/s of packed weights, best shape), then the batch-1 decode step of GLM-4-9B in nf4 (random weights) with
each one's best shapes, replayed back to back (three rounds, taking turns), with bf16 beside them.

    PYTHONPATH=.:benchmarks python benchmarks/nf4_paired.py --checkpoint /tmp/glm9b    # about 5 minutes on an H200
Writes benchmarks/results/nf4_paired.json (and to $OUT). ``nf4_paired_gate_up.json`` timed the same for the SwiGLU kernel
(gate_up): its gate and up tiles with a second pair of them (four tiles a program) against two; the best shapes took
32.24 and 32.26 µs, and the step was 5.6% slower with four (3437.8 against 3255.0 µs), so that variant was removed;
its two-tile sweep gave gate_up's shape in the H200 table, (2, 512, 1): 32.26 µs against 33.48 at (4, 512, 2).
"""

from __future__ import annotations

import argparse

import torch
from early_reads import replay_us
from nf4_fused import NEW, PROMPT, ROUNDS, step_logits, warmed  # (the step's benchmarks share them)

from glmkit import gemv4bit
from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.gemv import GemvConfig
from glmkit.gemv_tuning import projections, tune_projection
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

# the shapes both sweeps time (the H200's table has (4, 1024, 4) for all three)
SHAPES = [GemvConfig(*s) for s in ((1, 2048, 4), (2, 1024, 2), (2, 1024, 4), (2, 2048, 4), (4, 512, 2), (4, 512, 4),
                                   (4, 1024, 4), (4, 1024, 8), (8, 512, 4), (8, 1024, 8))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    args = ap.parse_args()
    ensure_random_checkpoint(args.checkpoint)
    bw = copy_bandwidth()
    result = {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": bw, "projections": [], "decode": []}
    models = {p: load_precision(args.checkpoint, p, device_map="cuda:0") for p in ("nf4", "bf16")}
    decoders = {}
    for paired in (0, 1):
        gemv4bit.PAIRED_ROWS = bool(paired)  # read as the kernels launch: the tuner's and the decoder's capture
        for name, (n, k, bias, swiglu) in projections(quantized=True).items():
            if swiglu:
                continue
            row = tune_projection(name, n, k, bias, swiglu, "nf4", shapes=SHAPES)
            row["paired"] = paired
            result["projections"].append(row)
            print(name, "paired" if paired else "one tile", row["best"], flush=True)
        decoders[paired] = warmed(models["nf4"])  # its graphs captured with these shapes
        save_result("nf4_paired", result)
    gemv4bit.PAIRED_ROWS = False
    decoders["bf16"] = warmed(models["bf16"])
    times = {v: ([], []) for v in decoders}
    for _ in range(ROUNDS):
        for v, decoder in decoders.items():
            times[v][0].append(replay_us(decoder))
            times[v][1].append(decoder.tokens_per_second(PROMPT, NEW)["decode_tok_s"])
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    reference = step_logits(decoders[0], ids)
    for v, decoder in decoders.items():
        precision = "bf16" if v == "bf16" else "nf4"
        row = {"variant": {0: "one tile", 1: "paired", "bf16": "bf16"}[v], "precision": precision,
               "replay_us": times[v][0], "decode_tok_s": times[v][1], "best_replay_us": min(times[v][0]),
               "best_tok_s": max(times[v][1]),
               "fraction_of_roofline": max(times[v][1]) * bytes_read_per_token(models[precision]) / bw}
        if precision == "nf4":
            logits = step_logits(decoder, ids)
            row["step_logits_rel_diff_to_one_tile"] = ((logits - reference).norm() / reference.norm()).item()
        result["decode"].append(row)
    bf16 = result["decode"][-1]["best_tok_s"]
    for row in result["decode"]:
        row["over_bf16"] = row["best_tok_s"] / bf16
        print({k: v for k, v in row.items() if k not in ("replay_us", "decode_tok_s")}, flush=True)
    save_result("nf4_paired", result)


if __name__ == "__main__":
    main()
