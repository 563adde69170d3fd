"""A lone request's decode speed through the server's engine, GLM-4-9B (random weights) in bf16 and nf4, on a
decoder with cache spans (the default) and on one with one graph for the whole cache, both built for an 8K context
(one slot: a lone request runs the one-row step either way, and no larger step is compiled): what
``FastDecoder(cache_spans=True)`` gives a server's short chats (``benchmarks/max_len_sweep.py`` measures the decoder
alone).

    PYTHONPATH=.:benchmarks python benchmarks/engine_spans.py --checkpoint /tmp/glm9b     # about 3 minutes on an H200
Writes benchmarks/results/engine_spans.json (or --name; and to $OUT).
"""

from __future__ import annotations

import argparse
import time

import torch
from nf4_fused import gpu_uuids, measure_each_precision

from glmkit.engine import Engine
from glmkit.fast_decode import FastDecoder
from glmkit.loading import load_tokenizer
from glmkit.models import ensure_random_checkpoint

CONTEXT, SLOTS, PROMPT, NEW = 8192, 1, 32, 256


def lone_requests(model: torch.nn.Module, tokenizer: object, cache_spans: bool) -> dict:
    """tok/s of 3 lone greedy requests (after the first token, as a client sees them arrive) through an engine."""
    decoder = FastDecoder(model, max_len=CONTEXT + 1, batch_size=SLOTS, cache_spans=cache_spans)
    engine = Engine(model, tokenizer, max_batch_size=SLOTS, max_context=CONTEXT, decoder=decoder)
    ids = torch.randint(0, 1000, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    rates, tokens = [], []
    try:
        engine.submit(ids, max_tokens=16).wait()  # the warm-up: compiles and captures every step size and span
        for _ in range(3):
            r = engine.submit(ids, max_tokens=NEW).wait()
            end = time.perf_counter()
            if r.error:
                raise RuntimeError(r.error)
            rates.append((len(r.tokens) - 1) / (end - r.first_token_at))
            tokens.append(len(r.tokens))
    finally:
        engine.close()
    row = {"cache_spans": cache_spans, "spans": decoder.spans(1), "tokens": tokens, "decode_tok_s": rates,
           "best_tok_s": max(rates)}
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--name", default="engine_spans")
    args = ap.parse_args()
    ensure_random_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer(None)
    result = {"what": __doc__.splitlines()[0], "context": CONTEXT, "slots": SLOTS, "prompt": PROMPT, "new_tokens": NEW,
              "gpu_uuids": gpu_uuids(), "gpu_note": "read with nvidia-smi in the same call", "precisions": {}}
    measure_each_precision(args.checkpoint, lambda model: {
        "precisions": [lone_requests(model, tokenizer, spans) for spans in (True, False)]}, result, args.name)


if __name__ == "__main__":
    main()
