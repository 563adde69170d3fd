"""Quick GPU check of the 4-bit fast path (about a minute on an H200): glmkit's 4-bit kernel with each nibble
lookup against float64 at GLM-4-9B's width, then the trained tiny model in bitsandbytes nf4, nf4 with double
quantization and fp4 through the default decoder (``gemv="auto"``: glmkit's 4-bit ops inside the compiled layer,
each step a CUDA graph) against the same model's ``generate()``, nf4 once more with the "pair" lookup, two rows of
different prompts through the 4-bit kernels against each row's ``generate()`` (the CUDA tensor-core kernel,
``glmkit.gemv4bit_mma``: its first-run check comes with that decoder's warm-up, none before), eight rows, then the
CUDA kernel against float64 and the Triton kernels at 2-8 vectors. Prints
one line per check, with any warning (a layer that did not compile, kernels that failed). Also run by
``gpu_smoke_fast.py``.

    PYTHONPATH=. python benchmarks/gpu_smoke_4bit.py
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from nf4_gemv import _rel
from nf4_mma import _reference

from glmkit import gemv4bit
from glmkit.fast_decode import FastDecoder
from glmkit.gemv import pdl_supported
from glmkit.models import TRAINED_TINY_DIR
from glmkit.quantization import load_precision


def check_lookups() -> None:
    """Each lookup (the interpreter runs neither the warp shuffle nor the GPU's PTX loads) against float64."""
    for lookup in gemv4bit.LOOKUPS:
        for double_quant in (False, True):
            w = gemv4bit.quantize(torch.randn(512, 4096, device="cuda") * 0.02, "nf4", double_quant)
            x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.double(), w.dequantize(torch.float32).double())
            try:
                y = gemv4bit.gemv_4bit(x, w, lookup=lookup).double()
                print("4-bit lookup", lookup, "double quant" if double_quant else "plain", "rel err vs float64:",
                      f"{((y - ref).norm() / ref.norm()).item():.2e}", flush=True)
            except Exception as exc:
                print("4-bit lookup", lookup, "FAILED", type(exc).__name__, str(exc)[:500], flush=True)


def check_decoders(prompt: torch.Tensor, new_tokens: int = 24) -> None:
    """The default decoder on the trained tiny model in 4 bits against its generate(); nf4 also with programmatic
    dependent launch (``pdl=True``) where the GPU has it."""
    default = gemv4bit.LOOKUP
    n = prompt.shape[1]
    pdl = [("nf4", None, True)] if pdl_supported("cuda:0") else []
    for precision, lookup, pdl_on in [("nf4", None, None), ("nf4-dq", None, None), ("fp4", None, None),
                                      ("nf4", "pair", None), *pdl]:
        gemv4bit.LOOKUP = lookup or default
        try:
            model = load_precision(TRAINED_TINY_DIR, precision, device_map="cuda:0")
            want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dec = FastDecoder(model, max_len=n + new_tokens + 8, pdl=pdl_on)
                got = dec.generate(prompt, new_tokens, ignore_eos=True)
            agree = sum(a == b for a, b in zip(got[0, n:].tolist(), want[0, n:].tolist()))
            print("4-bit", precision, "lookup", gemv4bit.LOOKUP, "gemv", dec.gemv, "compiled", dec.compiled,
                  "norms folded", dec.fuses_norms(1), "PDL", dec.uses_pdl(1),
                  "graphs", sorted(dec.stages[0].graphs), "identical:", torch.equal(got, want),
                  f"({agree}/{new_tokens} tokens)", "warnings:",
                  [str(w.message)[:300] for w in caught if issubclass(w.category, RuntimeWarning)], flush=True)
        except Exception as exc:
            print("4-bit", precision, "FAILED", type(exc).__name__, str(exc)[:500], flush=True)
        finally:
            gemv4bit.LOOKUP = default


