"""Quick GPU check of the fast path on the tiny model: same greedy tokens as generate() (eager, graph, graph +
compile, and with a chunked prefill), and prefill logits equal to one plain forward; bitsandbytes nf4/fp4 through the
default decoder (glmkit's 4-bit ops in the compiled layer, CUDA graphs); then the layer split with both
halves on cuda:0 (two segments): generate()'s tokens lone, in slots of a bucketed batch, and with prefill(start=)."""

import warnings

import torch
from accelerate import dispatch_model

from glmkit import gemv4bit
from glmkit.device_map import split_layers
from glmkit.fast_decode import FastDecoder
from glmkit.generation import encode_chat
from glmkit.loading import load_model, load_tokenizer
from glmkit.models import TRAINED_TINY_DIR
from glmkit.quantization import load_precision

model = load_model(dtype=torch.float32, device_map="cuda:0")
ids = torch.randint(0, 800, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
n_ref = ref.shape[1] - ids.shape[1]
eos = set(model.generation_config.eos_token_id)


def same_until_eos(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Rows equal up to and including the reference's first end token (generate pads after it)."""
    for x, y in zip(a.tolist(), b.tolist()):
        stop = next((i + 1 for i, t in enumerate(y) if i >= ids.shape[1] and t in eos), len(y))
        if x[:stop] != y[:stop]:
            return False
    return True

with torch.inference_mode():
    ref_logits = model(ids).logits[:, -1].float()
for opts, chunk in (({"cuda_graph": False, "compile": False}, None), ({"cuda_graph": True, "compile": False}, None),
                    ({}, None), ({}, 16)):
    try:
        dec = FastDecoder(model, max_len=96, batch_size=2, **opts)
        out = dec.generate(ids, n_ref, ignore_eos=True, prefill_chunk=chunk)
        diff = (dec.prefill(ids, chunk) - ref_logits).abs().max().item()
        print(opts, "chunk", chunk, "identical:", same_until_eos(out, ref), "prefill logits max diff", diff, flush=True)
    except Exception as exc:
        print(opts, "FAILED", type(exc).__name__, str(exc)[:500], flush=True)

# glmkit's Triton GEMVs (batch 1, bf16 and fp32): the same greedy tokens as generate() on the trained tiny model
trained = load_model(dtype=torch.bfloat16, device_map="cuda:0")
prompt = ids[:1, :8]
for dtype in (torch.bfloat16, torch.float32):
    m = trained.to(dtype)
    want = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, min_new_tokens=24,
                      do_sample=False)
    for compile_layer in (False, True):
        got = FastDecoder(m, max_len=40, gemv="triton", compile=compile_layer).generate(prompt, 24, ignore_eos=True)
        print("triton", dtype, "compiled" if compile_layer else "eager", "identical:", torch.equal(got, want), flush=True)

# glmkit's 4-bit kernel with each nibble lookup (the interpreter runs neither the warp shuffle nor the GPU's PTX
# loads) against dequantize_4bit + F.linear, bf16 x, one GLM-4-9B-wide row block
for lookup in gemv4bit.LOOKUPS:
    for double_quant in (False, True):
        w4 = gemv4bit.quantize(torch.randn(512, 4096, device="cuda") * 0.02, "nf4", double_quant)
        x4 = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)
        ref4 = torch.nn.functional.linear(x4.double(), w4.dequantize(torch.float32).double())
        try:
            y4 = gemv4bit.gemv_4bit(x4, w4, lookup=lookup).double()
            print("4-bit lookup", lookup, "double quant" if double_quant else "plain", "rel err vs float64:",
                  f"{((y4 - ref4).norm() / ref4.norm()).item():.2e}", flush=True)
        except Exception as exc:
            print("4-bit lookup", lookup, "FAILED", type(exc).__name__, str(exc)[:500], flush=True)

