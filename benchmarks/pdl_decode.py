"""Programmatic dependent launch (PDL) on the batch-1 fast path of GLM-4-9B (random weights, bf16), one GPU, one run.

``FastDecoder``'s default step (Triton GEMVs with the norms and residual adds folded in, glmkit's attention kernel,
one CUDA graph) four ways: the layer compiled or not, each with and without PDL (``glmkit.gemv.PDL``: each kernel
lets the next one launch and waits for it before reading what it wrote). On the fused path the compiled layer runs
the same Triton kernels, so the uncompiled one loses nothing in the graph, and only Triton's own launcher (not the
compiled layer's) is known to pass PDL on. Tok/s against the roofline of the same run (copy bandwidth / bytes a
token reads), and each variant's greedy tokens against the first's.

    PYTHONPATH=. python benchmarks/pdl_decode.py --checkpoint /tmp/glm9b     # about 3 minutes on an H200
Writes benchmarks/results/pdl_decode.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import warnings

import torch

import glmkit.gemv
from glmkit.bench import bytes_read_per_token, copy_bandwidth, load_random_9b, measure_decode, save_result
from glmkit.fast_decode import FastDecoder

VARIANTS = {"compiled": ({}, 0), "compiled+pdl": ({}, 1), "eager": ({"compile": False}, 0),
            "eager+pdl": ({"compile": False}, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--variants", default="compiled,eager,eager+pdl,compiled+pdl")
    args = ap.parse_args()
    model = load_random_9b(args.checkpoint)
    bw = copy_bandwidth()
    per_token = bytes_read_per_token(model)
    result = {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": bw, "bytes_read_per_token": per_token,
              "roofline_tok_s": bw / per_token, "rows": []}
    ids = torch.randint(0, 1000, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    reference = None
    for name in args.variants.split(","):
        options, pdl = VARIANTS[name]
        glmkit.gemv.PDL = pdl
        row = {"variant": name, "pdl": pdl, **options}
        with warnings.catch_warnings(record=True) as caught:  # a fallback (a kernel that failed) warns
            warnings.simplefilter("always")
            try:
                measure_decode(model, "fast", 1, 32, 32, fast_options=options)  # warm-up
                row.update(measure_decode(model, "fast", 1, 32, args.new_tokens, fast_options=options))
                row["fraction_of_roofline"] = row["decode_tok_s"] / result["roofline_tok_s"]
                decoder = FastDecoder(model, max_len=96, **options)
                tokens = decoder.generate(ids, 48, ignore_eos=True)[0, 32:].tolist()
                reference = reference or tokens
                row["same_tokens_as_first"] = tokens == reference
            except Exception as exc:  # e.g. the compiled layer refusing launch_pdl
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        row["warnings"] = sorted({str(w.message)[:300] for w in caught if "fall" in str(w.message).lower()
                                  or "instead" in str(w.message).lower()})
        result["rows"].append(row)
        print(row, flush=True)
        save_result("pdl_decode", result)
    glmkit.gemv.PDL = 0


if __name__ == "__main__":
    main()
