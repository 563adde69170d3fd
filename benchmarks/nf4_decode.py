"""GLM-4-9B decode speed per precision at batch 1, in one process: bf16 / fp16 / nf4 through glmkit's fast path
(each with its default options) against each precision's roofline, nf4 through plain generate() (bitsandbytes), a
per-projection bandwidth table (nf4 through glmkit's default kernel and its Triton kernel vs bitsandbytes'
matmul_4bit vs bf16), nf4 fast decode at a 32K context on a card capped at 12 GiB, and each fast path's logits over
16 prompts of 16 teacher-forced steps against an fp32 decoder on the same weights (for nf4: its weights dequantized in fp32,
with bf16 arithmetic on those weights beside it as the yardstick, through bf16's fast path and through cuBLAS: two
bf16 paths, whose difference shows how far one bf16 rounding's error lies from another's). The nf4 decoder runs twice
where its batch-1 CUDA kernel multiplies: with its default fp16 products and with bf16 products (as it did before),
in the decode and accuracy stages.

Each roofline: the copy bandwidth measured in this run / the bytes one token reads (every weight, quantization
states included, one embedding row). Random weights of the exact GLM-4-9B architecture
(``glmkit.models.ensure_random_checkpoint``).

    python benchmarks/nf4_decode.py --checkpoint /tmp/glm9b      # about 6 minutes on an H200
    ... --stages long_context,accuracy --name nf4_decode_run2       # the accuracy stage builds its decoders itself
Writes benchmarks/results/nf4_decode.json (or --name; and to $OUT) after every stage, so a stage that fails keeps the
others.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from nf4_fused import gpu_uuids, kernel_env, mlp_kernel, products

from glmkit.bench import copy_bandwidth, save_result, stage_runner
from glmkit.env import use_expandable_segments
from glmkit.gemv import device_name, gemv, gemv_swiglu, tables_for
from glmkit.models import ensure_random_checkpoint
from glmkit.results import (
    ACCURACY_YARDSTICK,
    ACCURACY_YARDSTICK_CUBLAS,
    BF16_CUBLAS_PATH,
    NF4_BF16_PRODUCTS_PATH,
    NF4_DEFAULT_PATH,
    NF4_TRITON_PATH,
)

NEW_TOKENS = 256  # a cache of 32 + 256 + 8 positions, as the step benchmarks (max_len_sweep.py: speed by cache length)
PROMPT = 32
FORCED = 16  # teacher-forced steps a prompt whose logits each decoder's are compared on
PROMPTS = 16  # random prompts, each followed by its FORCED tokens (256 steps: each prompt's steps share its cache's errors)
# the fast paths' labels: each decoder with its default options (bf16/fp16: glmkit's kernels, on Hopper its MLP as
# one CUDA kernel; nf4: glmkit's batch-1 4-bit CUDA kernel where it runs)
# (nf4's label, and the yardstick's in the accuracy stage, are those glmkit.results reads the run by)
BF16_FAST, FP16_FAST = "bf16 fast (glmkit kernels)", "fp16 fast (glmkit kernels)"


def token_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every tensor the model holds (4-bit states included) but one embedding row."""
    from glmkit.quantization import model_tensor_bytes

    emb = model.get_input_embeddings().weight
    return model_tensor_bytes(model) - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def forced_logits(decoder: Any) -> torch.Tensor:
    """Logits [PROMPTS * FORCED, vocab] (fp32) of the same prompts and the same next tokens for every decoder."""
    steps = []
    for seed in range(PROMPTS):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 1000, (1, PROMPT + FORCED), generator=g).to(decoder.device)
        decoder.prefill(ids[:, :PROMPT])
        steps += [decoder.decode_step(ids[0, PROMPT + t:PROMPT + t + 1], PROMPT + t)[0].to(torch.float32, copy=True)
                  for t in range(FORCED)]  # each step's logits copied: the decoder's buffer is reused
    return torch.stack(steps)


