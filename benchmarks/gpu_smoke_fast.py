"""Quick GPU check of the fast path on the tiny model: same greedy tokens as generate() (eager, graph, graph +
compile, and with a chunked prefill), and prefill logits equal to one plain forward; glmkit's decode-attention kernel
(attention="triton") against sdpa: at GLM-4-9B's head shapes on a 32K cache, and greedy tokens in a graph, compiled,
for one row and for rows at their own positions over several splits; bitsandbytes nf4/fp4 through the default
decoder (glmkit's 4-bit ops in the compiled layer, CUDA graphs: gpu_smoke_4bit.py); then the layer split with both halves on
cuda:0 (two segments): generate()'s tokens lone, in slots of a bucketed batch, and with prefill(start=)."""

import gpu_smoke_4bit
import torch
import torch.nn.functional as F
from accelerate import dispatch_model

from glmkit.device_map import split_layers
from glmkit.fast_decode import FastDecoder
from glmkit.generation import encode_chat
from glmkit.loading import load_model, load_tokenizer

model = load_model(dtype=torch.float32, device_map="cuda:0")
ids = torch.randint(0, 800, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
n_ref = ref.shape[1] - ids.shape[1]
eos = set(model.generation_config.eos_token_id)


def greedy_rows(dec: FastDecoder, logits: torch.Tensor, pos: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy tokens of slots decoding each at its own position (``pos`` advanced in place), as the engine runs them."""
    rows = [[] for _ in range(logits.shape[0])]
    for _ in range(steps):
        tokens = logits.argmax(-1)
        for row, t in zip(rows, tokens.tolist()):
            row.append(t)
        logits = dec.decode_step(tokens, pos).clone()
        pos += 1
    return rows


def until_eos(tokens: list[int]) -> list[int]:
    """The tokens up to and including the first end token."""
    return tokens[:next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))]


def same_until_eos(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Rows equal up to and including the reference's first end token (generate pads after it)."""
    n = ids.shape[1]
    for x, y in zip(a.tolist(), b.tolist()):
        want = y[:n] + until_eos(y[n:])
        if x[:len(want)] != want:
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
        print(opts, "attention", dec.attention, "chunk", chunk, "identical:", same_until_eos(out, ref),
              "prefill logits max diff", diff, flush=True)
    except Exception as exc:
        print(opts, "FAILED", type(exc).__name__, str(exc)[:500], flush=True)

# glmkit's Triton GEMVs (batch 1, bf16, fp16 and fp32): the same greedy tokens as generate() on the trained tiny model
trained = load_model(dtype=torch.bfloat16, device_map="cuda:0")
prompt = ids[:1, :8]
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    m = trained.to(dtype)
    want = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, min_new_tokens=24,
                      do_sample=False)
    for compile_layer in (False, True):
        got = FastDecoder(m, max_len=40, gemv="triton", compile=compile_layer).generate(prompt, 24, ignore_eos=True)
        print("triton", dtype, "compiled" if compile_layer else "eager", "identical:", torch.equal(got, want), flush=True)

# 4 bits: each nibble lookup against float64, and nf4/fp4 through the default decoder (compiled, CUDA graphs)
gpu_smoke_4bit.check(prompt)

# glmkit's decode attention (rope + K/V write + attention in one kernel, split over programs on long caches)
try:
    from glmkit.attention import decode_attention, split_length
    from glmkit.fast_decode import rope

    def reference(q, k, v, k_cache, v_cache, pos, rows, cos, sin):
        c, s = cos.float()[:, None, None], sin.float()[:, None, None]
        q, k = rope(q.float()[:, :, None], c, s).to(q.dtype), rope(k.float()[:, :, None], c, s).to(k.dtype)
        k_cache[rows, :, pos], v_cache[rows, :, pos] = k[:, :, 0], v
        n = k_cache.shape[2]
        mask = torch.zeros(len(pos), 1, 1, n, dtype=q.dtype, device="cuda").masked_fill(
            torch.arange(n, device="cuda") > pos[:, None, None, None], float("-inf"))
        return F.scaled_dot_product_attention(q, k_cache[rows], v_cache[rows], attn_mask=mask, enable_gqa=True)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        b, n = 4, 32768  # GLM-4-9B's heads: 32 query heads, 2 KV heads of 128, 64 rotary dims
        q, k, v = (torch.randn(b, h, 128, device="cuda", dtype=dtype) for h in (32, 2, 2))
        k_cache, v_cache = (torch.randn(b, 2, n, 128, device="cuda", dtype=dtype) for _ in range(2))
        angle = torch.rand(b, 32, device="cuda") * 6
        cos, sin = angle.cos().repeat_interleave(2, -1).to(dtype), angle.sin().repeat_interleave(2, -1).to(dtype)
        pos, rows = torch.tensor([0, 63, 20000, n - 1], device="cuda"), torch.tensor([2, 0, 3, 1], device="cuda")
        kc, vc = k_cache.clone(), v_cache.clone()
        want = reference(q, k, v, kc, vc, pos, rows, cos, sin)
        got = decode_attention(q, k, v, k_cache, v_cache, pos, rows, cos, sin)
        print("decode_attention", dtype, f"b={b} cache {n} split {split_length(b, 2, n)}: max diff",
              (got.float() - want.float()).abs().max().item(), "k cache diff", (k_cache.float() - kc.float()).abs().max().item(),
              "v cache equal", torch.equal(v_cache, vc), flush=True)
except Exception as exc:
    print("decode_attention FAILED", type(exc).__name__, str(exc)[:500], flush=True)

for dtype in (torch.bfloat16, torch.float16, torch.float32):  # the trained tiny model: the kernel, graph + compile
    m = trained.to(dtype)
    want = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, min_new_tokens=24,
                      do_sample=False)
    for opts in ({"cuda_graph": False, "compile": False}, {"compile": False}, {}):
        try:
            got = FastDecoder(m, max_len=40, attention="triton", **opts).generate(prompt, 24, ignore_eos=True)
            print("attention triton", dtype, opts, "identical:", torch.equal(got, want), flush=True)
        except Exception as exc:
            print("attention triton", dtype, opts, "FAILED", type(exc).__name__, str(exc)[:500], flush=True)
