"""Quick check of the fast split on two real GPUs (layers 0-2 on cuda:0, 3-5 on cuda:1): FastDecoder's greedy tokens
equal generate()'s on the trained tiny model, in fp32 and bf16, with graphs and compile, lone and batched, with a
chunked prefill; then in nf4 (4-bit on two cards: the long-context path), the split's tokens equal one GPU's, two rows
taking glmkit's CUDA 4-bit kernel on each GPU (its first-run check on each, in that stage's warm-up), one row its
batch-1 CUDA kernel (``glmkit.gemv4bit_one``, checked on each GPU likewise); prints each check's result."""

import torch
from accelerate import dispatch_model

from glmkit import gemv4bit
from glmkit.device_map import split_layers
from glmkit.fast_decode import FastDecoder
from glmkit.loading import load_model
from glmkit.models import TRAINED_TINY_DIR
from glmkit.quantization import load_precision

for dtype in (torch.float32, torch.bfloat16):
    model = load_model(dtype=dtype, device_map="cuda:0")
    ids = torch.randint(0, 800, (2, 24), device="cuda:0", generator=torch.Generator("cuda:0").manual_seed(0))
    want = FastDecoder(model, max_len=64, batch_size=2).generate(ids, 24, ignore_eos=True)
    want1 = FastDecoder(model, max_len=64).generate(ids[:1], 24, ignore_eos=True)
    split = dispatch_model(model, split_layers(model, [3, 3], devices=[0, 1]), main_device="cuda:0")
    for opts in ({"cuda_graph": False, "compile": False}, {}, {"hop": "host"}):
        for chunk in (None, 7):
            try:
                dec = FastDecoder(split, max_len=64, batch_size=2, **opts)
                got = dec.generate(ids, 24, ignore_eos=True, prefill_chunk=chunk)
                lone = FastDecoder(split, max_len=64, **opts).generate(ids[:1], 24, ignore_eos=True, prefill_chunk=chunk)
                print(dtype, opts, "chunk", chunk, [str(s.device) for s in dec.segments],
                      "batched identical:", torch.equal(got.cpu(), want.cpu()),
                      "lone identical:", torch.equal(lone.cpu(), want1.cpu()), flush=True)
            except Exception as exc:
                print(dtype, opts, "FAILED", type(exc).__name__, str(exc)[:400], flush=True)

try:
    model = load_precision(TRAINED_TINY_DIR, "nf4", device_map="cuda:0")
    ids = torch.randint(0, 800, (2, 24), device="cuda:0", generator=torch.Generator("cuda:0").manual_seed(0))
    want = FastDecoder(model, max_len=64, batch_size=2).generate(ids, 24, ignore_eos=True)
    want1 = FastDecoder(model, max_len=64).generate(ids[:1], 24, ignore_eos=True)
    split = dispatch_model(model, split_layers(model, [3, 3], devices=[0, 1]), main_device="cuda:0")
    dec = FastDecoder(split, max_len=64, batch_size=2)
    got = dec.generate(ids, 24, ignore_eos=True)
    alone = FastDecoder(split, max_len=64)  # one row: the norms folded into the 4-bit GEMVs on both GPUs
    lone = alone.generate(ids[:1], 24, ignore_eos=True)
    print("nf4 split", [str(s.device) for s in dec.segments], "gemv", dec.gemv_by_bucket,
          "batched identical to one GPU:", torch.equal(got.cpu(), want.cpu()),
          "lone identical:", torch.equal(lone.cpu(), want1.cpu()), "lone norms folded:", alone.fuses_norms(1),
          "first-run checks:", dict(gemv4bit._MMA_CHECKED),
          "2 rows on cuda:1:", gemv4bit.kernel_for_rows("cuda:1", 2),
          "one-token checks:", dict(gemv4bit._ONE_CHECKED), "1 row on cuda:1:", gemv4bit.kernel_for_rows("cuda:1", 1),
          flush=True)
except Exception as exc:
    print("nf4 split FAILED", type(exc).__name__, str(exc)[:400], flush=True)