def forced_only(model: torch.nn.Module, label: str, kernel_4bit: str | None = None, f16_products: bool = True,
                **options: Any) -> dict:
    """A fast path's teacher-forced logits alone (the accuracy stage run without the decode stage's timing);
    ``kernel_4bit="triton"``: with glmkit's batch-1 4-bit CUDA kernel switched off (``GLMKIT_4BIT_KERNEL``), its
    Triton kernel in its place; ``f16_products=False``: that CUDA kernel multiplying in bf16, as it did before."""
    from glmkit.fast_decode import FastDecoder

    with kernel_env(kernel_4bit), products(f16_products):
        decoder = FastDecoder(model, max_len=PROMPT + NEW_TOKENS + 8, **options)
        row = {"path": label, "_forced": forced_logits(decoder)}
    del decoder
    torch.cuda.empty_cache()
    return row


def compare(logits: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Per-step relative L2 error of the logits against ``ref`` (each step's, in order, and their summary) and how
    many greedy tokens agree."""
    steps = [((a.double() - r.double()).norm() / r.double().norm()).item() for a, r in zip(logits, ref)]
    errs = sorted(steps)
    return {"rel_err_steps": steps, "rel_err_median": errs[len(errs) // 2], "rel_err_mean": sum(errs) / len(errs),
            "rel_err_quartiles": [errs[len(errs) // 4], errs[3 * len(errs) // 4]], "rel_err_max": errs[-1],
            "argmax_equal": int((logits.argmax(-1) == ref.argmax(-1)).sum()), "steps": len(errs)}


def fast_decode(model: torch.nn.Module, label: str, f16_products: bool = True, **options) -> dict:
    """Best of 3 runs of FastDecoder's batch-1 decode (compile and graph capture excluded); ``f16_products=False``:
    glmkit's batch-1 4-bit CUDA kernel multiplying in bf16 (``products``)."""
    from glmkit.fast_decode import FastDecoder

    t0 = time.perf_counter()
    with products(f16_products):  # (the whole run: the decoder captures its graphs at its first steps)
        decoder = FastDecoder(model, max_len=PROMPT + NEW_TOKENS + 8, **options)
        decoder.tokens_per_second(PROMPT, 8)
        setup = time.perf_counter() - t0
        runs = [decoder.tokens_per_second(PROMPT, NEW_TOKENS)["decode_tok_s"] for _ in range(3)]
        ids = torch.randint(0, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0)).cuda()
        decoder.prefill(ids)
        logits = decoder.decode_step(ids[:, -1], PROMPT).clone()  # the same token and cache for every decoder
        tokens = decoder.generate(ids, 64, ignore_eos=True)[0, PROMPT:].tolist()
        forced = forced_logits(decoder)
    row = {"path": label, "options": {k: v for k, v in options.items() if isinstance(v, (bool, str, int))},
           "f16_products": f16_products,
           "gemv": decoder.gemv, "compiled": decoder.compiled, "mlp_kernel": mlp_kernel(decoder), "setup_s": setup,
           "decode_tok_s": runs, "best_tok_s": max(runs)}
    print(row, flush=True)
    del decoder
    torch.cuda.empty_cache()
    return {**row, "_logits": logits, "_tokens": tokens, "_forced": forced}


def generate_speed(model: torch.nn.Module) -> dict:
    """Plain generate() at batch 1, steady state (second call), tok/s."""
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=64, min_new_tokens=64, **kw)
    torch.cuda.synchronize()
    return {"path": "generate() (bitsandbytes)", "best_tok_s": 64 / (time.perf_counter() - t0)}


