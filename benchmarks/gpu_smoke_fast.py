"""Quick GPU check of the fast path on the tiny model: same greedy tokens as generate() (eager, graph, graph +
compile, and with a chunked prefill), and prefill logits equal to one plain forward."""

import torch

from glmkit.fast_decode import FastDecoder
from glmkit.loading import load_model

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