# 4 bits (bitsandbytes nf4, nf4 with double quantization, fp4) on the trained tiny model: the default decoder
# (gemv="auto": glmkit's 4-bit ops inside the compiled layer, each step a CUDA graph) against the same model's
# generate(), and nf4 once more with the "pair" lookup; a warning (the layer did not compile, the kernels failed)
# is printed with the result
default_lookup = gemv4bit.LOOKUP
for precision, lookup in (("nf4", None), ("nf4-dq", None), ("fp4", None), ("nf4", "pair")):
    gemv4bit.LOOKUP = lookup or default_lookup
    try:
        q = load_precision(TRAINED_TINY_DIR, precision, device_map="cuda:0")
        want4 = q.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, min_new_tokens=24,
                           do_sample=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dec = FastDecoder(q, max_len=40)
            got = dec.generate(prompt, 24, ignore_eos=True)
        agree = sum(a == b for a, b in zip(got[0, 8:].tolist(), want4[0, 8:].tolist()))
        print("4-bit", precision, "lookup", gemv4bit.LOOKUP, "gemv", dec.gemv, "compiled", dec.compiled,
              "graphs", sorted(dec.stages[0].graphs),
              "identical:", torch.equal(got, want4), f"({agree}/24 tokens)", "warnings:",
              [str(w.message)[:300] for w in caught if issubclass(w.category, RuntimeWarning)], flush=True)
        del q, dec
    except Exception as exc:
        print("4-bit", precision, "FAILED", type(exc).__name__, str(exc)[:500], flush=True)
gemv4bit.LOOKUP = default_lookup

# The layer split with both halves on cuda:0 (a map naming the card twice, 0 and "cuda:0": two segments, two CUDA
# graphs per step and the hand-over between them), on the trained tiny model: generate()'s tokens, lone and in
# slots of a bucketed batch, with chunked prefill and a prefill continued with start=
tok = load_tokenizer()
split = dispatch_model(load_model(dtype=torch.float32, device_map="cuda:0"),  # accelerate's hooks, as a real split
                       split_layers(trained.config, [3, 3], devices=[0, "cuda:0"]), main_device="cuda:0")
questions = ["How many layers does GLM-4-9B-Chat have?", "How do I split the model over two GPUs?", "Hi"]
prompts = [encode_chat(tok, [{"role": "user", "content": q}], device="cuda:0")["input_ids"] for q in questions]


def want(p: torch.Tensor, n: int = 24) -> list[int]:
    return split.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, do_sample=False)[0, p.shape[1]:].tolist()


try:
    for opts in ({"cuda_graph": False, "compile": False}, {"compile": False}, {}):
        dec = FastDecoder(split, max_len=128, **opts)
        segments = [(repr(s.entry), len(s.layers)) for s in dec.segments]
        for chunk in (None, 8):
            got = dec.generate(prompts[0], 24, prefill_chunk=chunk)[0, prompts[0].shape[1]:].tolist()
            print("split", opts, segments, "chunk", chunk, "identical:", got == want(prompts[0]), flush=True)
    dec = FastDecoder(split, max_len=128, batch_size=4)  # buckets 1, 2, 4: three live rows run the 4-row step
    logits = torch.cat([dec.prefill(p, chunk=8, slot=i) for i, p in enumerate(prompts)])
    half = prompts[0].shape[1] // 2
    dec.prefill(prompts[0][:, :half], slot=3)  # row 3 half-way through its prompt while rows 0..2 decode
    pos, rows = torch.tensor([p.shape[1] for p in prompts], device="cuda:0"), [[], [], []]
    for _ in range(24):
        tokens = logits.argmax(-1)
        for row, t in zip(rows, tokens.tolist()):
            row.append(t)
        logits = dec.decode_step(tokens, pos).clone()
        pos += 1
    print("split buckets", dec.buckets, "rows identical:", [r[:len(want(p))] == want(p) for r, p in zip(rows, prompts)],
          flush=True)
    last = dec.prefill(prompts[0][:, half:], slot=3, start=half)
    token, got = last.argmax(-1), []
    for i in range(24):
        got.append(int(token))
        # row 3 alone needs the 4-row step: rows 0..2 (finished) take a filler token
        token = dec.decode_step(torch.cat([torch.zeros(3, dtype=torch.long, device="cuda:0"), token]),
                                torch.tensor([1, 1, 1, prompts[0].shape[1] + i], device="cuda:0"))[3:].argmax(-1)
    print("split prefill(start=) row 3 identical:", got[:len(want(prompts[0]))] == want(prompts[0]), flush=True)
except Exception as exc:
    print("split FAILED", type(exc).__name__, str(exc)[:500], flush=True)