def projection_table(model16: torch.nn.Module, model4: torch.nn.Module) -> list[dict]:
    """Per projection of layer 0, one token in a CUDA graph over ~1 GiB of copies: nf4 through glmkit's default (its
    batch-1 CUDA kernel where it runs) and its Triton kernel vs bitsandbytes' matmul_4bit (packed bytes read per
    second) vs bf16 F.linear and glmkit's bf16 Triton kernel."""
    from glmkit.gemv4bit import Packed4bit, _takes_one, gemv_4bit, gemv_4bit_swiglu, linear_4bit, pick_config_4bit
    from glmkit.gemv_tuning import graph_time

    rows = []
    l16, l4 = model16.model.layers[0], model4.model.layers[0]
    for name, m16, m4, swiglu in (("q_proj", l16.self_attn.q_proj, l4.self_attn.q_proj, False),
                                  ("o_proj", l16.self_attn.o_proj, l4.self_attn.o_proj, False),
                                  ("gate_up", l16.mlp.gate_up_proj, l4.mlp.gate_up_proj, True),
                                  ("down_proj", l16.mlp.down_proj, l4.mlp.down_proj, False)):
        w16 = m16.weight.detach()
        p = Packed4bit.from_bnb(m4.weight)
        n, k = w16.shape
        copies = max(2, 2**30 // (n * k // 2))
        ps = [p] + [Packed4bit.from_state(p.data.clone(), p.quant_state) for _ in range(copies - 1)]
        copies16 = max(2, 2**30 // (n * k * 2))
        ws = [w16] + [w16.clone() for _ in range(copies16 - 1)]
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)

        def act(y):
            gate, up = y.chunk(2, dim=-1)
            return up * F.silu(gate)

        cfg = pick_config_4bit(n // 2 if swiglu else n, k, p.blocksize, "nf4", swiglu=swiglu)  # a shape: Triton

        def nf4_glmkit(i, x=x, ps=ps, swiglu=swiglu):  # glmkit's default for one token (its CUDA kernel where it runs)
            return gemv_4bit_swiglu(x, ps[i]) if swiglu else gemv_4bit(x, ps[i])

        def nf4_triton(i, x=x, ps=ps, swiglu=swiglu, cfg=cfg):
            return gemv_4bit_swiglu(x, ps[i], config=cfg) if swiglu else gemv_4bit(x, ps[i], config=cfg)

        def nf4_bnb(i, x=x, ps=ps, swiglu=swiglu):
            return act(linear_4bit(x, ps[i])) if swiglu else linear_4bit(x, ps[i])

        def bf16_cublas(i, x=x, ws=ws, swiglu=swiglu):
            return act(F.linear(x, ws[i])) if swiglu else F.linear(x, ws[i])

        def bf16_triton(i, x=x, ws=ws, swiglu=swiglu):
            return gemv_swiglu(x, ws[i]) if swiglu else gemv(x, ws[i])

        nf4_glmkit(0)  # eagerly first: compiles the kernels and runs their first-run checks outside the capture
        times = {"nf4_glmkit": graph_time(nf4_glmkit, copies), "nf4_triton": graph_time(nf4_triton, copies),
                 "nf4_bnb_matmul_4bit": graph_time(nf4_bnb, copies),
                 "bf16_cublas": graph_time(bf16_cublas, copies16), "bf16_triton": graph_time(bf16_triton, copies16)}
        packed = n * k // 2 + p.absmax.numel() * p.absmax.element_size()
        row = {"projection": name, "rows": n, "columns": k, "nf4_bytes": packed, "bf16_bytes": n * k * 2,
               "nf4_config": cfg.__dict__, "nf4_glmkit_kernel": "CUDA" if _takes_one(x, (p,), swiglu) else "Triton"}
        for key, t in times.items():
            row[f"{key}_us"] = t * 1e6
            row[f"{key}_tb_s"] = (packed if key.startswith("nf4") else n * k * 2) / t / 1e12
        rows.append(row)
        print(row, flush=True)
        del ps, ws, nf4_glmkit, nf4_triton, nf4_bnb, bf16_cublas, bf16_triton
        torch.cuda.empty_cache()
    return rows


def long_context(checkpoint: str, context: int, cap_gib: float, chunk: int) -> dict:
    """nf4 FastDecoder with a ``context``-token prompt under a ``cap_gib`` allocator cap, against the planner."""
    from transformers import AutoConfig

    from glmkit.fast_decode import FastDecoder
    from glmkit.planning import plan_memory
    from glmkit.quantization import load_precision

    total = torch.cuda.get_device_properties(0).total_memory
    budget = int(cap_gib * 2**30)
    before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()  # what the process held already
    torch.cuda.set_per_process_memory_fraction(budget / total, 0)
    torch.cuda.reset_peak_memory_stats()
    config = AutoConfig.from_pretrained(checkpoint)
    plan = plan_memory(config, [budget], dtype=torch.bfloat16, quantization="nf4", context_len=context + 64,
                       prefill_chunk=chunk, cuda_context=0, fast_decode=True)
    row = {"context": context, "cap_gib": cap_gib, "prefill_chunk": chunk, "planned_bytes": plan.devices[0].total,
           "planned_fits": plan.fits, "planned_for": "FastDecoder (fast_decode=True)", "allocator": plan.allocator}
    model = load_precision(checkpoint, "nf4", device_map="cuda:0")
    try:
        decoder = FastDecoder(model, max_len=context + 64)
        ids = torch.randint(0, 1000, (1, context), device="cuda")
        t0 = time.perf_counter()
        it = decoder.stream(ids, 33, ignore_eos=True, prefill_chunk=chunk)
        next(it)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        count = sum(1 for _ in it)
        torch.cuda.synchronize()
        row |= {"ok": True, "prefill_s": t1 - t0, "decode_tok_s": count / (time.perf_counter() - t1)}
    except torch.OutOfMemoryError as exc:
        row |= {"ok": False, "error": str(exc)[:300]}
    row |= {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
            "allocated_before": before[0], "reserved_before": before[1]}
    row["peak_within_plan"] = row["peak_reserved"] <= row["planned_bytes"]
    print(row, flush=True)
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    return row


def put_nf4_weights(model: torch.nn.Module, nf4_model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (the same checkpoint in 16 or 32 bits) with every weight that ``nf4_model`` holds in 4 bits replaced
    by its nf4 dequantization in fp32 (``code * absmax``), rounded to ``model``'s dtype as it is copied."""
    from glmkit.gemv4bit import Packed4bit, is_4bit

    with torch.no_grad():
        for name, module in nf4_model.named_modules():
            if is_4bit(getattr(module, "weight", None)):
                w = Packed4bit.from_bnb(module.weight).dequantize(torch.float32)
                model.get_submodule(name).weight.copy_(w)
    return model


def accuracy(checkpoint: str, nf4_model: torch.nn.Module, decoded: dict[str, torch.Tensor]) -> dict:
    """Each decoder's teacher-forced logits (``decoded``: path -> ``forced_logits``) against an fp32 decoder (cuBLAS,
    TF32 off) on the same weights: the checkpoint in fp32 for bf16 and fp16; for nf4 the checkpoint with every
    quantized weight replaced by its nf4 dequantization in fp32. Beside them the yardstick on the nf4 weights: those
    weights in bf16 through bf16's fast path (what bf16 arithmetic alone costs on them), and through cuBLAS in eager
    layers (bf16 arithmetic in another order: how far two bf16 paths' errors lie apart)."""
    from glmkit.fast_decode import FastDecoder
    from glmkit.gemv4bit import is_4bit
    from glmkit.loading import load_model
    from glmkit.quantization import load_precision

    def logits_of(model: torch.nn.Module, **options: Any) -> torch.Tensor:
        decoder = FastDecoder(model, max_len=PROMPT + FORCED + 8, **options)
        out = forced_logits(decoder)
        del decoder
        torch.cuda.empty_cache()
        return out

    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = load_model(checkpoint, dtype=torch.float32, device_map="cuda:0")
    ref_checkpoint = logits_of(fp32, gemv=False, compile=False)
    put_nf4_weights(fp32, nf4_model)
    ref_nf4 = logits_of(fp32, gemv=False, compile=False)
    del fp32
    gc.collect()
    torch.cuda.empty_cache()
    bf16 = load_precision(checkpoint, "bf16", device_map="cuda:0")
    put_nf4_weights(bf16, nf4_model)
    yardstick = logits_of(bf16)  # bf16's default fast path
    yardstick_cublas = logits_of(bf16, gemv=False, compile=False)
    del bf16
    gc.collect()
    torch.cuda.empty_cache()
    rows = {path: {"against": "nf4 weights in fp32" if path.startswith("nf4") else "checkpoint in fp32",
                   **compare(logits, ref_nf4 if path.startswith("nf4") else ref_checkpoint)}
            for path, logits in decoded.items()}
    rows[ACCURACY_YARDSTICK] = {"against": "nf4 weights in fp32", **compare(yardstick, ref_nf4)}
    rows[ACCURACY_YARDSTICK_CUBLAS] = {"against": "nf4 weights in fp32", **compare(yardstick_cublas, ref_nf4)}
    print(rows, flush=True)
    quantized = sum(is_4bit(getattr(m, "weight", None)) for m in nf4_model.modules())
    return {"forced_steps": FORCED, "quantized_weights": quantized, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--cap-gib", type=float, default=12.0)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--stages", default="long_context,decode,projections,accuracy")
    ap.add_argument("--name", default="nf4_decode", help="the result's name (another run beside the committed one)")
    args = ap.parse_args()
    if os.environ.get("GLMKIT_4BIT_KERNEL") and {"decode", "accuracy"} & set(args.stages.split(",")):
        raise SystemExit("GLMKIT_4BIT_KERNEL is set: the decode and accuracy stages' rows name glmkit's default 4-bit "
                         "kernel. Unset it (the accuracy stage runs the Triton kernel's row itself), or run --stages "
                         "long_context.")
    use_expandable_segments()  # the allocator glmkit's processes use (and the planner assumes), before any CUDA memory
    if not torch.cuda.is_available():
        raise SystemExit("nf4_decode.py measures a GPU; this machine has none.")
    import bitsandbytes  # noqa: F401  fail now, not after loading the bf16 model

    from glmkit.quantization import load_precision

    stages = args.stages.split(",")
    ensure_random_checkpoint(args.checkpoint)
    bw = copy_bandwidth()
    result: dict = {"method": f"batch 1, {PROMPT}-token prompt, {NEW_TOKENS} new tokens, best of 3 runs; roofline = "
                              "copy bandwidth / bytes read per token (quantization states included)",
                    "copy_bandwidth_bytes_s": bw, "device": device_name(), "gpu_uuids": gpu_uuids(),
                    "tuned_shapes_for_this_card": len(tables_for(device_name())), "decode": [], "errors": []}

    stage = stage_runner(args.name, result)

    def decode(name, model, label, **options):
        row = stage(name, generate_speed, model) if label is None else stage(name, fast_decode, model, label, **options)
        if row:
            row["roofline_tok_s"] = bw / token_bytes(model)
            row["fraction_of_roofline"] = row["best_tok_s"] / row["roofline_tok_s"]
            result["decode"].append({k: v for k, v in row.items() if not k.startswith("_")})
        return row

    if "long_context" in stages:  # first, while the process holds nothing else (the peak is the decoder's alone)
        torch.cuda.empty_cache()
        result["long_context"] = stage("long context", long_context, args.checkpoint, args.context, args.cap_gib,
                                       args.chunk)
        save_result(args.name, result)  # stage() saved before the assignment
        gc.collect()
        torch.cuda.empty_cache()
    models = {"bf16": load_precision(args.checkpoint, "bf16", device_map="cuda:0"),
              "nf4": load_precision(args.checkpoint, "nf4", device_map="cuda:0")}
    result["nf4_model_bytes"] = token_bytes(models["nf4"])
    forced: dict[str, torch.Tensor] = {}  # path -> teacher-forced logits, for the accuracy stage
    if "accuracy" in stages and "decode" not in stages:  # each default fast path's logits, untimed
        forced |= {row["path"]: row["_forced"] for row in (
            stage("bf16 logits", forced_only, models["bf16"], BF16_FAST),
            stage("nf4 logits", forced_only, models["nf4"], NF4_DEFAULT_PATH),
            stage("nf4 bnb logits", forced_only, models["nf4"], "nf4 fast (bnb matmul_4bit, eager layers)", gemv=False,
                  compile=False)) if row}
    if "accuracy" in stages:  # bf16 through cuBLAS; the nf4 decoder with the CUDA kernel switched off
        cublas = stage("bf16 cuBLAS logits", forced_only, models["bf16"], BF16_CUBLAS_PATH, gemv=False, compile=False)
        if cublas:
            forced[cublas["path"]] = cublas["_forced"]
        triton = stage("nf4 Triton logits", forced_only, models["nf4"], NF4_TRITON_PATH, kernel_4bit="triton")
        if triton:
            forced[triton["path"]] = triton["_forced"]
        if "decode" not in stages:  # and with the CUDA kernel's bf16 products
            bf16_products = stage("nf4 bf16-products logits", forced_only, models["nf4"], NF4_BF16_PRODUCTS_PATH,
                                  f16_products=False)
            if bf16_products:
                forced[bf16_products["path"]] = bf16_products["_forced"]
    if "decode" in stages:
        bf16 = decode("bf16 fast", models["bf16"], BF16_FAST)  # each decoder as a user gets it: default options
        nf4 = decode("nf4 fast", models["nf4"], NF4_DEFAULT_PATH)
        bf16_products = decode("nf4 fast, bf16 products", models["nf4"], NF4_BF16_PRODUCTS_PATH, f16_products=False)
        ref = decode("nf4 fast bnb", models["nf4"], "nf4 fast (bnb matmul_4bit, eager layers)", gemv=False,
                     compile=False)  # the reference for the logits; bitsandbytes' ops are not compiled
        decode("nf4 generate", models["nf4"], None)
        forced |= {row["path"]: row["_forced"] for row in (bf16, nf4, bf16_products, ref) if row}
        if nf4 and ref:
            a, b = nf4["_logits"].double(), ref["_logits"].double()
            result["nf4_triton_vs_bnb_logits_rel_diff"] = ((a - b).norm() / b.norm()).item()
            result["nf4_triton_vs_bnb_greedy_equal_of_64"] = sum(x == y for x, y in zip(nf4["_tokens"], ref["_tokens"]))
        if nf4 and bf16:
            result["nf4_over_bf16_fast"] = nf4["best_tok_s"] / bf16["best_tok_s"]
        if nf4 and bf16_products:
            result["f16_over_bf16_products"] = nf4["best_tok_s"] / bf16_products["best_tok_s"]
    if "projections" in stages:
        result["projections"] = stage("projections", projection_table, models["bf16"], models["nf4"])
    del models["bf16"]
    gc.collect()
    torch.cuda.empty_cache()
    if "decode" in stages:
        models["fp16"] = load_precision(args.checkpoint, "fp16", device_map="cuda:0")
        fp16 = decode("fp16 fast", models["fp16"], FP16_FAST)
        if fp16:
            forced[fp16["path"]] = fp16["_forced"]
        del models["fp16"]
        gc.collect()
        torch.cuda.empty_cache()
    elif "accuracy" in stages:
        fp16 = stage("fp16 logits", forced_only, load_precision(args.checkpoint, "fp16", device_map="cuda:0"), FP16_FAST)
        if fp16:
            forced[fp16["path"]] = fp16["_forced"]
        gc.collect()
        torch.cuda.empty_cache()
    if "accuracy" in stages and forced:
        result["accuracy"] = stage("accuracy", accuracy, args.checkpoint, models["nf4"], forced)
    models.clear()
    save_result(args.name, result)  # stage() saved before the last row was added
    print({k: v for k, v in result.items() if k not in ("projections",)}, flush=True)


if __name__ == "__main__":
    main()
