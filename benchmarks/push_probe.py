"""glmkit's push all-reduce protocol (``glmkit.allreduce._push_allreduce_kernel``) with both ranks on ONE GPU: two
streams, two sets of buffers in one memory, each "rank" writing into the other's. Chains of calls (each sum halved,
as ``gpu_smoke_push.py`` runs them over NVLink) eagerly and replayed from CUDA graphs, every call's output checked
against the exact sum, so that a wrong call is found by its number, program and rank.

    PYTHONPATH=. python benchmarks/push_probe.py      # seconds on any GPU with Triton
Writes benchmarks/results/push_probe.json (and to $OUT).
"""

from __future__ import annotations

import torch

from glmkit.allreduce import PUSH_BLOCK, _push_allreduce_kernel
from glmkit.bench import save_result

DEV = torch.device("cuda")
CAP = 16 * PUSH_BLOCK


class Rank:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.data = torch.zeros(4 * CAP, dtype=torch.bfloat16, device=DEV)
        self.flags = torch.zeros(CAP // PUSH_BLOCK, dtype=torch.int32, device=DEV)
        self.calls = torch.zeros(CAP // PUSH_BLOCK, dtype=torch.int32, device=DEV)
        self.stream = torch.cuda.Stream()


def push(me: Rank, peer: Rank, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    _push_allreduce_kernel[(triton_cdiv(n, PUSH_BLOCK),)](x, out, me.data, peer.data, me.flags, peer.flags, me.calls,
                                                         n, CAP, RANK=me.rank, BLOCK=PUSH_BLOCK, PDL=0, ON_GPU=True,
                                                         num_warps=4)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chain(me: Rank, peer: Rank, x: torch.Tensor, calls: int, gap_cycles: int) -> list[torch.Tensor]:
    outs = []
    for _ in range(calls):
        y = push(me, peer, x)
        outs.append(y)
        if gap_cycles:
            torch.cuda._sleep(gap_cycles)
        x = y * 0.5
    return outs


def expected(x0: list[torch.Tensor], calls: int) -> list[torch.Tensor]:
    a, b = x0
    outs = []
    for _ in range(calls):
        s = (a.float() + b.float()).to(torch.bfloat16)
        outs.append(s)
        a = b = s * 0.5
    return outs


def check(outs: list[list[torch.Tensor]], want: list[torch.Tensor]) -> dict:
    bad = []
    for r, per_rank in enumerate(outs):
        for c, (got, w) in enumerate(zip(per_rank, want)):
            if not torch.equal(got, w):
                rows = (got != w).view(-1, ).nonzero().view(-1)
                programs = sorted({int(i) // PUSH_BLOCK for i in rows.tolist()})
                bad.append({"rank": r, "call": c, "wrong_values": int(rows.numel()), "programs": programs[:16],
                            "max_diff": float((got.float() - w.float()).abs().max())})
    return {"all_equal": not bad, "first_wrong": bad[:6], "wrong_calls": len(bad)}


def run(shape: tuple[int, int], calls: int, graph: bool, gap_cycles: int, replays: int = 3) -> dict:
    ranks = [Rank(0), Rank(1)]
    gen = torch.Generator(DEV).manual_seed(0)
    x0 = [torch.randn(shape, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in ranks]
    want = expected(x0, calls)
    torch.cuda.synchronize()
    if not graph:
        outs = [None, None]
        for r, (me, peer) in enumerate([(ranks[0], ranks[1]), (ranks[1], ranks[0])]):
            with torch.cuda.stream(me.stream):
                outs[r] = chain(me, peer, x0[r], calls, gap_cycles)
        torch.cuda.synchronize()
        return {"shape": list(shape), "calls": calls, "graph": False, "gap_cycles": gap_cycles, **check(outs, want)}
    # warm up once eagerly (both ranks), then capture each rank's chain into its own graph
    for r, (me, peer) in enumerate([(ranks[0], ranks[1]), (ranks[1], ranks[0])]):
        with torch.cuda.stream(me.stream):
            chain(me, peer, x0[r], calls, gap_cycles)
    torch.cuda.synchronize()
    graphs, outs = [], []
    for r, (me, peer) in enumerate([(ranks[0], ranks[1]), (ranks[1], ranks[0])]):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=me.stream):
            outs.append(chain(me, peer, x0[r], calls, gap_cycles))
        graphs.append(g)
    results = []
    for _ in range(replays):
        for r, g in enumerate(graphs):
            with torch.cuda.stream(ranks[r].stream):
                g.replay()
        torch.cuda.synchronize()
        results.append(check(outs, want))
    counters = [[rk.calls[:4].tolist(), rk.flags[:4].tolist()] for rk in ranks]
    return {"shape": list(shape), "calls": calls, "graph": True, "gap_cycles": gap_cycles,
            "all_equal": all(r["all_equal"] for r in results), "replays": results, "calls_and_flags": counters}


def load_both_kernels() -> None:
    """Compile and load both ranks' kernels before any runs: loading a module while one rank's kernel spins on the
    GPU waiting for the other's may wait for the GPU to go idle, which it never does."""
    me, peer = Rank(0), Rank(1)
    x = torch.zeros(PUSH_BLOCK, dtype=torch.bfloat16, device=DEV)
    for rank in (0, 1):
        kernel = _push_allreduce_kernel.warmup(x, x, me.data, peer.data, me.flags, peer.flags, me.calls, PUSH_BLOCK,
                                               CAP, RANK=rank, BLOCK=PUSH_BLOCK, PDL=0, ON_GPU=True, num_warps=4,
                                               grid=(1,))
        kernel._init_handles()
    torch.cuda._sleep(10)  # and the other kernels a chain launches
    (x * 0.5).float()
    torch.cuda.synchronize()


def main() -> None:
    load_both_kernels()
    rows = []
    for shape in [(1, 4096), (16, 4096)]:
        for graph in (False, True):
            for calls in (1, 2, 3, 81):
                for gap in ((0, 20000) if graph and calls == 81 else (0,)):
                    row = run(shape, calls, graph, gap)
                    print({k: v for k, v in row.items() if k != "replays"}, flush=True)
                    rows.append(row)
    save_result("push_probe", {"what": __doc__.splitlines()[0], "rows": rows})


if __name__ == "__main__":
    main()
