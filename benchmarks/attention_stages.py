"""The decode-attention kernel at batch 1 on a short cache with its loop over tiles software-pipelined as Triton
does by default (the next tiles' loads issued, through shared memory, before the first tile's product) or not at
all (``glmkit.attention.SHORT_STAGES = 1``: 1208 sm_90 instructions against 1416, 40 KB of shared memory against
135 KB); GLM-4-9B (random weights) on the batch-1 fast path, one GPU, one run. Variants take turns, three rounds.
Per variant: the CUDA graph of one step replayed back to back (µs a step) at a 40-, 160- and 280-token cache, and
``decode_speed`` (tok/s of the token loop), best round, against the roofline of the same run; greedy tokens against
the first variant's. "a minimal kernel" stands in for attention (a kernel that only copies q,
benchmarks/step_roles.py).
The kernel is run without tickets (``step_roles.without_tickets``): one program walks the cache, as it did when
these results were measured; the decoders now split a short cache into tiles side by side (attention_tickets.py).

    PYTHONPATH=.:benchmarks python benchmarks/attention_stages.py --checkpoint /tmp/glm9b [--precision fp16]
Writes benchmarks/results/attention_stages.json (attention_stages_fp16.json; and to $OUT).
"""

from __future__ import annotations

from step_roles import build_variants, load_for_variants, minimal_attention, save_variants, time_variants, without_tickets

VARIANTS = {  # name: (SHORT_STAGES, SHORT_AHEAD, attention stand-in)
    "pipelined (Triton's default)": (None, False, without_tickets),
    "not pipelined (1 stage)": (1, False, without_tickets),
    "1 stage, the next tile read ahead": (1, True, without_tickets),
    "a minimal kernel": (None, False, minimal_attention),
}


def main() -> None:
    args, model, bw, roofline = load_for_variants(__doc__.splitlines()[0])
    decoders = build_variants(model, VARIANTS, ("SHORT_STAGES", "SHORT_AHEAD"))
    rows = {v: {"variant": v, "stages": s, "ahead": a} for v, (s, a, _) in VARIANTS.items()}
    time_variants(decoders, rows, roofline)
    save_variants("attention_stages", __doc__.splitlines()[0], args, bw, roofline, rows)


if __name__ == "__main__":
    main()