def check_batch(prompt: torch.Tensor, new_tokens: int = 16) -> None:
    """Two rows through glmkit's 4-bit kernels (a program per row, the default up to FOUR_BIT_MAX_BATCH), compiled,
    in CUDA graphs: each row's tokens against generate() of that row alone."""
    try:
        model = load_precision(TRAINED_TINY_DIR, "nf4", device_map="cuda:0")
        other = torch.cat([prompt[:, :1], prompt[:, 1:].flip(1)], dim=1)
        dec = FastDecoder(model, max_len=prompt.shape[1] + new_tokens + 8, batch_size=2)
        got = dec.generate(torch.cat([prompt, other]), new_tokens, ignore_eos=True)
        wants = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False) for p in (prompt, other)]
        alone = [FastDecoder(model, max_len=prompt.shape[1] + new_tokens + 8).generate(p, new_tokens, ignore_eos=True)
                 for p in (prompt, other)]
        n = prompt.shape[1]
        print("4-bit nf4 batch 2 gemv", dec.gemv_by_bucket, "kernel", gemv4bit.kernel_for_rows("cuda", 2),
              "compiled", dec.compiled, "rows identical to generate():",
              [torch.equal(got[i:i + 1], w) for i, w in enumerate(wants)], "tokens agreeing with generate():",
              [int((got[i, n:] == w[0, n:]).sum()) for i, w in enumerate(wants)], "with the batch-1 decoder:",
              [int((got[i, n:] == a[0, n:]).sum()) for i, a in enumerate(alone)], f"of {new_tokens}", flush=True)
        bf16 = load_precision(TRAINED_TINY_DIR, "bf16", device_map="cuda:0")  # the same two rows, 16-bit, cuBLAS
        got16 = FastDecoder(bf16, max_len=prompt.shape[1] + new_tokens + 8, batch_size=2).generate(
            torch.cat([prompt, other]), new_tokens, ignore_eos=True)
        wants16 = [bf16.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False) for p in (prompt, other)]
        print("bf16 batch 2 (for comparison) tokens agreeing with generate():",
              [int((got16[i, n:] == w[0, n:]).sum()) for i, w in enumerate(wants16)], f"of {new_tokens}", flush=True)
    except Exception as exc:
        print("4-bit nf4 batch 2 FAILED", type(exc).__name__, str(exc)[:500], flush=True)


def check_tensor_cores(prompt: torch.Tensor, new_tokens: int = 16) -> None:
    """More than ROW_KERNEL_MAX_VECTORS vectors (5: the CUDA tensor-core kernel; 16 and 64: the Triton one, compiled
    for this GPU) against the per-vector kernel, one vector at a time: nf4/fp4 with and without double
    quantization, bf16/fp16, plain, q/k/v in one launch and SwiGLU, at GLM-4-9B's widths; then 8 rows through the
    default decoder (compiled, CUDA graphs: the CUDA kernel) against each row decoded alone."""
    g = torch.Generator("cuda").manual_seed(0)
    try:
        worst = 0.0
        for quant_type in ("nf4", "fp4"):
            for double_quant in (False, True):
                ws = [gemv4bit.quantize(torch.randn(n, 4096, device="cuda", generator=g) * 0.02, quant_type,
                                        double_quant) for n in (4096, 256, 256)]
                for dtype in (torch.bfloat16, torch.float16):
                    for b in (5, 16, 64):
                        x = torch.randn(b, 1, 4096, device="cuda", generator=g).to(dtype)
                        for weights, swiglu in ((ws[:1], False), (ws, False), (ws[:1], True)):
                            y = gemv4bit._launch(x, tuple(weights), None, swiglu, None).float()
                            alone = torch.cat([gemv4bit._launch(x[i:i + 1], tuple(weights), None, swiglu, None)
                                               for i in range(b)]).float()
                            worst = max(worst, ((y - alone).norm() / alone.norm()).item())
        print("4-bit tensor cores: largest rel diff to the per-vector kernel over 72 launches", f"{worst:.2e}",
              flush=True)
        model = load_precision(TRAINED_TINY_DIR, "nf4", device_map="cuda:0")
        rows = torch.cat([prompt, torch.randint(0, 800, (7, prompt.shape[1]), device="cuda", generator=g)])
        n = prompt.shape[1]
        dec = FastDecoder(model, max_len=n + new_tokens + 8, batch_size=8)
        got = dec.generate(rows, new_tokens, ignore_eos=True)
        one = FastDecoder(model, max_len=n + new_tokens + 8)
        alone = [one.generate(rows[i:i + 1], new_tokens, ignore_eos=True) for i in range(8)]
        print("4-bit nf4 batch 8 gemv", dec.gemv_by_bucket, "compiled", dec.compiled, "tokens agreeing with each row "
              "alone:", [int((got[i, n:] == a[0, n:]).sum()) for i, a in enumerate(alone)], f"of {new_tokens}",
              flush=True)
    except Exception as exc:
        print("4-bit tensor cores FAILED", type(exc).__name__, str(exc)[:500], flush=True)


