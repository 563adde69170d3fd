"""The decode-attention kernel at batch 1 on a short cache walked by one program per KV head, tile after tile, or
split into tiles side by side, one program each (``tickets``, ``glmkit.attention.TICKET_TILE``), combined in the same
kernel by the last program to finish; GLM-4-9B (random weights) on the batch-1 fast path, one GPU, one run. Variants
take turns, three rounds (``step_roles.time_variants``): µs a step (the CUDA graph of one step replayed back to back)
at a 40-, 160- and 280-token cache, and ``decode_speed`` (tok/s of the token loop), best round, against the roofline
of the same run; greedy tokens against the first variant's. "a minimal kernel" stands in for attention (a kernel
that only copies q, benchmarks/step_roles.py).

    PYTHONPATH=.:benchmarks python benchmarks/attention_tickets.py --checkpoint /tmp/glm9b [--precision fp16]
Writes benchmarks/results/attention_tickets.json (attention_tickets_fp16.json; and to $OUT).
"""

from __future__ import annotations

from step_roles import build_variants, load_for_variants, minimal_attention, save_variants, time_variants, without_tickets

VARIANTS = {  # name: (attention stand-in,)
    "one program per KV head, tile after tile": (without_tickets,),
    "tiles side by side, the last to finish combines": (None,),
    "a minimal kernel": (minimal_attention,),
}


def main() -> None:
    args, model, bw, roofline = load_for_variants(__doc__.splitlines()[0])
    decoders = build_variants(model, VARIANTS, ())
    rows = {v: {"variant": v, "tickets": fn is None} for v, (fn,) in VARIANTS.items()}
    time_variants(decoders, rows, roofline)
    save_variants("attention_tickets", __doc__.splitlines()[0], args, bw, roofline, rows)


if __name__ == "__main__":
    main()
