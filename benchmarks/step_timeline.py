"""Where a decode token's time goes on the GPU, kernel by kernel, as FastDecoder decodes (its defaults: CUDA graph,
PDL, glmkit's kernels): torch.profiler's kernel timestamps over whole tokens (the sampling and the control writes
between graph replays included). Per kernel name: calls and summed duration per token, and the time it *adds* to
the token (its end minus the latest end before it: overlapped work adds nothing, a gap before a kernel counts
against it).

    PYTHONPATH=. python benchmarks/step_timeline.py --checkpoint /tmp/glm9b [--precision bf16 nf4]
Writes benchmarks/results/step_timeline.json (or --name; and to $OUT).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from glmkit.bench import copy_bandwidth, save_result
from glmkit.models import ensure_random_checkpoint

TOKENS = 8


def kernel_rows(prof) -> list[tuple[str, float, float]]:
    rows = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() >= 0:
            rows.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(rows, key=lambda r: r[1])


def timeline(decoder, tokens: int = TOKENS) -> dict:
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 1000, (1, 32), device="cuda")
    for _ in decoder.stream(ids, 4, ignore_eos=True):
        pass
    torch.cuda.synchronize()
    it = decoder.stream(ids, tokens + 2, ignore_eos=True)
    next(it)
    next(it)  # the prefill and the first step happen outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in it:
            pass
        torch.cuda.synchronize()
    rows = kernel_rows(prof)
    span = rows[-1][2] - rows[0][1]
    by = defaultdict(lambda: {"calls": 0, "us": 0.0, "adds_us": 0.0})
    latest = rows[0][1]
    for name, start, end in rows:
        key = name[:70]
        by[key]["calls"] += 1
        by[key]["us"] += end - start
        by[key]["adds_us"] += max(0.0, end - latest)
        latest = max(latest, end)
    steps = tokens
    table = sorted(({"kernel": k, "calls_per_token": v["calls"] / steps, "us_per_token": v["us"] / steps,
                     "adds_us_per_token": v["adds_us"] / steps} for k, v in by.items()),
                   key=lambda r: -r["adds_us_per_token"])
    return {"token_us": span / steps, "kernels_per_token": len(rows) / steps, "kernels": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--precision", nargs="+", default=["bf16", "nf4"])
    ap.add_argument("--name", default="step_timeline", help="the result's name (step_timeline_nf4_fused: nf4 with its "
                                                               "norms folded into the 4-bit GEMVs)")
    args = ap.parse_args()
    from glmkit.fast_decode import FastDecoder
    from glmkit.quantization import load_precision

    ensure_random_checkpoint(args.checkpoint)
    out = {"copy_bandwidth_bytes_s": copy_bandwidth(), "tokens": TOKENS, "runs": {}}
    for precision in args.precision:
        model = load_precision(args.checkpoint, precision, device_map="cuda:0")
        dec = FastDecoder(model, max_len=128)
        run = timeline(dec)
        out["runs"][precision] = run
        print(precision, round(run["token_us"], 1), "us/token,", run["kernels_per_token"], "kernels", flush=True)
        for r in run["kernels"][:14]:
            print(f"   {r['kernel'][:60]:60s} {r['calls_per_token']:6.1f} {r['us_per_token']:8.1f} "
                  f"{r['adds_us_per_token']:8.1f}", flush=True)
        save_result(args.name, out)
        del dec, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
