"""Tensor-parallel fast decode (TP=2, ``TPDecoder``) against one GPU's ``FastDecoder``, in one run, with each all-reduce.

Run under torchrun on two GPUs. Every rank builds GLM-4-9B-Chat with the same random weights (bf16, same seed) on
its GPU. Rank 0 first measures the whole model with ``FastDecoder`` on its GPU alone (uncapped: the baseline) and
records its greedy tokens. Both ranks then time one token's all-reduce, NCCL's, torch's symmetric-memory one-shot
kernel and glmkit's push kernel, eagerly and in a CUDA graph (``glmkit.allreduce``; ``result["allreduce_latency"]``).
Then each rank keeps its shard in a ``TPDecoder`` (the embedding split by vocabulary too), drops the whole model, caps itself at
12 GiB (an RTX 3060's size) and decodes with each ``--allreduce`` mode: 8K static cache, 32-token prompt, 128 new
tokens, median of 3 runs after a warm-up, tok/s summed over the batch. The TP greedy tokens are compared with the
one-GPU ones and across the modes, and a decode step fed host tensors (as a server's runner gives them) is checked
for host-device syncs. Last, batch 1 again with each residual add and norm a kernel of its own
(``TPDecoder(fuse_norms=False)``; ``result["batch1_adds_and_norms_apart"]``): what folding them into the GEMVs gains.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node 2 benchmarks/tp_fast.py
    NCCL_P2P_DISABLE=1 ... benchmarks/tp_fast.py --batches 1 --no-baseline --allreduce nccl --name tp_fast_no_p2p
    torchrun --nproc-per-node 2 benchmarks/tp_fast.py --tiny --name tp_fast_check   # a tiny GLM, CPUs/gloo: a dry run
Writes benchmarks/results/NAME.json from rank 0 (rows keep the path names ``glmkit.results`` reads; each TP row
says its ``allreduce`` and what ran).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import warnings
from typing import Any

import torch
import torch.distributed as dist

from glmkit.allreduce import MODES, AllReduce, latency_rows
from glmkit.bench import save_result
from glmkit.fast_decode import FastDecoder
from glmkit.models import glm4_9b_chat_config, random_model, tiny_glm_config
from glmkit.parallel import init_process_group, leave_process_group
from glmkit.tp_decode import TPDecoder

CARD, CONTEXT = 12 * 2**30, 8192


def speed(decoder: Any, new_tokens: int, repeats: int) -> dict[str, Any]:
    runs = [decoder.tokens_per_second(32, new_tokens)["decode_tok_s"] for _ in range(repeats)]
    return {"decode_tok_s": statistics.median(runs), "runs_tok_s": runs}


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cap_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(CARD / torch.cuda.get_device_properties(device).total_memory, device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def host_input_syncs(decoder: TPDecoder) -> int | None:
    """Host-device syncs CUDA reports in one decode step fed CPU tokens and positions (0 is the goal). Every rank
    runs the step either way (warnings, not errors: a rank that stopped would leave the other in its all-reduce)."""
    b = decoder.batch_size
    tokens, pos = torch.zeros(b, dtype=torch.long), torch.full((b,), 40, dtype=torch.long)
    decoder.decode_step(tokens, pos)  # a first one outside the check
    if decoder.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            decoder.decode_step(tokens, pos)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--allreduce", nargs="+", choices=MODES, default=["nccl", "symm", "push", "auto"],
                    help="all-reduce modes to decode with, in this order (glmkit.results shows the auto rows, TPDecoder's "
                         "default, per batch; without them the fastest mode's)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-GPU FastDecoder rows")
    ap.add_argument("--no-latency", action="store_true", help="skip the all-reduce latency rows")
    ap.add_argument("--no-apart", action="store_true",
                    help="skip the batch-1 run with the residual adds and norms as kernels of their own "
                         "(TPDecoder(fuse_norms=False), to compare with the fused step)")
    ap.add_argument("--tiny", action="store_true", help="a tiny GLM with a 256-token cache (a dry run, CPUs too)")
    ap.add_argument("--name", default="tp_fast")
    args = ap.parse_args()

    group = init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    context = 256 if args.tiny else CONTEXT
    # the same seed on every rank: the same weights
    model = random_model(tiny_glm_config() if args.tiny else glm4_9b_chat_config(), device)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"world_size": world, "context": context, "rows": rows,
                              "env": {k: os.environ.get(k) for k in ("NCCL_P2P_DISABLE", "NCCL_NVLS_ENABLE",
                                                                     "TORCH_SYMM_MEM_DISABLE_MULTICAST")}}

    arch, cache = ("tiny GLM", f"{context}-token") if args.tiny else ("GLM-4-9B", "8K")
    method = (f"{arch} architecture, random weights, bf16, {cache} static cache, 32-token prompt, {args.new_tokens} new "
              f"tokens, median of {args.repeats} runs after a warm-up, tok/s summed over the batch")

    def save() -> None:
        if rank == 0:
            save_result(args.name, {"method": method, **result})

    want = None
    if rank == 0 and not args.no_baseline:
        want = FastDecoder(model, max_len=context, graph_batch_sizes=[1]).generate(ids, 64, ignore_eos=True)[0, 32:]
        for b in args.batches:
            dec = FastDecoder(model, max_len=context, batch_size=b, graph_batch_sizes=[b])
            rows.append({"path": "one GPU (FastDecoder, uncapped)", "batch_size": b, **speed(dec, args.new_tokens,
                                                                                                 args.repeats)})
            print(rows[-1], flush=True)
            del dec
            gc.collect()
            empty_cache()
    dist.barrier()
    if not args.no_latency:
        result["allreduce_latency"] = latency_rows(group, device, ["nccl", "symm", "push"], [1, 16])
        if rank == 0:
            for row in result["allreduce_latency"]:
                print(row, flush=True)
        save()
    hidden = model.config.hidden_size
    allreduces = {mode: AllReduce(group, device, torch.bfloat16, mode=mode, hidden=hidden) for mode in args.allreduce}
    result["allreduce_ran"] = {mode: ar.describe() for mode, ar in allreduces.items()}
    decoder = TPDecoder(model, context, 1, group=group, graph_batch_sizes=[1], allreduce="nccl")
    del model
    gc.collect()
    empty_cache()
    cap_memory(device)
    tokens: dict[str, list[int]] = {}
    for mode, ar in allreduces.items():
        for b in args.batches:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            row: dict[str, Any] = {"path": f"TP={world} (TPDecoder, each card capped at 12 GiB)", "batch_size": b,
                                   "allreduce": mode, "allreduce_ran": ar.describe()}
            try:
                decoder.release()  # the last cache and graphs go first: the weights and one cache fit under the cap
                gc.collect()
                empty_cache()
                decoder = decoder.resized(b, [b], allreduce=ar)
                if b == 1:
                    got = decoder.generate(ids, 64, ignore_eos=True)[0, 32:].cpu()
                    tokens[mode] = got.tolist()
                    if want is not None:
                        row["greedy_tokens_agreeing_with_one_gpu"] = int((got == want.cpu()).cumprod(0).sum())
                row |= speed(decoder, args.new_tokens, args.repeats)
                row["host_input_syncs_per_step"] = host_input_syncs(decoder)
            except torch.OutOfMemoryError as exc:
                row["oom"] = str(exc)[:200]
            peaks: list[Any] = [None] * world
            dist.all_gather_object(peaks, peak_bytes(device))
            row["peak_allocated"] = peaks
            base = next((r["decode_tok_s"] for r in rows if r["batch_size"] == b and r["path"].startswith("one GPU")),
                        None)
            if base and "decode_tok_s" in row:
                row["over_one_gpu"] = row["decode_tok_s"] / base
            rows.append(row)
            if rank == 0:
                print(row, flush=True)
            save()
    if 1 in args.batches and not args.no_apart and allreduces:
        # the same batch-1 step with each add of an all-reduced sum and each norm a kernel of its own (the step before
        # add_norm_gemv), with the last all-reduce mode: what folding them into the GEMVs gains, in the same run
        mode, ar = list(allreduces.items())[-1]
        apart: dict[str, Any] = {"allreduce": mode, "allreduce_ran": ar.describe()}
        try:
            decoder.release()
            gc.collect()
            empty_cache()
            decoder = decoder.resized(1, [1], allreduce=ar)
            decoder.fuse_norms = False  # before its graph is captured (at first use)
            got = decoder.generate(ids, 64, ignore_eos=True)[0, 32:].cpu().tolist()
            apart["greedy_tokens_identical_to_fused"] = got == tokens.get(mode)
            apart |= speed(decoder, args.new_tokens, args.repeats)
            fused = next((r.get("decode_tok_s") for r in rows if r.get("allreduce") == mode and r["batch_size"] == 1),
                         None)
            if fused:
                apart["fused_over_apart"] = fused / apart["decode_tok_s"]
        except torch.OutOfMemoryError as exc:
            apart["oom"] = str(exc)[:200]
        result["batch1_adds_and_norms_apart"] = apart
        if rank == 0:
            print("adds and norms apart:", apart, flush=True)
    if want is not None and tokens:
        first = next(iter(tokens.values()))
        result["greedy_tokens_identical_to_one_gpu"] = first == want.cpu().tolist()
        result["greedy_tokens_agreeing"] = int((torch.tensor(first) == want.cpu()).cumprod(0).sum())
        result["greedy_tokens_identical_across_allreduce"] = all(t == first for t in tokens.values())
    save()
    leave_process_group(0)  # under NCCL: exit without destroying a group whose all-reduces graphs captured


if __name__ == "__main__":
    main()