def check_mma() -> None:
    """2-8 vectors through the CUDA tensor-core kernel (``glmkit.gemv4bit_mma``, what ``gemv_4bit`` runs there)
    against float64 on the fp32-dequantized weights and against the Triton kernels: nf4/fp4, with and without double
    quantization, bf16/fp16, one weight, q/k/v with a bias and SwiGLU at GLM-4-9B's widths."""
    print("4-bit CUDA kernel passed its first-run check on this GPU:", gemv4bit.check_mma("cuda"), flush=True)
    g = torch.Generator("cuda").manual_seed(0)
    worst, worst_triton, launches = 0.0, 0.0, 0
    try:
        for quant_type in ("nf4", "fp4"):
            for double_quant in (False, True):
                ws = tuple(gemv4bit.quantize(torch.randn(n, 4096, device="cuda", generator=g) * 0.02, quant_type,
                                             double_quant) for n in (4096, 256, 256))
                down = gemv4bit.quantize(torch.randn(512, 13696, device="cuda", generator=g) * 0.02, quant_type,
                                         double_quant)
                for dtype in (torch.bfloat16, torch.float16):
                    bias = (torch.randn(4608, device="cuda", generator=g) * 0.02).to(dtype)
                    for b in (2, 5, 8):
                        for weights, bb, swiglu in ((ws[:1], None, False), (ws, bias, False), (ws[:1], None, True),
                                                    ((down,), None, False)):
                            x = torch.randn(b, 1, weights[0].shape[1], device="cuda", generator=g).to(dtype)
                            assert gemv4bit.gemv4bit_mma.usable(x, weights, swiglu)
                            ref = _reference(x, weights, bb, swiglu)
                            worst = max(worst, _rel(gemv4bit._launch(x, weights, bb, swiglu, None), ref))
                            worst_triton = max(worst_triton, _rel(gemv4bit._launch(x, weights, bb, swiglu, None,
                                                                                   mma=False), ref))
                            launches += 1
        verdict = "OK" if worst < 1e-2 and worst < 2 * worst_triton else "FAILED (above 1e-2 or twice Triton's)"
        print(f"4-bit CUDA kernel {verdict}: largest rel err vs float64 over {launches} launches {worst:.2e} "
              f"(Triton's: {worst_triton:.2e})", flush=True)
    except Exception as exc:
        print("4-bit CUDA kernel FAILED", type(exc).__name__, str(exc)[:500], flush=True)


