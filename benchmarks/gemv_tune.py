"""Tune glmkit's Triton GEMV kernels for GLM-4-9B-Chat's projections at batch 1 (bf16/fp16 against cuBLAS, nf4/fp4
against bitsandbytes' matmul_4bit), then decode with them.

For each projection (qkv with bias, o_proj, gate_up with SwiGLU, down_proj, lm_head) every launch shape is checked
against a float64 reference and timed as the decode step runs it: back to back over enough weight copies that
nothing is served from the 50 MB L2, inside one CUDA graph. Then the fast path decodes with cuBLAS and with the
best shapes (``FastDecoder(gemv="triton")``), 3 runs each, against the roofline of the same run.

    python benchmarks/gemv_tune.py --kernels bf16,nf4 --write-table glmkit/assets/gemv_tuned_h200.json \
        --skip-decode --name gemv_tune_h200
    python benchmarks/gemv_tune.py --checkpoint /tmp/glm9b            # bf16 only, then decode with cuBLAS and Triton
Writes benchmarks/results/gemv_tune.json (and to $OUT). The kernel search itself lives in glmkit.gemv_tuning (also
``glmkit tune``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from glmkit.bench import bytes_read_per_token, copy_bandwidth, load_random_9b, save_result
from glmkit.gemv import device_name
from glmkit.gemv_tuning import table_configs, tune, write_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--name", default="gemv_tune", help="result file name (benchmarks/results/NAME.json)")
    ap.add_argument("--kernels", default="bf16",
                    help="comma-separated: bf16, fp16, nf4, fp4 (default bf16; fp16 takes bf16's shapes unless given)")
    ap.add_argument("--write-table", nargs="?", const="user", default=None,
                    help="write the best shapes for this card: to glmkit's cache (the user's table, which takes "
                         "precedence) or to PATH, e.g. glmkit/assets/gemv_tuned_h200.json to ship them")
    ap.add_argument("--tp", type=int, default=1, help="2: one tensor-parallel rank's shard shapes (then no decode)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemv_tune.py times kernels on a GPU; this machine has none.")
    result: dict = {"copy_bandwidth_bytes_s": copy_bandwidth(), "device": device_name()}
    result["tp"] = args.tp
    result["projections"] = tune(args.kernels.split(","), tp=args.tp)
    save_result(args.name, result)
    result["tuned"] = table_configs(result["projections"])
    if args.write_table:
        path = write_table(result["tuned"], None if args.write_table == "user" else args.write_table,
                           source="benchmarks/gemv_tune.py (benchmarks/results/gemv_tune.json)")
        print(f"wrote {path}", flush=True)
        if os.environ.get("OUT"):
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    if args.skip_decode or args.tp > 1:
        return
    from glmkit.fast_decode import FastDecoder

    model = load_random_9b(args.checkpoint)
    result["roofline_tok_s"] = result["copy_bandwidth_bytes_s"] / bytes_read_per_token(model)
    result["decode"] = []
    ids = torch.randint(0, 1000, (1, 32), device="cuda")
    tokens, logits = {}, {}
    for label, gemv_option in (("cublas", False), ("triton", "triton"), ("cublas again", False)):
        t0 = time.perf_counter()
        decoder = FastDecoder(model, max_len=32 + args.new_tokens, gemv=gemv_option)
        decoder.tokens_per_second(32, 8)  # compile and capture
        setup = time.perf_counter() - t0
        runs = [decoder.tokens_per_second(32, args.new_tokens)["decode_tok_s"] for _ in range(3)]
        tokens[label] = decoder.generate(ids, 64, ignore_eos=True)[0, 32:].tolist()
        decoder.prefill(ids)
        logits[label] = decoder.decode_step(ids[:, -1], 32).clone()  # the same token and cache for every decoder
        row = {"variant": label, "gemv": gemv_option, "compile_and_capture_s": setup, "decode_tok_s": runs,
               "fraction_of_roofline": max(runs) / result["roofline_tok_s"]}
        result["decode"].append(row)
        print(row, flush=True)
        del decoder
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(tokens["cublas"], tokens["triton"]))
    result["greedy_tokens_equal_to_cublas_of_64"] = same
    for label in ("triton", "cublas again"):
        a, b = logits[label].double(), logits["cublas"].double()
        result[f"decode_logits_rel_diff_{label.replace(' ', '_')}_vs_cublas"] = ((a - b).norm() / b.norm()).item()
    save_result(args.name, {"method": "bf16, batch 1; kernels: median of 5 timings of 20 replays of a CUDA graph "
                                        "over ~1 GiB of weight copies; decode: 32-token prompt, "
                                        f"{args.new_tokens} new tokens, 3 runs per decoder", **result})


if __name__ == "__main__":
    main()
