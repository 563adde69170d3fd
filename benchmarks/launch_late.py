"""When decode attention lets o_proj launch: first thing (as all of glmkit's kernels) or only once its own reads of
q, k and v have arrived (``glmkit.attention.LAUNCH_NEXT_LATE``, the default); GLM-4-9B (random weights) on the
batch-1 fast path, one GPU, one run. Variants take turns, three rounds. Per variant: the CUDA graph of one step
replayed back to back (µs a step) at a 40-, 160- and 280-token cache, and ``decode_speed`` (tok/s of the token loop),
best round, against the roofline of the same run; greedy tokens against the first variant's. "a minimal kernel"
stands in for attention (a kernel that only copies q, benchmarks/step_roles.py).

    PYTHONPATH=.:benchmarks python benchmarks/launch_late.py --checkpoint /tmp/glm9b [--precision fp16]
Writes benchmarks/results/launch_late.json (launch_late_fp16.json; and to $OUT).
"""

from __future__ import annotations

from step_roles import build_variants, load_for_variants, minimal_attention, save_variants, time_variants

VARIANTS = {  # name: (attention launches o_proj late, attention stand-in)
    "launched first thing": (False, None),
    "launched late": (True, None),
    "a minimal kernel": (False, minimal_attention),
}


def main() -> None:
    args, model, bw, roofline = load_for_variants(__doc__.splitlines()[0])
    decoders = build_variants(model, VARIANTS, ("LAUNCH_NEXT_LATE",))
    rows = {v: {"variant": v, "launched_late": late} for v, (late, _) in VARIANTS.items()}
    time_variants(decoders, rows, roofline)
    save_variants("launch_late", __doc__.splitlines()[0], args, bw, roofline, rows)


if __name__ == "__main__":
    main()
