"""Quick GPU check of the tensor-parallel decoder on one GPU (one rank, no collectives): the same greedy tokens
as FastDecoder on the trained tiny model, with graphs and compile, batch buckets and a prompt prefilled in two
pieces; decode steps fed host tensors without a host-device sync; and rank 0's TP=2 shard alone (its slice of the
vocabulary in the embedding too) builds, captures and decodes (its tokens are meaningless: half a model).
The collectives themselves run under torchrun in tests/test_tp_decode.py (gloo) and need two GPUs for NCCL."""

import torch

from glmkit.fast_decode import FastDecoder
from glmkit.loading import load_model
from glmkit.tp_decode import TPDecoder

for dtype in (torch.float32, torch.bfloat16):
    model = load_model(dtype=dtype, device_map="cuda:0")
    prompt = torch.randint(0, 800, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want = FastDecoder(model, max_len=64).generate(prompt, 24, ignore_eos=True)
    for opts in ({"cuda_graph": False, "compile": False}, {}):
        try:
            got = TPDecoder(model, max_len=64, **opts).generate(prompt, 24, ignore_eos=True, prefill_chunk=5)
            print(dtype, opts, "TPDecoder(world=1) identical to FastDecoder:", torch.equal(got, want), flush=True)
        except Exception as exc:
            print(dtype, opts, "FAILED", type(exc).__name__, str(exc)[:500], flush=True)
    try:  # a prompt in slot 2 of a batch of 4, prefilled in two pieces, decoded as 3 rows (bucket 4)
        dec = TPDecoder(model, max_len=64, batch_size=4)
        dec.prefill(prompt[:, :7], slot=2)
        logits = dec.prefill(prompt[:, 7:], slot=2, start=7)
        tokens = []
        for i in range(24):
            token = logits[-1].argmax(-1)
            tokens.append(int(token))
            logits = dec.decode_step(torch.stack([token * 0, token * 0, token]), torch.tensor([0, 0, 12 + i]).cuda())
        print(dtype, "buckets", dec.buckets, "slot + start identical:", tokens == want[0, 12:].tolist(), flush=True)
        # host tensors, as a server's runner passes them: copied through pinned memory with no sync (CUDA's sync
        # check raises on one), the same tokens
        dec = TPDecoder(model, max_len=64, batch_size=2)
        logits = dec.prefill(prompt, slot=1)
        tokens = []
        for i in range(24):
            tokens.append(int(logits[-1].argmax()))
            torch.cuda.set_sync_debug_mode("error")
            try:
                logits = dec.decode_step(torch.tensor([0, tokens[-1]]), torch.tensor([0, 12 + i]))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        print(dtype, "host inputs without a sync, identical:", tokens == want[0, 12:].tolist(), flush=True)
        shard = TPDecoder(model, max_len=64, rank=0, world=2)
        print(dtype, "rank 0 of 2 alone:", tuple(shard.generate(prompt, 8, ignore_eos=True).shape), flush=True)
    except Exception as exc:
        print(dtype, "buckets FAILED", type(exc).__name__, str(exc)[:500], flush=True)
