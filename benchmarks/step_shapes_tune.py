"""``glmkit tune``'s shapes for the 16-bit CUDA kernels on this card, tuned in the decode step, and what they give
GLM-4-9B: every candidate shape of q/k/v's and o_proj's batch-1 kernel and every ring of the MLP kernel, each in a
decoder of a few GLM-4-9B layers (``glmkit.step_tuning.tune_step``), then GLM-4-9B bf16 (random weights, all 40
layers) decoding one sequence with the untuned default shapes and with the shapes the tune kept, taking turns over 3
rounds in one process (best round each), and the tokens of both.

    PYTHONPATH=.:benchmarks python benchmarks/step_shapes_tune.py      # about 3 minutes on an H200
Writes benchmarks/results/step_shapes_tune.json (or --name; and to $OUT), and the tuned table as ``glmkit tune``
writes it to $OUT/gemv_tuned_step.json (``glmkit.gemv_tuning.write_table``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from nf4_fused import default_against_tuned, gpu_uuids

import glmkit.gemv
from glmkit.bench import save_result
from glmkit.gemv import device_name
from glmkit.gemv_tuning import MARGIN, table_configs, write_table
from glmkit.models import random_model
from glmkit.step_tuning import STEP_LAYERS, tune_step

PROMPT, NEW, MAX_LEN = 32, 256, 296  # the step benchmarks' cache (nf4_decode.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="step_shapes_tune")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_shapes_tune.py measures a GPU; this machine has none.")
    t0 = time.perf_counter()
    rows = tune_step()
    seconds = time.perf_counter() - t0
    if not rows:
        raise SystemExit("the 16-bit CUDA kernels do not run here: nothing to tune.")
    tuned = dict(glmkit.gemv.active_cuda_shapes())
    out = Path(os.environ.get("OUT", "."))
    table = write_table(table_configs(rows), out / "gemv_tuned_step.json", source="benchmarks/step_shapes_tune.py")
    model = random_model()
    decoded = default_against_tuned(model, tuned, PROMPT, NEW, MAX_LEN)
    result = {"what": __doc__.splitlines()[0], "device": device_name(), "gpu_uuids": gpu_uuids(),
              "gpu_note": "read with nvidia-smi in the same call", "table_written": table.name, "margin": MARGIN,
              "step_layers": STEP_LAYERS, "tuning_seconds": seconds, "projections": rows,
              "tuned": [{"kernel": k, "rows": n, "columns": c, **v} for (k, n, c), v in tuned.items()],
              "decode": {"prompt": PROMPT, "new_tokens": NEW, "max_len": MAX_LEN, **decoded}}
    print(result["tuned"], result["decode"], flush=True)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
