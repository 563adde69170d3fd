"""Tensor-parallel fast decode (TP=2, ``TPDecoder``) against one GPU's ``FastDecoder``, in one run.

Run under torchrun on two GPUs. Every rank builds GLM-4-9B-Chat with the same random weights (bf16, same seed) on
its GPU. Rank 0 first measures the whole model with ``FastDecoder`` on its GPU alone (uncapped: the baseline) and
records its greedy tokens. Then each rank keeps its shard in a ``TPDecoder``, drops the whole model, caps itself at
12 GiB (an RTX 3060's size) and decodes: 8K static cache, 32-token prompt, 128 new tokens, median of 3 runs after
a warm-up, tok/s summed over the batch. The TP greedy tokens are compared with the one-GPU ones.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node 2 benchmarks/tp_fast.py
    NCCL_P2P_DISABLE=1 ... benchmarks/tp_fast.py --batches 1 --no-baseline --name tp_fast_no_p2p  # through host memory
Writes benchmarks/results/NAME.json from rank 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
from typing import Any

import torch
import torch.distributed as dist

from glmkit.bench import save_result
from glmkit.fast_decode import FastDecoder
from glmkit.models import glm4_9b_chat_config, random_model
from glmkit.parallel import init_process_group
from glmkit.tp_decode import TPDecoder

CARD, CONTEXT = 12 * 2**30, 8192


def speed(decoder: Any, new_tokens: int, repeats: int) -> dict[str, Any]:
    runs = [decoder.tokens_per_second(32, new_tokens)["decode_tok_s"] for _ in range(repeats)]
    return {"decode_tok_s": statistics.median(runs), "runs_tok_s": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-GPU FastDecoder rows")
    ap.add_argument("--name", default="tp_fast")
    args = ap.parse_args()

    group = init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    model = random_model(glm4_9b_chat_config(), device)  # the same seed on every rank: the same weights
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"world_size": world, "context": CONTEXT, "rows": rows,
                              "env": {k: os.environ.get(k) for k in ("NCCL_P2P_DISABLE", "NCCL_NVLS_ENABLE")}}
    want = None
    if rank == 0 and not args.no_baseline:
        want = FastDecoder(model, max_len=CONTEXT, graph_batch_sizes=[1]).generate(ids, 64, ignore_eos=True)[0, 32:]
        for b in args.batches:
            dec = FastDecoder(model, max_len=CONTEXT, batch_size=b, graph_batch_sizes=[b])
            rows.append({"path": "one GPU (FastDecoder, uncapped)", "batch_size": b, **speed(dec, args.new_tokens,
                                                                                                 args.repeats)})
            print(rows[-1], flush=True)
            del dec
            gc.collect()
            torch.cuda.empty_cache()
    dist.barrier()
    shard_model = TPDecoder(model, CONTEXT, args.batches[0], group=group, graph_batch_sizes=args.batches[:1])
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(CARD / torch.cuda.get_device_properties(device).total_memory, device)
    tp_tokens = shard_model.generate(ids, 64, ignore_eos=True)[0, 32:]
    if want is not None:
        result["greedy_tokens_identical_to_one_gpu"] = torch.equal(tp_tokens.cpu(), want.cpu())
        result["greedy_tokens_agreeing"] = int((tp_tokens.cpu() == want.cpu()).cumprod(0).sum())
    for b in args.batches:
        torch.cuda.reset_peak_memory_stats(device)
        row: dict[str, Any] = {"path": f"TP={world} (TPDecoder, each card capped at 12 GiB)", "batch_size": b}
        try:
            if b != shard_model.batch_size:  # the same weights, a new cache (the old one freed first)
                shard_model = shard_model.resized(1).resized(b, [b])
                gc.collect()
                torch.cuda.empty_cache()
            row |= speed(shard_model, args.new_tokens, args.repeats)
        except torch.OutOfMemoryError as exc:
            row["oom"] = str(exc)[:200]
        peaks: list[Any] = [None] * world
        dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(device))
        row["peak_allocated"] = peaks
        base = next((r["decode_tok_s"] for r in rows if r["batch_size"] == b and r["path"].startswith("one GPU")), None)
        if base and "decode_tok_s" in row:
            row["over_one_gpu"] = row["decode_tok_s"] / base
        rows.append(row)
        if rank == 0:
            print(row, flush=True)
            save_result(args.name, {"method": "GLM-4-9B architecture, random weights, bf16, 8K static cache, 32-token "
                                              f"prompt, {args.new_tokens} new tokens, median of {args.repeats} runs after "
                                              "a warm-up, tok/s summed over the batch", **result})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
