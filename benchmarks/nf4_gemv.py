"""glmkit's 4-bit GEMV kernels on one GPU, in one run: speed and accuracy per projection, and what they give a token.

1. Each GLM-4-9B projection in nf4 (q/k/v read by one launch, o_proj, gate_up with SwiGLU, down_proj), batch 1,
   timed in CUDA graphs over ~1 GiB of weight copies (``glmkit.gemv_tuning.graph_time``): glmkit's Triton kernel
   at the rule-of-thumb shape and a short sweep of launch shapes with the warp-shuffle lookup, the other lookups
   (``gemv4bit.LOOKUPS``: 16-entry table loads, a 256-entry byte->pair table) at the best and default shapes
   (each projection's fastest shape and lookup are what the decoder below runs, and what --write-table writes),
   bitsandbytes' ``matmul_4bit``, bf16 ``F.linear`` and glmkit's bf16
   kernel; bytes read per second against the copy bandwidth. Each
   product's error against float64 on the fp32-dequantized weights (``code * absmax``, nothing rounded): ours,
   bitsandbytes', and dequantize-to-bf16 + ``F.linear`` (the bf16 path's own rounding).
2. ``FastDecoder`` at batch 1: bf16 and fp16 (Triton) vs nf4 through glmkit's kernels (the layer compiled around them, the
   default; and with eager layers) vs nf4 through bitsandbytes' kernel, tok/s (best of 3) against each one's
   roofline (copy bandwidth / bytes a token reads); a warning while building a decoder (a layer that did not
   compile) is recorded in its row.
3. Is nf4-Triton vs nf4-bitsandbytes' logit gap a real error? Teacher-forced logits (the same 16 tokens fed to
   every decoder) against fp32 decoders: the bf16 model in fp32 for bf16, the nf4 weights dequantized to fp32 for
   both nf4 paths; relative L2 error per step and greedy-token agreement.

Random weights of the exact GLM-4-9B architecture (DESIGN.md). On an H200 about 4 minutes:

    PYTHONPATH=. python benchmarks/nf4_gemv.py --write-table glmkit/assets/gemv_tuned_h200_4bit.json
    PYTHONPATH=. python benchmarks/nf4_gemv.py --sweep none      # the tuned shapes, each lookup: about 3 minutes
Writes benchmarks/results/nf4_gemv.json (and to $OUT) after every stage; ``--write-table`` also writes the best
shapes as a launch-shape table for this card (nf4, and fp4 copied from it: the same kernel).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from nf4_decode import FORCED, compare, forced_logits, token_bytes

from glmkit import gemv4bit
from glmkit.bench import RESULTS_DIR, copy_bandwidth, save_result, stage_runner
from glmkit.gemv import GemvConfig, active_table, device_name, gemv, gemv_swiglu, pick_config, tables_for
from glmkit.gemv4bit import (
    Packed4bit,
    config_for,
    gemv_4bit,
    gemv_4bit_multi,
    gemv_4bit_swiglu,
    linear_4bit,
    quantize,
    tuned_lookups,
)
from glmkit.gemv_tuning import candidates, graph_time, projections, write_table
from glmkit.models import ensure_random_checkpoint

PROMPT, NEW_TOKENS = 32, 128
QKV_ROWS = (4096, 256, 256)  # GLM-4-9B's q, k and v: 32 and 2 heads of 128


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def _swiglu(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.chunk(2, dim=-1)
    return up * F.silu(gate)


def projection_row(name: str, n: int, k: int, bias: bool, swiglu: bool, bandwidth: float, double_quant: bool,
                   sweep: list[GemvConfig], heights: tuple[int, ...] | None = None, device: str = "cuda",
                   timer: Any = graph_time) -> dict[str, Any]:
    """One projection: every shape of ``sweep`` (and the rule of thumb) timed and checked; bitsandbytes and bf16.
    ``heights``: the rows of each weight read by one launch (q, k, v); ``device``/``timer``: a CPU smoke run."""
    rows = 2 * n if swiglu else n
    heights = heights or (rows,)
    packed_bytes = rows * k // 2
    copies = max(2, math.ceil(2**30 / packed_bytes)) if device == "cuda" else 2
    w16 = [torch.randn(h, k, device=device, dtype=torch.bfloat16) * 0.02 for h in heights]
    ps = [[quantize(w if i == 0 else w * (1 + 1e-3 * i), "nf4", double_quant) for w in w16] for i in range(copies)]
    state_bytes = sum(t.numel() * t.element_size() for p in ps[0]
                      for t in (p.absmax, p.absmax2, p.code2) if t is not None)
    nbytes = packed_bytes + state_bytes  # what one product reads (x and y are a few KB)
    full16 = torch.cat(w16)
    copies16 = max(2, math.ceil(2**30 / full16.numel() / 2)) if device == "cuda" else 2
    ws16 = [full16] + [full16.clone() for _ in range(copies16 - 1)]
    b = torch.randn(rows, device=device, dtype=torch.bfloat16) * 0.02 if bias else None
    x = torch.randn(1, 1, k, device=device, dtype=torch.bfloat16)
    ref = F.linear(x.double(), torch.cat([p.dequantize(torch.float32) for p in ps[0]]).double(),
                   None if b is None else b.double())
    ref = _swiglu(ref) if swiglu else ref

    def ours(i: int, cfg: GemvConfig | None = None, lookup: str | None = None) -> torch.Tensor:
        if swiglu:
            return gemv_4bit_swiglu(x, ps[i][0], config=cfg, lookup=lookup)
        if len(heights) > 1:
            return gemv_4bit_multi(x, ps[i], b, config=cfg, lookup=lookup)
        return gemv_4bit(x, ps[i][0], b, config=cfg, lookup=lookup)

    def bnb(i: int) -> torch.Tensor:  # as FastDecoder runs bitsandbytes: one call per weight, then concatenated
        bs = [None] * len(heights) if b is None else b.split(list(heights))
        y = torch.cat([linear_4bit(x, p, bb) for p, bb in zip(ps[i], bs)], dim=-1)
        return _swiglu(y) if swiglu else y

    def dequant_bf16(i: int) -> torch.Tensor:
        y = F.linear(x, torch.cat([p.dequantize() for p in ps[i]]), b)
        return _swiglu(y) if swiglu else y

    def bf16_cublas(i: int) -> torch.Tensor:
        y = F.linear(x, ws16[i], b)
        return _swiglu(y) if swiglu else y

    def bf16_triton(i: int) -> torch.Tensor:
        return gemv_swiglu(x, ws16[i]) if swiglu else gemv(x, ws16[i], b)

    default = config_for(ps[0], swiglu)  # the rule of thumb (or a table's shape) for this card
    row: dict[str, Any] = {"projection": name, "weights": len(heights), "rows": rows, "columns": k,
                           "double_quant": double_quant, "nf4_bytes": nbytes, "bf16_bytes": rows * k * 2,
                           "copies": copies, "roofline_us": nbytes / bandwidth * 1e6, "default": default.__dict__,
                           "tried": []}
    by_lookup = {}
    for lookup in gemv4bit.LOOKUPS:  # the sweep with the warp-shuffle lookup; the others at its best and default
        shapes = [default, *sweep] if lookup == "shuffle" else [default, *(v[0] for v in by_lookup.values())]
        shapes = list(dict.fromkeys(shapes))
        for cfg in shapes:
            try:
                err = _rel(ours(0, cfg, lookup), ref)
                t = timer(lambda i, cfg=cfg, lookup=lookup: ours(i, cfg, lookup), copies)
            except Exception as exc:  # a shape Triton cannot build: record and go on
                row["tried"].append({**cfg.__dict__, "lookup": lookup, "error": f"{type(exc).__name__}: {exc!s:.200}"})
                continue
            row["tried"].append({**cfg.__dict__, "lookup": lookup, "us": t * 1e6, "tb_s": nbytes / t / 1e12,
                                 "rel_err": err})
            if err < 2e-2 and (lookup not in by_lookup or t < by_lookup[lookup][1]):
                by_lookup[lookup] = (cfg, t, err)
    row["best_by_lookup"] = {lk: {**cfg.__dict__, "us": t * 1e6, "tb_s": nbytes / t / 1e12, "rel_err": err,
                                  "fraction_of_copy_bandwidth": nbytes / t / bandwidth}
                             for lk, (cfg, t, err) in by_lookup.items()}
    row["default_us"] = {t["lookup"]: t["us"] for t in reversed(row["tried"]) if "us" in t and
                         (t["block_n"], t["block_k"], t["num_warps"]) == tuple(default.__dict__.values())}
    best_lookup, best = min(by_lookup.items(), key=lambda kv: kv[1][1], default=(None, None))  # shapes and lookups
    t_bnb, t16, t16t = timer(bnb, copies), timer(bf16_cublas, copies16), timer(bf16_triton, copies16)
    row |= {"bnb_matmul_4bit_us": t_bnb * 1e6, "bnb_matmul_4bit_tb_s": nbytes / t_bnb / 1e12,
            "bf16_cublas_us": t16 * 1e6, "bf16_cublas_tb_s": rows * k * 2 / t16 / 1e12,
            "bf16_triton_us": t16t * 1e6, "bf16_triton_config": pick_config(n, k).__dict__,
            # the best shape and lookup
            "speedup_vs_bnb": None if best is None else t_bnb / best[1],
            "speedup_vs_bf16_cublas": None if best is None else t16 / best[1],
            # errors against float64 on the fp32-dequantized weights
            "rel_err_ours": _rel(ours(0, best[0], best_lookup) if best else ours(0, default), ref),
            "rel_err_bnb": _rel(bnb(0), ref),
            "rel_err_dequantize_bf16_linear": _rel(dequant_bf16(0), ref)}
    print({k_: v for k_, v in row.items() if k_ != "tried"}, flush=True)
    return row


def projection_table(bandwidth: float, sweep_kind: str) -> dict[str, Any]:
    """Every projection in plain nf4 (the decoder's below) with the sweep, then down_proj with double quantization
    at its best shape. Each projection's fastest shape and lookup (``gemv4bit.LOOKUPS``) are what this process
    decodes with from then on (and what --write-table writes); ``total_us_by_lookup`` sums each lookup's best."""
    rows = []
    for name, (n, k, bias, swiglu) in projections(quantized=True).items():
        sweep = [] if sweep_kind == "none" else candidates("nf4", swiglu, quick=sweep_kind == "quick")
        rows.append(projection_row(name, n, k, bias, swiglu, bandwidth, False, sweep,
                                   QKV_ROWS if name == "qkv" else None))
        torch.cuda.empty_cache()
    totals = {lk: sum(r["best_by_lookup"][lk]["us"] for r in rows) for lk in gemv4bit.LOOKUPS
              if all(lk in r["best_by_lookup"] for r in rows)}
    chosen = {}  # per projection: its fastest lookup and shape, what the decoder below runs
    for r, (n, k, _, _) in zip(rows, projections(quantized=True).values()):
        lookup, best = min(r["best_by_lookup"].items(), key=lambda kv: kv[1]["us"], default=(None, None))
        r["best"] = None if best is None else {**best, "lookup": lookup}
        if best:  # read when the kernel runs: the decoder uses these
            active_table()[("nf4", n, k)] = GemvConfig(best["block_n"], best["block_k"], best["num_warps"])
            tuned_lookups()[("nf4", n, k)] = chosen[r["projection"]] = lookup
    n, k, bias, swiglu = projections(quantized=True)["down_proj"]
    rows.append(projection_row("down_proj", n, k, bias, swiglu, bandwidth, True, []))  # at its best shape
    torch.cuda.empty_cache()
    return {"rows": rows, "total_us_by_lookup": totals, "lookup_for_decode": chosen}


def table_entries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best shapes as table entries: nf4, and fp4 copied from it (the same kernel, another 16-value table)."""
    out = []
    for r in rows:
        if r.get("best") and not r["double_quant"]:
            n = r["rows"] // 2 if r["projection"] == "gate_up" else r["rows"]
            shape = {f: r["best"][f] for f in ("block_n", "block_k", "num_warps")}
            out += [{"kernel": "nf4", "rows": n, "columns": r["columns"], **shape, "lookup": r["best"]["lookup"]},
                    {"kernel": "fp4", "rows": n, "columns": r["columns"], **shape, "lookup": r["best"]["lookup"],
                     "copied_from": "nf4"}]
    return out


def decode_speed(model: torch.nn.Module, label: str, bandwidth: float, **options: Any) -> dict[str, Any]:
    """Best of 3 FastDecoder batch-1 runs (compile and graph capture excluded), against the roofline."""
    from glmkit.fast_decode import FastDecoder

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # a layer that did not compile says so here
        warnings.simplefilter("always")
        decoder = FastDecoder(model, max_len=PROMPT + NEW_TOKENS + 8, **options)
        decoder.tokens_per_second(PROMPT, 8)
    setup = time.perf_counter() - t0
    runs = [decoder.tokens_per_second(PROMPT, NEW_TOKENS)["decode_tok_s"] for _ in range(3)]
    roofline = bandwidth / token_bytes(model)
    label += "" if label.endswith("layers)") else (", compiled" if decoder.compiled else ", eager layers")
    row = {"path": label, "gemv": decoder.gemv, "compiled": decoder.compiled, "setup_s": setup,
           "decode_tok_s": runs, "best_tok_s": max(runs), "roofline_tok_s": roofline,
           "fraction_of_roofline": max(runs) / roofline,
           "warnings": [f"{w.category.__name__}: {w.message!s:.400}" for w in caught
                        if issubclass(w.category, RuntimeWarning)], "_logits": forced_logits(decoder)}
    print({k: v for k, v in row.items() if not k.startswith("_")}, flush=True)
    del decoder
    torch.cuda.empty_cache()
    return row




def fp32_references(checkpoint: str, nf4_model: torch.nn.Module, device: str = "cuda:0") -> dict[str, torch.Tensor]:
    """Teacher-forced logits of fp32 decoders (cuBLAS, TF32 off): the checkpoint in fp32, then the same model with
    every quantized weight replaced by its nf4 dequantization in fp32 (everything else is the checkpoint's)."""
    from glmkit.fast_decode import FastDecoder
    from glmkit.loading import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(checkpoint, dtype=torch.float32, device_map=device)
    out = {}
    for label in ("bf16_model", "nf4_weights"):
        if label == "nf4_weights":
            with torch.no_grad():
                for name, module in nf4_model.named_modules():
                    if getattr(getattr(module, "weight", None), "quant_state", None) is not None:
                        w = Packed4bit.from_bnb(module.weight).dequantize(torch.float32)
                        model.get_submodule(name).weight.copy_(w)
        decoder = FastDecoder(model, max_len=PROMPT + FORCED + 8, gemv=False, compile=False)
        out[label] = forced_logits(decoder)
        del decoder
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def earlier_projections(device: str) -> dict[str, Any]:
    """A run without the projections stage keeps the per-projection table of the last run on the same card
    (benchmarks/results/nf4_gemv.json), marked with that run's date, so that the file stays complete."""
    path = RESULTS_DIR / "nf4_gemv.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("device") != device or not old.get("projections"):
        return {}
    keep = ("projections", "total_us_by_lookup", "lookup_for_decode", "table_written")
    return {**{k: old[k] for k in keep if k in old},
            "projections_from_earlier_run": old.get("environment", {}).get("date", "unknown date")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--sweep", choices=("quick", "full", "none"), default="quick",
                    help="launch shapes tried per projection: 8 (quick), ~33 (full, as glmkit tune), none")
    ap.add_argument("--stages", default="projections,decode,accuracy")
    ap.add_argument("--write-table", help="also write the best shapes as a launch-shape table for this card here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("nf4_gemv.py measures a GPU; this machine has none.")
    import bitsandbytes  # noqa: F401  fail now, not after the first stage

    from glmkit.quantization import load_precision

    stages = args.stages.split(",")
    bw = copy_bandwidth()
    result: dict[str, Any] = {
        "method": "projections: batch 1 in CUDA graphs over ~1 GiB of weight copies, random N(0, 0.02) bf16 weights "
                  "quantized by bitsandbytes; errors against float64 on the fp32-dequantized weights. decode: "
                  f"{PROMPT}-token prompt, {NEW_TOKENS} new tokens, best of 3; roofline = copy bandwidth / bytes a "
                  f"token reads. accuracy: {FORCED} teacher-forced steps against fp32 decoders on the same weights",
        "copy_bandwidth_bytes_s": bw, "device": device_name(),
        "tuned_shapes_for_this_card_before": len(tables_for(device_name())), "errors": []}

    stage = stage_runner("nf4_gemv", result)

    if "projections" in stages:
        table = stage("projections", projection_table, bw, args.sweep) or {"rows": []}
        result["projections"] = table.pop("rows")
        result |= table
        if args.write_table and table_entries(result["projections"]):
            path = write_table(table_entries(result["projections"]), args.write_table,
                               source="benchmarks/nf4_gemv.py")
            result["table_written"] = str(path)
        save_result("nf4_gemv", result)
    else:
        result |= earlier_projections(result["device"])
    if not {"decode", "accuracy"} & set(stages):
        return
    ensure_random_checkpoint(args.checkpoint)
    models = {p: load_precision(args.checkpoint, p, device_map="cuda:0") for p in ("bf16", "nf4", "fp16")}
    result["nf4_token_bytes"], result["bf16_token_bytes"] = token_bytes(models["nf4"]), token_bytes(models["bf16"])
    runs = {"bf16": ("bf16", "bf16 fast (Triton)", dict(gemv="triton")),
            "nf4_triton": ("nf4", "nf4 fast (glmkit Triton)", dict(gemv="triton")),  # compiled (the default)
            "nf4_triton_eager": ("nf4", "nf4 fast (glmkit Triton, eager layers)", dict(gemv="triton", compile=False)),
            "nf4_bnb": ("nf4", "nf4 fast (bnb matmul_4bit, eager layers)", dict(gemv=False, compile=False)),
            "fp16": ("fp16", "fp16 fast (Triton)", dict(gemv="triton"))}
    result["lookup_used_by_nf4_decoder"] = {f"{n}x{k}": lk for (kernel, n, k), lk in tuned_lookups().items()
                                            if kernel == "nf4"} or gemv4bit.LOOKUP
    rows = {key: stage(key, decode_speed, models[m], label, bw, **opts) for key, (m, label, opts) in runs.items()}
    result["decode"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows.values() if r]
    if rows["nf4_triton"] and rows["bf16"]:
        result["nf4_over_bf16_fast"] = rows["nf4_triton"]["best_tok_s"] / rows["bf16"]["best_tok_s"]
    if rows["fp16"] and rows["bf16"]:
        result["fp16_over_bf16_fast"] = rows["fp16"]["best_tok_s"] / rows["bf16"]["best_tok_s"]
    if rows["nf4_triton"] and rows["nf4_triton_eager"]:
        result["nf4_compiled_over_eager_layers"] = rows["nf4_triton"]["best_tok_s"] / rows["nf4_triton_eager"]["best_tok_s"]
    if rows["nf4_triton"] and rows["nf4_bnb"]:
        result["nf4_triton_over_bnb"] = rows["nf4_triton"]["best_tok_s"] / rows["nf4_bnb"]["best_tok_s"]
        result["nf4_triton_vs_bnb"] = compare(rows["nf4_triton"]["_logits"], rows["nf4_bnb"]["_logits"])
    save_result("nf4_gemv", result)
    if "accuracy" in stages:
        del models["bf16"], models["fp16"]
        gc.collect()
        torch.cuda.empty_cache()
        refs = stage("fp32 references", fp32_references, args.checkpoint, models["nf4"])
        if refs:
            result["accuracy"] = {
                key: compare(rows[key]["_logits"], refs["nf4_weights" if key.startswith("nf4") else "bf16_model"])
                for key in runs if rows[key]}
            result["accuracy"]["note"] = ("each decoder against an fp32 decoder on the same weights: bf16 and fp16 "
                                          "against the checkpoint in fp32, the nf4 paths against the nf4 weights in "
                                          "fp32")
    save_result("nf4_gemv", result)
    print({k: v for k, v in result.items() if k != "projections"}, flush=True)


if __name__ == "__main__":
    main()