try:  # rows at their own positions, a cache of several splits (max_len 700: 11 splits of 64), in a graph
    m = trained.to(torch.float32)
    lone = [torch.randint(0, 800, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
            for n in (5, 70, 300)]
    dec = FastDecoder(m, max_len=700, batch_size=4, attention="triton", compile=False, graph_batch_sizes=[4])
    logits = torch.cat([dec.prefill(p, slot=i) for i, p in enumerate(lone)])
    rows = greedy_rows(dec, logits, torch.tensor([p.shape[1] for p in lone], device="cuda"), 16)
    # generate() stops at an end token (min_new_tokens would forbid it and pick another): compared up to it
    wants = [m.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=16,
                        do_sample=False)[0, p.shape[1]:].tolist() for p in lone]
    print("attention triton, 3 rows of a 4-row graph at positions 5/70/300, cache 700: identical:",
          [until_eos(r) == until_eos(w) for r, w in zip(rows, wants)], flush=True)
except Exception as exc:
    print("attention triton rows FAILED", type(exc).__name__, str(exc)[:500], flush=True)

try:  # cache_spans: a graph per cache span (512, 2048, 2100 here), the step at each position replaying the shortest
    # that holds it; a 500-token prompt and 40 new tokens cross from the first span into the second. fp32: generate()'s
    # tokens; bf16 (each span's attention sums in its own order): how many equal the whole-cache decoder's
    long = torch.randint(0, 800, (1, 500), device="cuda", generator=torch.Generator("cuda").manual_seed(500))
    for dtype in (torch.float32, torch.bfloat16):
        m = trained.to(dtype)
        dec = FastDecoder(m, max_len=2100, attention="triton")  # (cache_spans: on by default)
        got = dec.generate(long, 40, ignore_eos=True)[0, 500:].tolist()
        whole = FastDecoder(m, max_len=2100, attention="triton", cache_spans=False).generate(
            long, 40, ignore_eos=True)[0, 500:].tolist()
        want = m.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=40, do_sample=False)[0, 500:]
        print("cache spans", dtype, dec.spans(1), "graphs", sorted(dec.stages[0].graphs), "identical:" if dtype ==
              torch.float32 else "(bf16) generate() identical:", until_eos(got) == until_eos(want.tolist()),
              "tokens as the whole cache's:", sum(a == b for a, b in zip(got, whole)), "of", len(got), flush=True)
except Exception as exc:
    print("cache spans FAILED", type(exc).__name__, str(exc)[:500], flush=True)

try:  # the server's engine on a decoder with cache spans: its runner passes each step's highest position, so a lone
    # request whose 500-token prompt and 40 new tokens cross from the first span (512) into the second replays both;
    # fp32: generate()'s tokens (a random prompt: up to the first end token)
    from glmkit.engine import Engine

    m = trained.to(torch.float32)
    dec = FastDecoder(m, max_len=2100, batch_size=2, attention="triton")
    used, run_stages = [], dec._run_stages
    dec._run_stages = lambda b, span: (used.append((b, span)), run_stages(b, span))[1]
    engine = Engine(m, load_tokenizer(), max_batch_size=2, max_context=2099, decoder=dec)
    try:
        got = engine.submit(long[0].tolist(), max_tokens=40).wait(300)
    finally:
        engine.close()
    want = m.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=40, do_sample=False)[0, 500:].tolist()
    ref = [t for t in until_eos(want) if t not in eos]  # the engine's tokens stop before the end token
    print("engine on cache spans identical:", got.tokens == ref and not got.error, "steps by (size, span):",
          sorted(set(used)), flush=True)
except Exception as exc:
    print("engine on cache spans FAILED", type(exc).__name__, str(exc)[:500], flush=True)

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
    rows = greedy_rows(dec, logits, torch.tensor([p.shape[1] for p in prompts], device="cuda:0"), 24)
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
