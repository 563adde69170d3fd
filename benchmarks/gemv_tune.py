"""Tune glmkit's Triton GEMV kernels for GLM-4-9B-Chat's projections at batch 1, against cuBLAS, then decode with them.

For each projection (qkv with bias, o_proj, gate_up with SwiGLU, down_proj, lm_head) every launch shape is checked
against a float64 reference and timed as the decode step runs it: back to back over enough weight copies that
nothing is served from the 50 MB L2, inside one CUDA graph. Then the fast path decodes with cuBLAS and with the
best shapes (``FastDecoder(gemv="triton")``), 3 runs each, against the roofline of the same run.

    python benchmarks/gemv_tune.py --checkpoint /tmp/glm9b
Writes benchmarks/results/gemv_tune.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.bench import environment_record as result_environment
from glmkit.gemv import TUNED, TUNED_TABLE, GemvConfig, gemv, gemv_swiglu
from glmkit.models import ensure_random_checkpoint


def projections() -> dict[str, tuple[int, int, bool, bool]]:
    """name -> (rows, columns, has bias, SwiGLU) of GLM-4-9B-Chat's weights (rows of one half for gate_up)."""
    from transformers import GlmConfig

    c = GlmConfig()
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"qkv": ((c.num_attention_heads + 2 * c.num_key_value_heads) * hd, c.hidden_size, True, False),
            "o_proj": (c.hidden_size, c.num_attention_heads * hd, False, False),
            "gate_up": (c.intermediate_size, c.hidden_size, False, True),
            "down_proj": (c.hidden_size, c.intermediate_size, False, False),
            "lm_head": (c.vocab_size, c.hidden_size, False, False)}


def configs(swiglu: bool) -> list[GemvConfig]:
    """Launch shapes to try: at most 64 fp32 partial sums per thread (32 per accumulator with SwiGLU's two)."""
    out = []
    for bn, bk, warps in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (2, 4, 8)):
        per_thread = bn * bk // (warps * 32) * (2 if swiglu else 1)
        if 8 <= per_thread <= 64:
            out.append(GemvConfig(bn, bk, warps))
    return out


def graph_time(fn, copies: int, replays: int = 20) -> float:
    """Seconds per call of fn(i) for i over the weight copies, run back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (replays * copies))
    return sorted(times)[len(times) // 2]


def tune_one(name: str, n: int, k: int, bias: bool, swiglu: bool) -> dict:
    rows = 2 * n if swiglu else n
    nbytes = rows * k * 2
    copies = max(2, math.ceil(2**30 / nbytes))  # about 1 GiB of weights: 20x the L2
    ws = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    b = torch.randn(rows, device="cuda", dtype=torch.bfloat16) if bias else None
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.double(), ws[0].double(), None if b is None else b.double())
    if swiglu:
        gate, up = ref.chunk(2, dim=-1)
        ref = up * F.silu(gate)

    def cublas(i):
        y = F.linear(x, ws[i], b)
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = up * F.silu(gate)
        return y

    t_cublas = graph_time(cublas, copies)
    row = {"projection": name, "rows": rows, "columns": k, "bytes": nbytes, "copies": copies,
           "cublas_us": t_cublas * 1e6, "cublas_tb_s": nbytes / t_cublas / 1e12, "tried": []}
    best = None
    for cfg in configs(swiglu):
        try:
            def ours(i, cfg=cfg):
                return gemv_swiglu(x, ws[i], config=cfg) if swiglu else gemv(x, ws[i], b, config=cfg)

            err = ((ours(0).double() - ref).norm() / ref.norm()).item()  # NaN (a row never written) fails the check
            t = graph_time(ours, copies)
        except Exception as exc:  # a shape Triton cannot build (registers, shared memory): record and go on
            row["tried"].append({**cfg.__dict__, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        entry = {**cfg.__dict__, "us": t * 1e6, "tb_s": nbytes / t / 1e12, "rel_err": err}
        row["tried"].append(entry)
        if err < 2e-2 and (best is None or t < best[1]):
            best = (cfg, t)
    row["best"] = {**best[0].__dict__, "us": best[1] * 1e6, "tb_s": nbytes / best[1] / 1e12}
    row["speedup_vs_cublas"] = t_cublas / best[1]
    TUNED[(n, k)] = best[0]
    print(name, {key: row[key] for key in ("cublas_us", "cublas_tb_s", "best", "speedup_vs_cublas")}, flush=True)
    ws.clear()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--write-table", nargs="?", const=str(TUNED_TABLE), default=None,
                    help=f"write the best shapes where glmkit.gemv reads them (default {TUNED_TABLE})")
    args = ap.parse_args()
    result: dict = {"copy_bandwidth_bytes_s": copy_bandwidth(), "projections": []}
    for name, (n, k, bias, swiglu) in projections().items():
        result["projections"].append(tune_one(name, n, k, bias, swiglu))
        save_result("gemv_tune", result)
    result["tuned"] = {f"{n},{k}": cfg.__dict__ for (n, k), cfg in TUNED.items()}
    if args.write_table:
        env = result_environment()
        table = {"tuned_on": env["device"], "source": "benchmarks/gemv_tune.py (benchmarks/results/gemv_tune.json)",
                 "date": env["date"], "configs": [{"rows": n, "columns": k, **cfg.__dict__}
                                                  for (n, k), cfg in TUNED.items()]}
        Path(args.write_table).write_text(json.dumps(table, indent=1) + "\n")
    if args.skip_decode:
        return
    from glmkit.fast_decode import FastDecoder
    from glmkit.loading import load_model

    ensure_random_checkpoint(args.checkpoint)
    model = load_model(args.checkpoint, dtype=torch.bfloat16, device_map="cuda:0")
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
    save_result("gemv_tune", {"method": "bf16, batch 1; kernels: median of 5 timings of 20 replays of a CUDA graph "
                                        "over ~1 GiB of weight copies; decode: 32-token prompt, "
                                        f"{args.new_tokens} new tokens, 3 runs per decoder", **result})


if __name__ == "__main__":
    main()
