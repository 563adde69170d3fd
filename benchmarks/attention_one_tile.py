"""The decode-attention kernel at batch 1 on a short cache with one tile over the whole cache (no loop over tiles)
against tiles of 128 positions walked one after another; GLM-4-9B (random weights) on the batch-1 fast path, bf16, one
GPU, one run. Variants take turns, three rounds. Per variant: the CUDA graph of one step replayed back to back (µs a
step) at a 40-, 160- and 280-token cache, and ``decode_speed`` (tok/s of the token loop), best round, against the
roofline of the same run; greedy tokens against the first variant's. "a minimal kernel" stands in for attention (a
kernel that only copies q, benchmarks/step_roles.py): what attention could still gain.
The kernel is run without tickets (``step_roles.without_tickets``): one program walks the cache, as it did when
these results were measured; the decoders now split a short cache into tiles side by side (attention_tickets.py).

    PYTHONPATH=.:benchmarks python benchmarks/attention_one_tile.py --checkpoint /tmp/glm9b
Writes benchmarks/results/attention_one_tile.json (and to $OUT).
"""

from __future__ import annotations

from step_roles import build_variants, load_for_variants, minimal_attention, save_variants, time_variants, without_tickets

VARIANTS = {  # name: (SHORT_TILE, attention stand-in)
    "tiles of 128 x 8 warps": ((128, 8), without_tickets),
    "one tile of 512 x 16 warps": ((512, 16), without_tickets),
    "one tile of 512 x 32 warps": ((512, 32), without_tickets),
    "a minimal kernel": ((128, 8), minimal_attention),
}


def main() -> None:
    args, model, bw, roofline = load_for_variants(__doc__.splitlines()[0])
    decoders = build_variants(model, VARIANTS, ("SHORT_TILE",))
    rows = {v: {"variant": v, "tile": list(t)} for v, (t, _) in VARIANTS.items()}
    time_variants(decoders, rows, roofline)
    save_variants("attention_one_tile", __doc__.splitlines()[0], args, bw, roofline, rows)


if __name__ == "__main__":
    main()
