"""One GPU vs a 2-GPU layer split vs 2-GPU tensor parallelism for GLM-4-9B-Chat (random weights, bf16).

Needs a machine with 2 GPUs (the multi-GPU measurement issue). Each mode runs ``glmkit bench`` in its own
process(es): decode tok/s at batch 1 and 8 (plain generate()), time to first token (prefill of a 512-token
prompt) and peak memory per GPU.

    python benchmarks/tensor_parallel.py --checkpoint /tmp/glm9b
Writes benchmarks/results/tensor_parallel.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from glmkit.bench import save_result
from glmkit.models import ensure_random_checkpoint

MODES = {"one GPU": [], "2-GPU layer split": ["--device-map", "20,20"], "2-GPU tensor parallel": ["--tp", "2"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=512)
    args = ap.parse_args()
    ensure_random_checkpoint(args.checkpoint)
    rows = []
    for mode, extra in MODES.items():
        for batch in args.batches:
            cmd = [sys.executable, "-m", "glmkit.cli", "bench", "--model", args.checkpoint, "--dtype", "bfloat16",
                   "--batch", str(batch), "--prompt-len", str(args.prompt_len), "--new-tokens", "128", "--json", *extra]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"error": out.stderr[-800:]}
            row |= {"mode": mode, "batch_size": batch}
            rows.append(row)
            print(row, flush=True)
            save_result("tensor_parallel", {"method": "glmkit bench: plain generate(), bf16, 128 new tokens", "runs": rows})


if __name__ == "__main__":
    main()
