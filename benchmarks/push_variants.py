"""Two GPUs: glmkit's push all-reduce in CUDA graphs, call by call. Under torchrun with 2 processes: chains of 81
calls (each sum halved) replayed from CUDA graphs and run eagerly, for the library's kernel (without and with PDL)
and a variant that reads the peer's partial volatile, then beside NCCL graphs and eager calls in several orders;
each call's output against NCCL's, and the first wrong call with its programs and largest error per rank.

    torchrun --nproc-per-node 2 benchmarks/push_variants.py     # about a minute on 2 H200s
The first "beside" order frees the graph's input tensor before the eager calls: they reuse its memory and the
replays read it (wrong from the first call: the check's mistake that gpu_smoke_push.py once made, not the kernel's).
Writes benchmarks/results/push_variants.json (and to $OUT) from rank 0.
"""

import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from push_checks import captured, chain, first_wrong, nccl_sum

from glmkit.allreduce import PUSH_BLOCK, AllReduce
from glmkit.bench import save_result
from glmkit.gemv import dependent_launches
from glmkit.parallel import leave_process_group


@triton.jit
def _volatile_read_kernel(x_ptr, out_ptr, mine_ptr, peer_ptr, my_flags, peer_flags, calls, N, CAP,
                          RANK: tl.constexpr, BLOCK: tl.constexpr):
    # glmkit.allreduce._push_allreduce_kernel on a GPU without PDL, but the peer's partial read volatile (not .cg)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    call = tl.load(calls + pid) + 1
    tl.debug_barrier()
    tl.store(calls + pid, call)
    base = (call % 2) * 2 * CAP
    tl.store(peer_ptr + base + RANK * CAP + offs, x, mask=ok)
    tl.inline_asm_elementwise("fence.acq_rel.sys; mov.u32 $0, 0;", "=r,r", [pid], dtype=tl.int32, is_pure=False,
                              pack=1)
    tl.debug_barrier()
    tl.atomic_xchg(peer_flags + pid, call, sem="release", scope="sys")
    seen = tl.atomic_add(my_flags + pid, 0, sem="acquire", scope="sys")
    while seen < call:
        seen = tl.atomic_add(my_flags + pid, 0, sem="acquire", scope="sys")
    tl.debug_barrier()
    other = tl.load(mine_ptr + base + (1 - RANK) * CAP + offs, mask=ok, other=0.0, volatile=True)
    if RANK == 0:
        total = x.to(tl.float32) + other.to(tl.float32)
    else:
        total = other.to(tl.float32) + x.to(tl.float32)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


def main() -> None:
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=device)
    say = print if rank == 0 else (lambda *a, **k: None)
    ar = AllReduce(dist.group.WORLD, device, torch.bfloat16, mode="push")
    say("push:", ar.describe(), flush=True)
    p = ar.push

    def with_pdl(t):
        with dependent_launches():
            return ar(t)

    def volatile_read(t):
        out = torch.empty_like(t)
        _volatile_read_kernel[(triton.cdiv(t.numel(), PUSH_BLOCK),)](
            t, out, p["data"], p["peer_data"], p["flags"], p["peer_flags"], p["calls"], t.numel(), p["cap"],
            RANK=p["rank"], BLOCK=PUSH_BLOCK, num_warps=4)
        return out

    variants = {"library": ar, "library, PDL": with_pdl, "volatile read": volatile_read}

    x0 = torch.randn(16, 4096, device=device, dtype=torch.bfloat16, generator=torch.Generator(device).manual_seed(rank))
    want = chain(nccl_sum, x0.clone())
    rows = []
    for name, fn in variants.items():
        eager = first_wrong(chain(fn, x0.clone()), want)
        g, outs, inp = captured(fn, x0)
        replays = []
        for _ in range(3):
            g.replay()
            torch.cuda.synchronize()
            replays.append(first_wrong(outs, want))
        data = p["data"].view(2, 2, -1)[:, :, :4].float().tolist()  # [set][slot][first 4 values]
        mine = {"variant": name, "eager_first_wrong": eager, "graph_first_wrong": replays,
                "call0": {"got": outs[0].view(-1)[:4].float().tolist(), "want": want[0].view(-1)[:4].float().tolist(),
                          "x_mine": x0.view(-1)[:4].float().tolist(), "data_sets_slots": data,
                          "calls": p["calls"][:2].tolist(), "flags": p["flags"][:2].tolist()}}
        both = [None, None]
        dist.all_gather_object(both, mine)
        say(both, flush=True)
        rows.append(both)
        del g, inp
    # the library's kernel beside a CUDA graph of NCCL's all-reduce (gpu_smoke_push.py captures and replays both)
    beside = []
    for order in ("push graph captured, its input tensor freed, the same calls run eagerly, then push replayed",
                  "push graph captured, then the same calls run eagerly, then push replayed",
                  "push and NCCL graphs captured, then both chains run eagerly, then both replayed",
                  "push graph, then an NCCL graph captured: push replayed alone",
                  "push graph, then an NCCL graph captured: both replayed",
                  "NCCL graph captured first: both replayed"):
        first_nccl = order.startswith("NCCL")
        if first_nccl:
            gn, outs_n, inp_n = captured(nccl_sum, x0)
        gp, outs_p, inp_p = captured(ar, x0)
        if not first_nccl:
            gn, outs_n, inp_n = captured(nccl_sum, x0)
        if "freed" in order:  # a graph reads its input where it was at capture: the eager calls reuse that memory
            del inp_p
        if "eagerly" in order:
            eager_p = chain(ar, x0.clone())
            eager_n = chain(nccl_sum, x0.clone()) if "both chains" in order else want
            torch.cuda.synchronize()
            if first_wrong(eager_p, want) or first_wrong(eager_n, want):
                say("the eager chains in between differ from the first NCCL chain", flush=True)
        found = []
        for _ in range(3):
            gp.replay()
            if "both" in order:
                gn.replay()
            torch.cuda.synchronize()
            found.append({"push": first_wrong(outs_p, want), "nccl": first_wrong(outs_n, want) if "both" in order
                          else "not replayed"})
        both = [None, None]
        dist.all_gather_object(both, {"order": order, "replays": found})
        say(both, flush=True)
        beside.append(both)
        del gp, gn, inp_n
    if rank == 0:
        save_result("push_variants", {"what": __doc__.splitlines()[0], "rows": rows, "beside_nccl_graphs": beside})
    leave_process_group(0)


if __name__ == "__main__":
    main()
