"""Does Hopper's programmatic dependent launch (PDL) shorten a batch-1 decode step? One run on one GPU.

The chain a ``FastDecoder`` token launches, without attention: for each of GLM-4-9B's 40 layers qkv (RMSNorm
folded in), o_proj (residual add folded in), gate_up (norm + SwiGLU) and down_proj (residual), then the lm_head;
random bf16 weights of the exact shapes, one CUDA graph, the H200's tuned launch shapes. Timed three ways in one run:

- ``pdl=0``: today's launches, each kernel starts when the one before it has finished;
- ``pdl=1``: launched with ``launch_pdl=True``; each kernel lets the next start once all its programs have started,
  and waits (``griddepcontrol.wait``) before it reads what the one before wrote;
- ``pdl=2``: as 1, and each program first asks L2 for its own weight rows (they do not depend on the kernel before),
  so the start of the next kernel's reads overlaps the end of this one's.

Against the roofline: copy bandwidth measured in the same run / the bytes the chain reads. Writes
benchmarks/results/pdl_probe.json (and to $OUT). About 1 minute on an H200:

    PYTHONPATH=. python benchmarks/pdl_probe.py
"""

from __future__ import annotations

import argparse

import torch

from glmkit.bench import copy_bandwidth, environment_record, save_result
from glmkit.gemv import _launch

LAYERS, HIDDEN, QKV, MLP, VOCAB = 40, 4096, 4608, 13696, 151552


def build(layers: int, device: str) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02
    return {"qkv": [w(QKV, HIDDEN) for _ in range(layers)], "o": [w(HIDDEN, HIDDEN) for _ in range(layers)],
            "gate_up": [w(2 * MLP, HIDDEN) for _ in range(layers)], "down": [w(HIDDEN, MLP) for _ in range(layers)],
            "norm": torch.ones(HIDDEN, device=device, dtype=torch.bfloat16) + 0.01, "lm_head": w(VOCAB, HIDDEN)}


def step(weights: dict, h: torch.Tensor, pdl: int) -> torch.Tensor:
    g = weights["norm"]
    for i in range(len(weights["qkv"])):
        qkv = _launch(h, weights["qkv"][i], None, swiglu=False, config=None, norm_weight=g, pdl=pdl)
        h = _launch(qkv[..., :HIDDEN], weights["o"][i], None, swiglu=False, config=None, residual=h, pdl=pdl)
        act = _launch(h, weights["gate_up"][i], None, swiglu=True, config=None, norm_weight=g, pdl=pdl)
        h = _launch(act, weights["down"][i], None, swiglu=False, config=None, residual=h, pdl=pdl)
    return _launch(h, weights["lm_head"], None, swiglu=False, config=None, norm_weight=g, pdl=pdl)


def time_chain(weights: dict, pdl: int, replays: int = 20) -> tuple[float, torch.Tensor]:
    h = torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(weights, h, pdl)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(weights, h, pdl)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / replays)
    del graph
    return sorted(times)[len(times) // 2], out.float().clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--variants", default="0,1,2,0")
    args = ap.parse_args()
    weights = build(args.layers, "cuda")
    n_bytes = sum(t.numel() * t.element_size() for v in weights.values()
                  for t in (v if isinstance(v, list) else [v]))
    bw = copy_bandwidth()
    result = {"what": __doc__.splitlines()[0], "layers": args.layers, "bytes_read": n_bytes,
              "copy_bandwidth_bytes_s": bw, "roofline_ms": n_bytes / bw * 1e3, "rows": [],
              **environment_record()}
    reference = None
    for pdl in (int(v) for v in args.variants.split(",")):
        seconds, out = time_chain(weights, pdl)
        reference = out if reference is None else reference
        row = {"pdl": pdl, "ms": seconds * 1e3, "fraction_of_roofline": n_bytes / bw / seconds,
               "read_tb_s": n_bytes / seconds / 1e12, "same_output": bool(torch.equal(out, reference))}
        result["rows"].append(row)
        print(row, flush=True)
    save_result("pdl_probe", result)


if __name__ == "__main__":
    main()
