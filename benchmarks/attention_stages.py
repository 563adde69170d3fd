"""The decode-attention kernel at batch 1 on a short cache with its loop over tiles software-pipelined as Triton
does by default (the next tiles' loads issued, through shared memory, before the first tile's product) or not at
all (``glmkit.attention.SHORT_STAGES = 1``: 1208 sm_90 instructions against 1416, 40 KB of shared memory against
135 KB); GLM-4-9B (random weights) on the batch-1 fast path, one GPU, one run. Variants take turns, three rounds.
Per variant: the CUDA graph of one step replayed back to back (µs a step) at a 40-, 160- and 280-token cache, and
``decode_speed`` (tok/s of the token loop), best round, against the roofline of the same run; greedy tokens against
the first variant's. "a minimal kernel" stands in for attention (a kernel that only copies q,
benchmarks/step_roles.py).

    PYTHONPATH=.:benchmarks python benchmarks/attention_stages.py --checkpoint /tmp/glm9b [--precision fp16]
Writes benchmarks/results/attention_stages.json (attention_stages_fp16.json; and to $OUT).
"""

from __future__ import annotations

import argparse

import torch
from step_roles import build, minimal_attention, replay_us

import glmkit.attention
from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

PROMPT, NEW, ROUNDS, POSITIONS = 32, 256, 3, (40, 160, 280)
VARIANTS = {  # name: (SHORT_STAGES, SHORT_AHEAD, attention stand-in)
    "pipelined (Triton's default)": (None, False, None),
    "not pipelined (1 stage)": (1, False, None),
    "1 stage, the next tile read ahead": (1, True, None),
    "a minimal kernel": (None, False, minimal_attention),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    args = ap.parse_args()
    bw = copy_bandwidth()
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ensure_random_checkpoint(args.checkpoint)
    model = load_precision(args.checkpoint, args.precision, device_map="cuda:0")
    roofline = bw / bytes_read_per_token(model)
    defaults, decoders = (glmkit.attention.SHORT_STAGES, glmkit.attention.SHORT_AHEAD), {}
    for v, (stages, ahead, stand_in) in VARIANTS.items():
        glmkit.attention.SHORT_STAGES, glmkit.attention.SHORT_AHEAD = stages, ahead
        decoders[v] = build(model, stand_in)  # captured with these settings (read at launch)
    glmkit.attention.SHORT_STAGES, glmkit.attention.SHORT_AHEAD = defaults
    rows = {v: {"variant": v, "stages": stages, "ahead": ahead, "replay_us": {p: [] for p in POSITIONS},
                "decode_tok_s": []} for v, (stages, ahead, _) in VARIANTS.items()}
    for _ in range(ROUNDS):
        for v, decoder in decoders.items():
            for p in POSITIONS:
                decoder.decode_step(torch.tensor([5], device="cuda"), p)
                rows[v]["replay_us"][p].append(replay_us(decoder.stages[0].graphs[1]))
            rows[v]["decode_tok_s"].append(decoder.tokens_per_second(PROMPT, NEW)["decode_tok_s"])
    first = next(iter(decoders))
    reference = decoders[first].generate(ids, 32, ignore_eos=True)[0, PROMPT:].tolist()
    for v, decoder in decoders.items():
        row = rows[v]
        row["best_replay_us"] = {p: min(t) for p, t in row["replay_us"].items()}
        row["best_tok_s"] = max(row["decode_tok_s"])
        row["fraction_of_roofline"] = row["best_tok_s"] / roofline
        tokens = decoder.generate(ids, 32, ignore_eos=True)[0, PROMPT:].tolist()
        row["tokens_as_first"], row["of"] = sum(a == b for a, b in zip(tokens, reference)), len(reference)
        print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
               if k not in ("replay_us", "decode_tok_s")}, flush=True)
    save_result(f"attention_stages{'_fp16' if args.precision == 'fp16' else ''}",
                {"what": __doc__.splitlines()[0], "precision": args.precision, "copy_bandwidth_bytes_s": bw,
                 "roofline_tok_s": roofline, "rounds": ROUNDS, "rows": list(rows.values())})


if __name__ == "__main__":
    main()
