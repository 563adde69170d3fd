"""What one card does of a tensor-parallel (TP=2) GLM-4-9B token, on one GPU: the bound on TP's speed-up.

Builds GLM-4-9B-Chat with random weights (bf16) on the GPU, then decodes with the whole model (``FastDecoder``)
and with rank 0's TP=2 shard alone (``TPDecoder(rank=0, world=2)`` without a process group: 16 query heads, one KV
head, half the MLP, half the vocabulary, no all-reduce), at batch 1 and 16, in the same run. The shard's speed
over the full model's is the most TP=2 can give before its 81 all-reduces per token are paid. The copy bandwidth of
the same run gives each step's weight-read time at the roofline (the shard reads half of every weight; its norms,
0.7 MB, are left out), and so the part of a step that is not weights.

    python benchmarks/tp_bound.py
Writes benchmarks/results/tp_bound.json (and to $OUT).
"""

from __future__ import annotations

import argparse

import torch

from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.fast_decode import FastDecoder
from glmkit.models import glm4_9b_chat_config, random_model
from glmkit.tp_decode import TPDecoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=1024)
    args = ap.parse_args()
    model = random_model(glm4_9b_chat_config(), "cuda")
    rows = []
    bandwidth, whole_bytes = copy_bandwidth(), bytes_read_per_token(model)
    paths = (("one GPU, whole model (FastDecoder)", whole_bytes, lambda b: FastDecoder(model, args.max_len, b)),
             ("one TP=2 rank's shard, no all-reduce (TPDecoder)", whole_bytes / 2,
              lambda b: TPDecoder(model, args.max_len, b, rank=0, world=2)))
    for batch in args.batches:
        for name, weight_bytes, make in paths:
            decoder = make(batch)
            row = {"path": name, "batch_size": batch, **decoder.tokens_per_second(32, args.new_tokens),
                   "gemv": str(decoder.gemv)}
            row["step_ms"] = 1000 * batch / row["decode_tok_s"]
            row["weights_ms_at_copy_bandwidth"] = 1000 * weight_bytes / bandwidth
            row["rest_ms"] = row["step_ms"] - row["weights_ms_at_copy_bandwidth"]
            rows.append(row)
            print(row, flush=True)
            del decoder
            torch.cuda.empty_cache()
        full, shard = rows[-2]["decode_tok_s"], rows[-1]["decode_tok_s"]
        rows[-1]["speedup_vs_whole"] = shard / full
        save_result("tp_bound", {"method": f"random GLM-4-9B, bf16, 32-token prompt, {args.new_tokens} new tokens, one "
                                           "GPU; the shard skips its all-reduces", "copy_bandwidth_bytes_s": bandwidth,
                                "bytes_read_per_token": whole_bytes, "runs": rows})


if __name__ == "__main__":
    main()
