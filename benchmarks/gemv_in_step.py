"""Launch shapes of the small projections (q/k/v and o_proj) timed inside the decode step, not alone: GLM-4-9B
(random weights) on the batch-1 fast path, one GPU, one run.

The shipped tables time each shape back to back on its own (``glmkit tune``). In a step the same kernel starts while
the kernel before is finishing (programmatic dependent launch) and the next one waits on it, and at batch 1 q/k/v and
o_proj take a step's time at about 76% of the copy bandwidth (``step_roles.json``) against 96-97% for gate/up and
down. Here each candidate shape of one projection replaces the table's while a decoder is built (its CUDA graph keeps
it), and one replay-timed step at a 160-token cache scores it; the best of each projection, and both together, then
run against the table's shapes in turns (``step_roles.time_variants``: 40/160/280-token caches, three rounds, tok/s
against the roofline of the same run, greedy tokens against the table's).

    PYTHONPATH=.:benchmarks python benchmarks/gemv_in_step.py --checkpoint /tmp/glm9b [--precision fp16]
Writes benchmarks/results/gemv_in_step.json (gemv_in_step_fp16.json; and to $OUT).
"""

from __future__ import annotations

import itertools

import torch
from step_roles import build, build_variants, load_for_variants, save_variants, step_us, time_variants

import glmkit.gemv
from glmkit.gemv import GemvConfig, active_table, kernel_name

SHAPES = {"qkv": (4608, 4096), "o_proj": (4096, 4096)}  # GLM-4-9B's rows and columns of each projection
CANDIDATES = [GemvConfig(n, k, w) for n, k, w in itertools.product((1, 2, 4, 8), (512, 1024, 2048), (2, 4))]
SCORE_POSITION = 160


def score(model: torch.nn.Module, key: tuple[str, int, int], config: GemvConfig) -> float:
    """µs of one step (its CUDA graph replayed at SCORE_POSITION) with ``config`` for the weight ``key``."""
    table = active_table()
    shipped = table.get(key)
    table[key] = config
    try:
        decoder = build(model)
    finally:
        table[key] = shipped
    us = step_us(decoder, SCORE_POSITION)
    del decoder
    torch.cuda.empty_cache()
    return us


def main() -> None:
    args, model, bw, roofline = load_for_variants(__doc__.splitlines()[0])
    kernel = kernel_name(model.dtype)
    table = active_table()
    keys = {p: (kernel, *shape) for p, shape in SHAPES.items()}
    shipped = {p: table.get(key) for p, key in keys.items()}
    sweep, best = [], {}
    for p, key in keys.items():
        for config in CANDIDATES:
            us = score(model, key, config)
            sweep.append({"projection": p, **config.__dict__, "step_us": us, "shipped": config == shipped[p]})
            print(sweep[-1], flush=True)
        best[p] = min((r for r in sweep if r["projection"] == p), key=lambda r: r["step_us"])
    best_cfg = {p: GemvConfig(r["block_n"], r["block_k"], r["num_warps"]) for p, r in best.items()}
    variants = {  # name: {projection: config}
        "shipped shapes": {},
        "best q/k/v shape": {"qkv": best_cfg["qkv"]},
        "best o_proj shape": {"o_proj": best_cfg["o_proj"]},
        "both best shapes": best_cfg,
    }
    decoders = {}
    for v, configs in variants.items():
        for p, config in configs.items():
            table[keys[p]] = config
        decoders |= build_variants(model, {v: (None,)}, ())
        for p in configs:
            table[keys[p]] = shipped[p]
    rows = {v: {"variant": v, "configs": {p: (configs.get(p) or shipped[p]).__dict__ for p in SHAPES}}
            for v, configs in variants.items()}
    time_variants(decoders, rows, roofline)
    save_variants("gemv_in_step", __doc__.splitlines()[0], args, bw, roofline,
                  {**rows, "sweep": {"variant": "sweep", "score_position": SCORE_POSITION, "rows": sweep}})


if __name__ == "__main__":
    assert glmkit.gemv.triton is not None
    main()
