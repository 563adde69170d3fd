"""Two-GPU check of glmkit's push all-reduce (``AllReduce(mode="push")``), under torchrun with 2 processes:
sums equal to NCCL's, eagerly and replayed from a CUDA graph of one token's 81 calls (both sets of slots, several
programs, odd sizes); one token's all-reduce timed for NCCL, torch's one-shot and the push kernel; and
``TPDecoder(allreduce="push")`` on the trained tiny model: the same greedy tokens as with NCCL, in graphs.

    torchrun --nproc-per-node 2 benchmarks/gpu_smoke_push.py     # about 1 minute on 2 H200s
Writes benchmarks/results/allreduce_push.json (and to $OUT) from rank 0.
"""

import os

import torch
import torch.distributed as dist
from push_checks import captured, chain, first_wrong, nccl_sum

from glmkit.allreduce import AllReduce, latency_rows
from glmkit.bench import save_result
from glmkit.loading import load_model
from glmkit.parallel import leave_process_group
from glmkit.tp_decode import TPDecoder

rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)
device = torch.device("cuda", rank)
dist.init_process_group("nccl", device_id=device)
group = dist.group.WORLD
say = print if rank == 0 else (lambda *a, **k: None)

push = AllReduce(group, device, torch.bfloat16, mode="push")
say("push:", push.describe(), flush=True)
ok = push.mode == "push"
gen = torch.Generator(device).manual_seed(rank)
for shape in [(1, 4096), (16, 4096), (3, 4095), (1, 64)] * 25:  # eager: 100 calls
    t = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
    want = t.clone()
    dist.all_reduce(want)
    ok &= torch.equal(push(t), want)
say("eager sums equal NCCL's:", ok, flush=True)


x0 = torch.randn(16, 4096, device=device, dtype=torch.bfloat16, generator=gen)

graph_checks = []
for shape, gap in (((16, 4096), 0), ((1, 4096), 0), ((16, 4096), 20000)):
    x_in = x0[:shape[0]].contiguous()
    # each graph's input stays alive with it: freed, the eager calls below would reuse its memory
    graphs = {name: captured(fn, x_in, gap) for name, fn in (("push", push), ("nccl", nccl_sum))}
    eager_push, eager_nccl = chain(push, x_in.clone(), gap), chain(nccl_sum, x_in.clone(), gap)
    check = {"shape": list(shape), "gap_cycles": gap, "eager_push_vs_nccl": first_wrong(eager_push, eager_nccl),
             "replays": []}
    for _ in range(3):
        for g, *_ in graphs.values():
            g.replay()
        torch.cuda.synchronize()
        check["replays"].append({"push_graph_vs_nccl_eager": first_wrong(graphs["push"][1], eager_nccl),
                                 "nccl_graph_vs_nccl_eager": first_wrong(graphs["nccl"][1], eager_nccl)})
    everyone = [None, None]
    dist.all_gather_object(everyone, check)
    say("graph check:", everyone, flush=True)
    graph_checks.append(everyone)
same = all(r["push_graph_vs_nccl_eager"] is None for ch in graph_checks for c in ch for r in c["replays"])
say("push graphs of 81 calls equal to the same calls run eagerly:", same, flush=True)
counts = torch.stack([push.push["calls"][:4].clone(), push.push["flags"][:4].clone()])
every = [torch.empty_like(counts) for _ in range(2)]
dist.all_gather(every, counts)
say("calls and flags per rank (programs 0-3):", [e.tolist() for e in every], flush=True)

rows = latency_rows(group, device, ["nccl", "symm", "push"], [1, 16])
for r in rows:
    say(r["allreduce"], r["batch_size"], r["ran"][:60], f"{r['in_cuda_graph_us']:.2f} us in a graph", flush=True)

model = load_model(dtype=torch.bfloat16, device_map=f"cuda:{rank}")
prompt = torch.randint(0, 800, (1, 12), device=device, generator=torch.Generator(device).manual_seed(0))
tokens = {}
for mode in ("nccl", "push"):
    dec = TPDecoder(model, max_len=64, group=group, allreduce=mode)
    tokens[mode] = dec.generate(prompt, 24, ignore_eos=True)
    say(mode, dec.allreduce.describe()[:80], flush=True)
say("TPDecoder push tokens identical to nccl:", torch.equal(tokens["push"], tokens["nccl"]), flush=True)
if rank == 0:
    save_result("allreduce_push", {"what": __doc__.splitlines()[0], "eager_equal": bool(ok), "graph_equal": bool(same),
                                   "tp_tokens_equal": bool(torch.equal(tokens["push"], tokens["nccl"])),
                                   "graph_checks": graph_checks,
                                   "latency": rows})
leave_process_group(0)  # under NCCL: graphs captured its all-reduces (see glmkit.parallel)
