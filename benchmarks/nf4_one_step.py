"""The 4-bit batch-1 step through glmkit's batch-1 CUDA kernel (``glmkit.gemv4bit_one``, the default on GPUs of compute
capability 8.0+) against the same step through its Triton per-row kernel, with bf16 beside them: GLM-4-9B (random
weights) on one GPU, one run.

Variants (taking turns, three rounds, so that clock and temperature drift touch them alike): ``CUDA kernel`` (the
default: norms and residual adds folded into the CUDA kernel's launches, launched with programmatic dependent launch
where the GPU has it), ``CUDA kernel, plain launches`` (``pdl=False``), ``Triton kernel`` (the same step built and
run with ``GLMKIT_4BIT_KERNEL=triton``, the default before), ``CUDA kernel, compiled layer`` (``fuse_norms=False``) and
``bf16`` (its default decoder; on Hopper its MLP runs as one CUDA kernel, ``glmkit.mlp16_one``: each row's
``mlp_kernel`` says whether it did). Per variant: the CUDA graph of one step replayed back to back (µs a token, around 160
cached tokens) and ``decode_speed`` (tok/s of the token loop, sampling included), best round; against bf16 in the same run
and the roofline (copy bandwidth / bytes a token reads); the greedy tokens and the logits of one step against the
Triton kernel's, and against the default's (the same kernels launched plainly must give the same bits).

    PYTHONPATH=.:benchmarks python benchmarks/nf4_one_step.py --checkpoint /tmp/glm9b    # about 3 minutes on an H200
Writes benchmarks/results/nf4_one_step.json (or --name; and to $OUT).
"""

from __future__ import annotations

import contextlib

import torch
from nf4_fused import PROMPT, against_reference, best_rounds, kernel_env, mlp_kernel, report, start, take_turns, warmed

VARIANTS = {"CUDA kernel": ("nf4", {}, None), "CUDA kernel, plain launches": ("nf4", {"pdl": False}, None),
            "Triton kernel": ("nf4", {}, "triton"),
            "CUDA kernel, compiled layer": ("nf4", {"fuse_norms": False}, None), "bf16": ("bf16", {}, None)}


def variant_env(variant: str) -> contextlib.AbstractContextManager[None]:
    """What variant ``variant`` runs inside: its ``GLMKIT_4BIT_KERNEL``."""
    return kernel_env(VARIANTS[variant][2])


def main() -> None:
    args, models, bw, rooflines = start(__doc__.splitlines()[0], "nf4_one_step")
    decoders = {}
    for v, (p, options, kernel) in VARIANTS.items():
        with kernel_env(kernel):
            decoders[v] = warmed(models[p], **options)
    rows = {v: {"variant": v, "precision": p, "options": o, "kernel_env": k, "fuses_norms": decoders[v].fuses_norms(1),
                "mlp_kernel": mlp_kernel(decoders[v]), "replay_us": [], "decode_tok_s": []}
            for v, (p, o, k) in VARIANTS.items()}
    take_turns(decoders, rows, around=variant_env)
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    against_reference(decoders, rows, ids, "Triton kernel", "tokens_as_triton", "step_logits_rel_diff_to_triton",
                      around=variant_env)
    against_reference(decoders, rows, ids, "CUDA kernel", "tokens_as_default", "step_logits_rel_diff_to_default",
                      around=variant_env)
    best_rounds(rows, rooflines)
    report(args.name, __doc__.splitlines()[0], rows, bw, rooflines)


if __name__ == "__main__":
    main()
