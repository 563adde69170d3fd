"""Quick GPU check of the fast path on the tiny model: same greedy tokens as generate(), eager and graph+compile."""

import torch

from glmkit.fast_decode import FastDecoder
from glmkit.loading import load_model

model = load_model(dtype=torch.float32, device_map="cuda:0")
ids = torch.randint(0, 800, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24, do_sample=False)
for opts in ({"cuda_graph": False, "compile": False}, {"cuda_graph": True, "compile": False}, {}):
    try:
        out = FastDecoder(model, max_len=64, batch_size=2, **opts).generate(ids, 24, ignore_eos=True)
        print(opts, "identical:", torch.equal(out, ref), flush=True)
    except Exception as exc:
        print(opts, "FAILED", type(exc).__name__, str(exc)[:500], flush=True)
