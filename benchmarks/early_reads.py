"""Reading before waiting: the batch-1 fast path of GLM-4-9B (random weights; bf16 and fp16) with glmkit's decode
attention reading its first K/V tile of the cache before it waits for q/k/v (``glmkit.attention.PRELOAD``, the
default) and after, under programmatic dependent launch (the default). One GPU, one run; the variants take turns,
three rounds, so that clock and temperature drift touch them alike. Per variant: the CUDA graph of one step replayed back
to back (µs a token, around a 160-token cache) and ``decode_speed`` (tok/s of the token loop, sampling included), best
round, against the roofline of the same run (copy bandwidth / bytes a token reads); and its greedy tokens against
the variant that reads after waiting. (The committed run also timed o_proj reading its first weights before waiting
for attention: slower in both precisions, removed.)

    PYTHONPATH=. python benchmarks/early_reads.py --checkpoint /tmp/glm9b     # about 3 minutes on an H200
Writes benchmarks/results/early_reads.json (and to $OUT).
"""

from __future__ import annotations

import argparse

import torch
from step_roles import step_us

import glmkit.attention
from glmkit.bench import bytes_read_per_token, copy_bandwidth, save_result
from glmkit.fast_decode import FastDecoder
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

VARIANTS = {"neither": False, "attention reads early": True}
PROMPT, NEW, ROUNDS = 32, 256, 3


def build(model: torch.nn.Module, preload: bool) -> FastDecoder:
    """A decoder whose graphs were captured with this setting (read when the kernel is launched)."""
    glmkit.attention.PRELOAD = preload
    decoder = FastDecoder(model, max_len=PROMPT + NEW + 8)
    decoder.tokens_per_second(PROMPT, 4)  # warm-up: captures the graphs
    return decoder


def replay_us(decoder: FastDecoder) -> float:
    """µs a step of the captured batch-1 graph takes, replayed back to back around position 160 (``step_us``)."""
    return step_us(decoder, 160)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--dtypes", default="bf16,fp16")
    args = ap.parse_args()
    bw = copy_bandwidth()
    result = {"what": __doc__.splitlines()[0], "copy_bandwidth_bytes_s": bw, "rounds": ROUNDS, "dtypes": {}}
    ids = torch.randint(0, 1000, (1, PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ensure_random_checkpoint(args.checkpoint)
    for name in args.dtypes.split(","):
        model = load_precision(args.checkpoint, name, device_map="cuda:0")
        roofline = bw / bytes_read_per_token(model)
        decoders = {v: build(model, preload) for v, preload in VARIANTS.items()}
        glmkit.attention.PRELOAD = True  # the default again
        rows = {v: {"variant": v, "attention_reads_early": p, "uses_pdl": decoders[v].uses_pdl(1), "replay_us": [],
                    "decode_tok_s": []} for v, p in VARIANTS.items()}
        for _ in range(ROUNDS):
            for v, decoder in decoders.items():
                rows[v]["replay_us"].append(replay_us(decoder))
                rows[v]["decode_tok_s"].append(decoder.tokens_per_second(PROMPT, NEW)["decode_tok_s"])
        reference = decoders["neither"].generate(ids, 32, ignore_eos=True)[0, PROMPT:].tolist()
        for v, decoder in decoders.items():
            row = rows[v]
            row["best_replay_us"], row["best_tok_s"] = min(row["replay_us"]), max(row["decode_tok_s"])
            row["fraction_of_roofline"] = row["best_tok_s"] / roofline
            row["replay_fraction_of_roofline"] = 1e6 / row["best_replay_us"] / roofline
            tokens = decoder.generate(ids, 32, ignore_eos=True)[0, PROMPT:].tolist()
            row["tokens_as_neither"] = sum(a == b for a, b in zip(tokens, reference))
            row["of"] = len(reference)
            print(name, {k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
                         if k not in ("replay_us", "decode_tok_s")}, flush=True)
        result["dtypes"][name] = {"roofline_tok_s": roofline, "rows": list(rows.values())}
        save_result("early_reads", result)
        del decoders, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
