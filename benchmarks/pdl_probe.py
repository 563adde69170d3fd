"""Does Hopper's programmatic dependent launch (PDL) shorten a batch-1 decode step? One run on one GPU.

The chain a ``FastDecoder`` token launches, without attention: for each of GLM-4-9B's 40 layers qkv (RMSNorm
folded in), o_proj (residual add folded in), gate_up (norm + SwiGLU) and down_proj (residual), then the lm_head;
random bf16 weights of the exact shapes, one CUDA graph (``glmkit.gemv_tuning.graph_time``), the H200's tuned
launch shapes. Timed both ways, twice, in one run:

- ``pdl=0``: plain launches, each kernel starts when the one before it has finished;
- ``pdl=1``: launched with ``launch_pdl=True``; each kernel lets the next start once all its programs have started,
  and waits (``griddepcontrol.wait``) before it reads what the one before wrote.

(``pdl_probe.json`` also holds ``pdl=2`` rows: each program first asked L2 for its own weight rows, 38% slower; that
variant was taken out of the kernel.)

Against the roofline: copy bandwidth measured in the same run / the bytes the chain reads. Writes
benchmarks/results/pdl_probe.json (and to $OUT). About 1 minute on an H200:

    PYTHONPATH=. python benchmarks/pdl_probe.py
"""

from __future__ import annotations

import argparse

import torch

from glmkit.bench import copy_bandwidth, save_result
from glmkit.gemv import _launch
from glmkit.gemv_tuning import graph_time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--variants", default="0,1,0,1")
    args = ap.parse_args()
    weights = build(args.layers, "cuda")
    n_bytes = sum(t.numel() * t.element_size() for v in weights.values()
                  for t in (v if isinstance(v, list) else [v]))
    bw = copy_bandwidth()
    result = {"what": __doc__.splitlines()[0], "layers": args.layers, "bytes_read": n_bytes,
              "copy_bandwidth_bytes_s": bw, "roofline_ms": n_bytes / bw * 1e3, "rows": []}
    h = torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    for pdl in (int(v) for v in args.variants.split(",")):
        seconds = graph_time(lambda _, pdl=pdl: step(weights, h, pdl), copies=1)
        row = {"pdl": pdl, "ms": seconds * 1e3, "fraction_of_roofline": n_bytes / bw / seconds,
               "read_tb_s": n_bytes / seconds / 1e12}
        result["rows"].append(row)
        print(row, flush=True)
    save_result("pdl_probe", result)


if __name__ == "__main__":
    main()
