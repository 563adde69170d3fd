"""Tile shape of glmkit's decode-attention kernel on GLM-4-9B's batch-1 fast path (random weights, bf16), one GPU,
one run: cache positions per tile and warps per program where one program walks a KV head's whole cache
(``glmkit.attention.SHORT_TILE``; a short cache: here 288 positions), so a bigger tile means fewer steps one after
another. Decode tok/s of ``FastDecoder`` (its defaults otherwise) for each shape, and its greedy
tokens against the first shape's.

    PYTHONPATH=. python benchmarks/attention_tiles.py      # about 2 minutes on an H200
Writes benchmarks/results/attention_tiles.json (and to $OUT).
"""

from __future__ import annotations

import argparse

import torch

import glmkit.attention
from glmkit.bench import save_result
from glmkit.fast_decode import FastDecoder
from glmkit.models import glm4_9b_chat_config, random_model

SHAPES = [(64, 4), (128, 4), (128, 8), (256, 8), (64, 4)]  # (positions per tile, warps); the first again last: drift


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    model = random_model(glm4_9b_chat_config(), "cuda")
    ids = torch.randint(0, 1000, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    rows, first = [], None
    for block_n, warps in SHAPES:
        glmkit.attention.SHORT_TILE = (block_n, warps)
        decoder = FastDecoder(model, max_len=32 + args.new_tokens)
        tokens = decoder.generate(ids, 32, ignore_eos=True)[0, 32:].tolist()
        first = first or tokens
        row = {"block_n": block_n, "num_warps": warps, **decoder.tokens_per_second(32, args.new_tokens),
               "greedy_tokens_as_first_shape": sum(a == b for a, b in zip(tokens, first)), "of": len(first)}
        rows.append(row)
        print(row, flush=True)
        del decoder
        torch.cuda.empty_cache()
    save_result("attention_tiles", {"what": __doc__.splitlines()[0], "method": f"batch 1, 32-token prompt, "
                                    f"{args.new_tokens} new tokens, cache of {32 + args.new_tokens}", "rows": rows})


if __name__ == "__main__":
    main()
