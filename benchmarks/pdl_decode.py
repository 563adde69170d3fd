"""Programmatic dependent launch (PDL) on the batch-1 fast path of GLM-4-9B (random weights, bf16), one GPU, one run.

``FastDecoder``'s batch-1 step (Triton GEMVs with the norms and residual adds folded in, glmkit's attention kernel,
one CUDA graph) with its layer compiled (``compile=True``: no PDL, torch.compile's analysis of the kernels refuses
it), uncompiled without and with PDL (``pdl=``, ``glmkit.gemv.dependent_launches``: each kernel lets the next one
launch and waits for it before reading what it wrote), and the default (uncompiled, PDL where supported). On the
fused path the compiled layer runs the same Triton kernels. Tok/s against the roofline of the same run (copy
bandwidth / bytes a token reads), and each variant's greedy tokens against ``generate()``'s.

    PYTHONPATH=. python benchmarks/pdl_decode.py --checkpoint /tmp/glm9b     # about 3 minutes on an H200
Writes benchmarks/results/pdl_decode.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from glmkit.bench import bytes_read_per_token, copy_bandwidth, load_random_9b, measure_decode, save_result
from glmkit.fast_decode import FastDecoder, decoder_layer

VARIANTS = {"compiled": {"compile": True}, "uncompiled": {"compile": False, "pdl": False},
            "uncompiled+pdl": {"compile": False, "pdl": True}, "default": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--variants", default="compiled,uncompiled,uncompiled+pdl,default")
    ap.add_argument("--name", default="pdl_decode")
    args = ap.parse_args()
    model = load_random_9b(args.checkpoint)
    bw = copy_bandwidth()
    per_token = bytes_read_per_token(model)
    result = {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": bw, "bytes_read_per_token": per_token,
              "roofline_tok_s": bw / per_token, "rows": []}
    ids = torch.randint(0, 1000, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.inference_mode():
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, min_new_tokens=48,
                                   do_sample=False)[0, 32:].tolist()
    for name in args.variants.split(","):
        options = VARIANTS[name]
        row = {"variant": name, **options}
        with warnings.catch_warnings(record=True) as caught:  # a fallback (a kernel that failed) warns
            warnings.simplefilter("always")
            try:
                measure_decode(model, "fast", 1, 32, 32, fast_options=options)  # warm-up
                row.update(measure_decode(model, "fast", 1, 32, args.new_tokens, fast_options=options))
                row["fraction_of_roofline"] = row["decode_tok_s"] / result["roofline_tok_s"]
                decoder = FastDecoder(model, max_len=96, **options)
                tokens = decoder.generate(ids, 48, ignore_eos=True)[0, 32:].tolist()
                row["uses_pdl"], row["compiled_step"] = decoder.uses_pdl(1), decoder.layer_fn_for(1) is not decoder_layer
                same = [a == b for a, b in zip(tokens, reference)]
                row["tokens_as_generate"] = {"identical_prefix": same.index(False) if False in same else len(same),
                                             "identical_positions": sum(same), "of": len(same)}
            except Exception as exc:  # e.g. the compiled layer refusing launch_pdl
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        row["warnings"] = sorted({str(w.message)[:300] for w in caught if "fall" in str(w.message).lower()
                                  or "instead" in str(w.message).lower()})
        result["rows"].append(row)
        print(row, flush=True)
        save_result(args.name, result)


if __name__ == "__main__":
    main()
