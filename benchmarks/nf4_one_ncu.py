"""Where glmkit's batch-1 CUDA 4-bit kernel (``glmkit.gemv4bit_one``) spends its time: Nsight Compute on GLM-4-9B's
gate_up (SwiGLU), o_proj and down_proj shapes at the shipped launch shapes, clocks left alone. Keeps speed-of-light,
scheduler and shared-memory figures and the average stall reasons per issued instruction (what a warp waits on).

    PYTHONPATH=. python benchmarks/nf4_one_ncu.py          # under a minute on an H200
Writes benchmarks/results/nf4_one_ncu.json (or --name; and to $OUT).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

from nf4_mma_ncu import kernel_figures

from glmkit.bench import save_result

SHAPES = {"gate_up": (27392, 4096, True), "o_proj": (4096, 4096, False), "down_proj": (4096, 13696, False)}
METRICS = ("Duration", "DRAM Throughput", "Issued Warp Per Scheduler", "Eligible Warps Per Scheduler",
           "Registers Per Thread", "smsp__inst_executed.sum", "smsp__inst_executed_op_shared_ld.sum",
           "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
           "dram__bytes_read.sum")


def target() -> None:
    """The launches profiled: each of SHAPES three times (the third counts)."""
    import torch

    from glmkit import gemv4bit_one
    from glmkit.gemv4bit import quantize

    torch.manual_seed(0)
    for n, k, swiglu in SHAPES.values():
        w = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, "nf4")
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            gemv4bit_one.gemv_4bit_one(x, (w,), None, swiglu)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="store_true", help=argparse.SUPPRESS)  # (the process ncu profiles)
    ap.add_argument("--name", default="nf4_one_ncu")
    args = ap.parse_args()
    if args.target:
        return target()
    metrics = ",".join(["regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"]
                       + [m for m in METRICS if "__" in m])
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    cmd = [ncu, "--clock-control", "none", "-k", "regex:gemv4_one", "--launch-count", str(3 * len(SHAPES)),
           "--section", "SpeedOfLight", "--section", "SchedulerStats", "--section", "LaunchStats", "--metrics",
           metrics, sys.executable, __file__, "--target"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"ncu failed ({run.returncode}): {run.stderr[-2000:]}{run.stdout[-2000:]}")
    blocks = re.split(r"(?=\n  glmkit_gemv4_one \()", run.stdout)[1:]
    rows = [{"projection": name, **kernel_figures(blocks[3 * i + 2], METRICS)} for i, name in enumerate(SHAPES)]
    save_result(args.name, {"what": __doc__.splitlines()[0], "rows": rows})
    print(rows, flush=True)


if __name__ == "__main__":
    main()
