"""How a FastDecoder's batch-1 decode speed depends on the cache length it is built for (``max_len``), at the same
short context: GLM-4-9B (random weights) in bf16 and nf4, each precision's decoder built for cache lengths from 168 to
32768 positions, with one graph for the whole cache and with cache spans (the default), the same 32-token prompt and
128 new tokens each time (positions 32-160), one run.

The decode attention's launch is chosen from a cache length, not the position (a CUDA graph replays one grid for
every token), and with it whether q/k/v leaves SMs to the attention (``glmkit.attention.Grid``,
``glmkit.fast_decode.gemv16_sms_left``): with one graph, the decoder's whole cache; with cache spans, the shortest
span that holds the position (``FastDecoder(cache_spans=True)``).

    PYTHONPATH=.:benchmarks python benchmarks/max_len_sweep.py --checkpoint /tmp/glm9b    # about 2 minutes on an H200
Writes benchmarks/results/max_len_spans.json (or --name; and to $OUT): ``precisions`` one graph for the whole cache,
``cache_spans`` the default decoder. (``max_len_sweep.json``: an earlier run, one graph only, before two changes to
the attention's launches.)
"""

from __future__ import annotations

import argparse

import torch
from nf4_fused import gpu_uuids, measure_each_precision

from glmkit.bench import copy_bandwidth
from glmkit.fast_decode import FastDecoder
from glmkit.models import ensure_random_checkpoint

MAX_LENS = (168, 256, 264, 296, 512, 520, 1024, 2048, 8192, 32768)
PROMPT, NEW = 32, 128


def sweep(model: torch.nn.Module, **options: bool) -> list[dict]:
    """Decode tok/s (best of 2 after a warm-up) of ``model``'s default decoder (with ``options``) at each of
    ``MAX_LENS``."""
    rows = []
    for max_len in MAX_LENS:
        decoder = FastDecoder(model, max_len=max_len, **options)
        decoder.tokens_per_second(PROMPT, 4)
        rates = [decoder.tokens_per_second(PROMPT, NEW)["decode_tok_s"] for _ in range(2)]
        rows.append({"max_len": max_len, **options, "decode_tok_s": rates, "best_tok_s": max(rates)})
        print(rows[-1], flush=True)
        del decoder
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--name", default="max_len_spans")
    args = ap.parse_args()
    ensure_random_checkpoint(args.checkpoint)
    result = {"what": __doc__.splitlines()[0], "prompt": PROMPT, "new_tokens": NEW, "copy_bandwidth_bytes_s":
              copy_bandwidth(), "gpu_uuids": gpu_uuids(), "gpu_note": "read with nvidia-smi in the same call",
              "precisions": {}}
    measure_each_precision(args.checkpoint, lambda model: {"precisions": sweep(model, cache_spans=False),
                                                           "cache_spans": sweep(model, cache_spans=True)},
                           result, args.name)


if __name__ == "__main__":
    main()
