"""Where glmkit's 4-bit CUDA kernel (``glmkit.gemv4bit_mma``) spends its time: Nsight Compute on GLM-4-9B's gate_up
(SwiGLU) at 1 and 4 vectors, the shipped launch shape, clocks left alone. Keeps speed-of-light, occupancy and
instruction figures and the average stall reasons per issued instruction (what a warp waits on).

    PYTHONPATH=. python benchmarks/nf4_mma_ncu.py          # about a minute on an H200
Writes benchmarks/results/nf4_mma_ncu.json (and to $OUT).
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

from glmkit.bench import save_result

VECTORS = (1, 4)
METRICS = ("Duration", "DRAM Throughput", "L1/TEX Cache Throughput", "Issued Warp Per Scheduler",
           "Eligible Warps Per Scheduler", "Achieved Active Warps Per SM", "Executed Instructions",
           "Registers Per Thread")


def target() -> None:
    """The launches profiled: gate_up with SwiGLU at each of VECTORS vectors, three times each (the third counts)."""
    import torch

    from glmkit import gemv4bit_mma
    from glmkit.gemv4bit import quantize

    torch.manual_seed(0)
    w = quantize(torch.randn(27392, 4096, device="cuda", dtype=torch.bfloat16) * 0.02, "nf4")
    for vectors in VECTORS:
        x = torch.randn(vectors, 1, 4096, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            gemv4bit_mma.gemv_4bit_mma(x, (w,), None, True)
    torch.cuda.synchronize()


def kernel_figures(body: str, metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """One kernel's figures from its part of an ``ncu`` text report: each of ``metrics`` (its unit in the key), and
    the average stall reasons per issued instruction (those of 0.05 or more, the largest first)."""
    row: dict[str, Any] = {}
    for metric in metrics:
        m = re.search(r"\n\s+" + re.escape(metric) + r"\s+(\S+)?\s+([\d,\.]+)\s*\n", body)
        if m:
            unit = m.group(1) or ""
            row[(metric + (" " + unit if unit and not unit[0].isdigit() else "")).strip()] = \
                float(m.group(2).replace(",", ""))
    stalls = dict(re.findall(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio\s+"
                             r"(?:[a-z/_%]+\s+)?([\d\.]+)", body))
    row["stalls per issued instruction"] = {k: float(v) for k, v in sorted(stalls.items(), key=lambda kv:
                                                                           -float(kv[1])) if float(v) >= 0.05}
    return row


def parse(text: str) -> list[dict[str, Any]]:
    return [{"vectors": vectors, **kernel_figures(body)}
            for vectors, body in zip(VECTORS, re.split(r"\n  glmkit_gemv4_mma \(", text)[1:])]


def main() -> None:
    if sys.argv[1:] == ["--target"]:
        return target()
    cmd = ["ncu", "--clock-control", "none", "-k", "regex:gemv4_mma", "--launch-skip", "2", "--launch-count", "4",
           "--section", "SpeedOfLight", "--section", "Occupancy", "--section",
           "SchedulerStats", "--section", "InstructionStats", "--section", "LaunchStats", "--metrics",
           "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio", sys.executable, __file__, "--target"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    text = run.stdout
    if run.returncode:
        raise SystemExit(f"ncu failed ({run.returncode}): {run.stderr[-2000:]}{text[-2000:]}")
    # the launches counted: the third of each vector count (launch-skip 2, then 4: the 3rd, 4th, 5th, 6th)
    blocks = re.split(r"(?=\n  glmkit_gemv4_mma \()", text)
    kept = "".join(blocks[i] for i in (0, 1, 4) if i < len(blocks))
    rows = parse(kept)
    save_result("nf4_mma_ncu", {"what": __doc__.splitlines()[0], "rows": rows})
    print(rows, flush=True)


if __name__ == "__main__":
    main()
