"""The 4-bit batch-1 step with q/k/v leaving SMs to the decode attention (``glmkit.gemv4bit_one.LEAVE_SMS_MAX``), the
attention's early tiles (``glmkit.attention.EARLY_TILE``) and the first norm's stream in one kernel
(``glmkit.gemv4bit.normed_stream``), each against the step without it, with bf16 beside them: GLM-4-9B (random
weights) on one GPU, one run.

Variants (taking turns, three rounds): ``nf4, before`` (q/k/v on every SM, the attention's tiles of 128 positions side
by side, the first norm's stream made by five PyTorch kernels), then each change added in turn, the last being the
default; ``bf16`` (its default decoder: its q/k/v leaves no SM, so its attention keeps ``TICKET_TILE``) and ``bf16,
tiles of 256`` (``EARLY_TILE`` without SMs left: what the attention's tile does alone). Per variant: the CUDA graph
of one step replayed back to back (µs, around 160 cached tokens) and ``decode_speed`` (tok/s of the token loop), best
round, against bf16 in the same run; greedy tokens against the default's.

    PYTHONPATH=.:benchmarks python benchmarks/nf4_leave_sms.py --checkpoint /tmp/glm9b    # about 2 minutes on an H200
Writes benchmarks/results/nf4_leave_sms.json (or --name; and to $OUT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from nf4_fused import PROMPT, against_reference, best_rounds, report, start, take_turns, warmed

import glmkit.fast_decode
from glmkit import attention, gemv4bit_one
from glmkit.gemv4bit import normed_stream_torch

# variant: (precision, what it turns off or on)
VARIANTS = {"nf4, before": ("nf4", {"leave": False, "tile": attention.TICKET_TILE, "one_kernel_stream": False}),
            "nf4, SMs left to the attention": ("nf4", {"leave": True, "tile": attention.TICKET_TILE,
                                                       "one_kernel_stream": False}),
            "nf4, SMs left, early tiles": ("nf4", {"leave": True, "tile": attention.EARLY_TILE,
                                                   "one_kernel_stream": False}),
            "nf4 (default): also the first stream in one kernel": ("nf4", {}),
            "bf16": ("bf16", {}),
            "bf16, tiles of 256": ("bf16", {"bf16_tile": attention.EARLY_TILE})}
DEFAULT = "nf4 (default): also the first stream in one kernel"


@contextlib.contextmanager
def settings(variant: str) -> Iterator[None]:
    """The variant's settings for the block (read at launch: its graphs keep them)."""
    options = VARIANTS[variant][1]
    before = (gemv4bit_one.sms_left, attention.EARLY_TILE, attention.TICKET_TILE, attention.SHORT_TILE,
              glmkit.fast_decode.normed_stream)
    if not options.get("leave", True):
        gemv4bit_one.sms_left = lambda device, programs: 0
    attention.EARLY_TILE = options.get("tile", attention.EARLY_TILE)
    if "bf16_tile" in options:
        attention.TICKET_TILE = attention.SHORT_TILE = options["bf16_tile"]
    if not options.get("one_kernel_stream", True):
        glmkit.fast_decode.normed_stream = normed_stream_torch  # (as it was made before: five PyTorch kernels)
    try:
        yield
    finally:
        (gemv4bit_one.sms_left, attention.EARLY_TILE, attention.TICKET_TILE, attention.SHORT_TILE,
         glmkit.fast_decode.normed_stream) = before


def main() -> None:
    args, models, bw, rooflines = start(__doc__.splitlines()[0], "nf4_leave_sms")
    decoders = {}
    for v, (p, _) in VARIANTS.items():
        with settings(v):
            decoders[v] = warmed(models[p])
    rows = {v: {"variant": v, "precision": p, "options": {k: list(o) if isinstance(o, tuple) else o
                                                          for k, o in options.items()},
                "uses_pdl": decoders[v].uses_pdl(1), "replay_us": [], "decode_tok_s": []}
            for v, (p, options) in VARIANTS.items()}
    take_turns(decoders, rows, around=settings)
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    against_reference(decoders, rows, ids, DEFAULT, "tokens_as_default", "step_logits_rel_diff_to_default",
                      around=settings)
    best_rounds(rows, rooflines)
    report(args.name, __doc__.splitlines()[0], rows, bw, rooflines)


if __name__ == "__main__":
    main()
