"""Quick GPU check that the default fast path keeps glmkit's decode attention through torch.compile and CUDA graphs
(no fallback warning) and gives generate()'s greedy tokens on the trained tiny model: FastDecoder and a one-rank
TPDecoder, in fp32 and bf16; and in fp32, 440 greedy tokens at batch 1 (a cache walked in up to four tiles) equal to the
same decoder's with attention="sdpa". About a minute on one GPU: python benchmarks/gpu_smoke_attention.py"""

import warnings

import torch

from glmkit.fast_decode import FastDecoder
from glmkit.loading import load_model
from glmkit.tp_decode import TPDecoder

for dtype in (torch.float32, torch.bfloat16):
    model = load_model(dtype=dtype, device_map="cuda:0")
    ids = torch.randint(0, 800, (1, 20), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False)
    for cls in (FastDecoder, TPDecoder):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dec = cls(model, max_len=64)
            got = dec.generate(ids, 16, ignore_eos=True)
        fallbacks = [str(w.message)[:300] for w in caught if issubclass(w.category, RuntimeWarning)]
        print(dtype, cls.__name__, "attention:", getattr(dec, "attention", None), "identical:", torch.equal(got, want),
              "fallback warnings:", fallbacks, flush=True)
    if dtype == torch.float32:  # past one tile of the cache: the tiles walked one after another
        ids = torch.randint(0, 800, (1, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        got, ref = (FastDecoder(model, max_len=480, attention=a).generate(ids, 440, ignore_eos=True)
                    for a in ("triton", "sdpa"))
        print(dtype, "440 tokens at positions 24-463, triton identical to sdpa:", torch.equal(got, ref), flush=True)
