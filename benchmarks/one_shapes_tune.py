"""``glmkit tune``'s shapes for the batch-1 4-bit CUDA kernel on this card, and what they give a decoder: every
candidate shape of each GLM-4-9B launch timed (``glmkit.gemv_tuning.tune_one_kernel``), then GLM-4-9B nf4 (random
weights) decoding one sequence with the untuned default shapes and with the shapes the tune kept (a shape other than
the default only where it is ``MARGIN`` faster; the committed run, from before that rule, kept each launch's
fastest), taking turns over 3 rounds in one process (best round each), and the tokens of both.

    PYTHONPATH=.:benchmarks python benchmarks/one_shapes_tune.py --checkpoint /tmp/glm9b     # about 3 minutes, H200
Writes benchmarks/results/one_shapes_tune.json (or --name; and to $OUT), and the tuned table as ``glmkit tune``
writes it to $OUT/gemv_tuned_one.json (``glmkit.gemv_tuning.write_table``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from nf4_fused import default_against_tuned, gpu_uuids

import glmkit.gemv
from glmkit.bench import save_result
from glmkit.gemv import device_name
from glmkit.gemv_tuning import MARGIN, table_configs, tune_one_kernel, write_table
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

PROMPT, NEW, MAX_LEN = 32, 256, 296  # the step benchmarks' cache (nf4_decode.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--name", default="one_shapes_tune")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("one_shapes_tune.py measures a GPU; this machine has none.")
    ensure_random_checkpoint(args.checkpoint)
    rows = tune_one_kernel()
    if not rows:
        raise SystemExit("the batch-1 4-bit CUDA kernel does not run here: nothing to tune.")
    tuned = dict(glmkit.gemv.active_cuda_shapes())
    out = Path(os.environ.get("OUT", "."))
    table = write_table(table_configs(rows), out / "gemv_tuned_one.json", source="benchmarks/one_shapes_tune.py")
    model = load_precision(args.checkpoint, "nf4", device_map="cuda:0")
    decoded = default_against_tuned(model, tuned, PROMPT, NEW, MAX_LEN)
    result = {"what": __doc__.splitlines()[0], "device": device_name(), "gpu_uuids": gpu_uuids(),
              "gpu_note": "read with nvidia-smi in the same call", "table_written": table.name, "margin": MARGIN,
              "projections": rows, "tuned": [{"kernel": k, "rows": n, "columns": c, **v} for (k, n, c), v in tuned.items()],
              "decode": {"prompt": PROMPT, "new_tokens": NEW, "max_len": MAX_LEN, **decoded}}
    print(result["tuned"], result["decode"], flush=True)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
