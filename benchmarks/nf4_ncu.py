"""What holds glmkit's batch-1 4-bit GEMV back: Nsight Compute on it and on the bf16 GEMV, GLM-4-9B's gate_up
(SwiGLU) and o_proj shapes (``nf4_ncu_target.py`` launches them; the fourth to seventh launches are profiled), with
the clocks left alone (``--clock-control none``). Keeps each kernel's speed-of-light, memory, scheduler, occupancy
and instruction figures.

    PYTHONPATH=. python benchmarks/nf4_ncu.py     # about a minute on an H200 (ncu replays each kernel 18 times)
    PYTHONPATH=. python benchmarks/nf4_ncu.py --from-report ncu.txt     # from a saved report instead
Writes benchmarks/results/nf4_ncu.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from glmkit.bench import save_result

SECTIONS = ("SpeedOfLight", "WarpStateStats", "SchedulerStats", "Occupancy", "MemoryWorkloadAnalysis", "LaunchStats",
            "InstructionStats")
# the launches profiled, in the target's order
KERNELS = (("nf4", "gate_up (SwiGLU)"), ("nf4", "o_proj"), ("bf16", "gate_up (SwiGLU)"), ("bf16", "o_proj"))
METRICS = ("Duration", "DRAM Throughput", "L1/TEX Cache Throughput", "L2 Cache Throughput", "Memory Throughput",
           "Compute (SM) Throughput", "L1/TEX Hit Rate", "Registers Per Thread", "Achieved Occupancy",
           "Warp Cycles Per Issued Instruction", "Issued Warp Per Scheduler", "Executed Instructions", "Grid Size",
           "Block Size")


def parse_report(text: str) -> list[dict[str, Any]]:
    """One row per profiled kernel of an ``ncu`` text report: its name, what it multiplies (``KERNELS``) and each of
    ``METRICS`` keyed by name and unit (``"Duration us"``, ``"DRAM Throughput %"``)."""
    blocks = re.split(r"\n  (_gemv\w*) \(", text)[1:]
    rows = []
    for (weights, projection), kernel, body in zip(KERNELS, blocks[::2], blocks[1::2]):
        row: dict[str, Any] = {"kernel": kernel, "weights": weights, "projection": projection}
        for metric in METRICS:
            m = re.search(r"\n\s+" + re.escape(metric) + r"\s+(\S+)?\s+([\d,\.]+)\s*\n", body)
            if m:
                unit = m.group(1) or ""
                key = (metric + (" " + unit if unit and not unit[0].isdigit() else "")).strip()
                row[key] = float(m.group(2).replace(",", ""))
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-report", type=Path, help="parse this saved `ncu` text report instead of running ncu")
    args = ap.parse_args()
    if args.from_report:
        text = args.from_report.read_text()
    else:
        cmd = ["ncu", "--clock-control", "none", "-k", "regex:_gemv", "--launch-skip", "4", "--launch-count", "4",
               *[a for s in SECTIONS for a in ("--section", s)], sys.executable,
               str(Path(__file__).with_name("nf4_ncu_target.py"))]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = parse_report(text)
    nf4 = next(r for r in rows if r["weights"] == "nf4")
    save_result("nf4_ncu", {
        "what": "Nsight Compute (ncu --clock-control none) on glmkit's per-row 4-bit GEMV and the bf16 GEMV, GLM-4-9B's "
                "gate_up and o_proj shapes at batch 1 (benchmarks/nf4_ncu_target.py)",
        "rows": rows,
        "finding": f"The 4-bit gate_up kernel keeps L1/TEX {nf4['L1/TEX Cache Throughput %']:.0f}% busy while DRAM is "
                   f"{nf4['DRAM Throughput %']:.0f}% busy: it is bound inside the SM, not by memory."})


if __name__ == "__main__":
    main()
