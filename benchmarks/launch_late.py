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

import argparse

import torch
from step_roles import build, minimal_attention, replay_us

import glmkit.attention
from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

PROMPT, NEW, ROUNDS, POSITIONS = 32, 256, 3, (40, 160, 280)
VARIANTS = {  # name: (attention launches o_proj late, attention stand-in)
    "launched first thing": (False, None),
    "launched late": (True, None),
    "a minimal kernel": (False, minimal_attention),
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
    default, decoders = glmkit.attention.LAUNCH_NEXT_LATE, {}
    for v, (late, stand_in) in VARIANTS.items():
        glmkit.attention.LAUNCH_NEXT_LATE = late
        decoders[v] = build(model, stand_in)  # captured with this setting (read at launch)
    glmkit.attention.LAUNCH_NEXT_LATE = default
    rows = {v: {"variant": v, "launched_late": late, "replay_us": {p: [] for p in POSITIONS}, "decode_tok_s": []}
            for v, (late, _) in VARIANTS.items()}
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
    save_result(f"launch_late{'_fp16' if args.precision == 'fp16' else ''}",
                {"what": __doc__.splitlines()[0], "precision": args.precision, "copy_bandwidth_bytes_s": bw,
                 "roofline_tok_s": roofline, "rounds": ROUNDS, "rows": list(rows.values())})


if __name__ == "__main__":
    main()