def check_one() -> None:
    """One vector through the batch-1 CUDA kernel (``glmkit.gemv4bit_one``, what ``gemv_4bit`` runs there) against
    float64 and the Triton kernel: nf4/fp4, bf16/fp16, one weight, q/k/v with a bias, SwiGLU and down_proj's width;
    then its folded norm and residual add against the Triton kernel's."""
    print("4-bit batch-1 CUDA kernel passed its first-run check on this GPU:", gemv4bit.check_one("cuda"),
          "- the kernel for one row:", gemv4bit.kernel_for_rows("cuda", 1), flush=True)
    g = torch.Generator("cuda").manual_seed(0)
    worst, worst_triton, folded, launches = 0.0, 0.0, 0.0, 0
    try:
        for quant_type in ("nf4", "fp4"):
            ws = tuple(gemv4bit.quantize(torch.randn(n, 4096, device="cuda", generator=g) * 0.02, quant_type)
                       for n in (4096, 256, 256))
            gate_up = gemv4bit.quantize(torch.randn(2 * 1712, 4096, device="cuda", generator=g) * 0.02, quant_type)
            down = gemv4bit.quantize(torch.randn(4096, 13696, device="cuda", generator=g) * 0.02, quant_type)
            for dtype in (torch.bfloat16, torch.float16):
                bias = (torch.randn(4608, device="cuda", generator=g) * 0.02).to(dtype)
                for weights, bb, swiglu in ((ws[:1], None, False), (ws, bias, False), ((gate_up,), None, True),
                                            ((down,), None, False)):
                    x = torch.randn(1, 1, weights[0].shape[1], device="cuda", generator=g).to(dtype)
                    assert gemv4bit.gemv4bit_one.usable(x, weights, swiglu)
                    ref = _reference(x, weights, bb, swiglu)
                    worst = max(worst, _rel(gemv4bit._launch(x, weights, bb, swiglu, None), ref))
                    worst_triton = max(worst_triton, _rel(gemv4bit._launch(x, weights, bb, swiglu, None, mma=False),
                                                          ref))
                    launches += 1
                    norm = (torch.rand(x.shape[-1], device="cuda", generator=g) + 0.5).to(dtype)
                    stream = gemv4bit.normed_stream(x, norm)
                    f = gemv4bit._Fusion(squares=stream.squares)
                    got = gemv4bit.gemv_4bit_normed(stream, weights, bb, swiglu=swiglu)
                    want = gemv4bit._launch(stream.scaled, weights, bb, swiglu, None, mma=False, fusion=f)
                    folded = max(folded, _rel(got, want))
                    if not swiglu and len(weights) == 1:
                        n = weights[0].shape[0]
                        r = torch.randn(1, 1, n, device="cuda", generator=g).to(dtype)
                        g_out = (torch.rand(n, device="cuda", generator=g) + 0.5).to(dtype)
                        y, after = gemv4bit.gemv_4bit_residual(x, weights[0], r, g_out)
                        want = r.float() + _reference(x, weights, None, False).float()
                        folded = max(folded, _rel(y, want), _rel(after.scaled, y.float() * g_out.float()),
                                     abs(after.squares.sum().item() / y.float().pow(2).sum().item() - 1))
        verdict = "OK" if worst < 1e-2 and worst < 2 * worst_triton and folded < 1e-2 else "FAILED"
        print(f"4-bit batch-1 CUDA kernel {verdict}: largest rel err vs float64 over {launches} launches {worst:.2e} "
              f"(Triton's: {worst_triton:.2e}); folded norm / residual add against Triton / float64: {folded:.2e}",
              flush=True)
    except Exception as exc:
        print("4-bit batch-1 CUDA kernel FAILED", type(exc).__name__, str(exc)[:500], flush=True)


def check(prompt: torch.Tensor | None = None) -> None:
    if prompt is None:  # gpu_smoke_fast.py's prompt: 8 random ids
        prompt = torch.randint(0, 800, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))[:1, :8]
    check_lookups()
    check_decoders(prompt)
    # the CUDA kernel's first-run check waits for the first 2-8 rows: the batch-2 decoder's eager warm-up, before
    # its capture (none at load time or at batch 1)
    print("CUDA-kernel checks after the batch-1 decoders (expect none):", dict(gemv4bit._MMA_CHECKED), flush=True)
    check_batch(prompt)
    print("CUDA-kernel checks after the batch-2 decoder (expect its dtype, True):", dict(gemv4bit._MMA_CHECKED),
          flush=True)
    check_tensor_cores(prompt)
    check_mma()
    check_one()


if __name__ == "__main__":
    check()
