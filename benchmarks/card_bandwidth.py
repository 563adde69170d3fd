"""Why H200s differ in bf16's share of its roofline: the card's copy bandwidth (the roofline's yardstick, read +
written), the bandwidth at which glmkit's GEMV reads a weight the size of GLM-4-9B's lm_head (what a decode step
does: it only reads), and the bf16 fast path of GLM-4-9B (random weights) against the rooflines of both, one run.

Bandwidths: the best of ROUNDS; the read (``glmkit.bench.read_bandwidth``) a CUDA graph of 10 launches of
``glmkit.gemv`` on a [151552, 4096] bf16 weight (1.24 GB, lm_head's shape, whose launch shape is tuned). Decode: µs a
replayed step at a 160-token cache and decode tok/s (``decode_speed``), best of ROUNDS.

    PYTHONPATH=.:benchmarks python benchmarks/card_bandwidth.py --checkpoint /tmp/glm9b    # about a minute on an H200
Writes benchmarks/results/card_bandwidth_<the card's UUID, first 8 digits>.json (and to $OUT): one file a card, which
``glmkit.results.card_bandwidth_table`` reads back with the others.
"""

from __future__ import annotations

import argparse

import torch
from step_roles import step_us

from glmkit.bench import bytes_read_per_token, copy_bandwidth, read_bandwidth, save_result
from glmkit.fast_decode import FastDecoder
from glmkit.models import ensure_random_checkpoint
from glmkit.quantization import load_precision

ROUNDS, PROMPT, NEW = 5, 32, 256
READ_SHAPE = (151552, 4096)  # GLM-4-9B's lm_head: its launch shape is tuned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    args = ap.parse_args()
    uuid = str(torch.cuda.get_device_properties(0).uuid).removeprefix("GPU-")
    copies = [copy_bandwidth() for _ in range(ROUNDS)]
    reads = [read_bandwidth(rows=READ_SHAPE[0], columns=READ_SHAPE[1], rounds=1) for _ in range(ROUNDS)]
    copy, read = max(copies), max(reads)
    ensure_random_checkpoint(args.checkpoint)
    model = load_precision(args.checkpoint, "bf16", device_map="cuda:0")
    nbytes = bytes_read_per_token(model)
    decoder = FastDecoder(model, max_len=PROMPT + NEW + 48)
    decoder.tokens_per_second(PROMPT, 4)
    replays = [step_us(decoder, 160) for _ in range(ROUNDS)]
    rates = [decoder.tokens_per_second(PROMPT, NEW)["decode_tok_s"] for _ in range(ROUNDS)]
    result = {"what": __doc__.splitlines()[0], "rounds": ROUNDS, "gpu_uuid": uuid, "copy_bandwidth_bytes_s": copy,
              "read_bandwidth_bytes_s": read, "copy_rounds_bytes_s": copies, "read_rounds_bytes_s": reads,
              "read_shape": list(READ_SHAPE), "read_weight_bytes": READ_SHAPE[0] * READ_SHAPE[1] * 2,
              "read_over_copy": read / copy, "bytes_read_per_token": nbytes,
              "copy_roofline_tok_s": copy / nbytes, "read_roofline_tok_s": read / nbytes,
              "replay_us_160": replays, "decode_tok_s": rates, "best_tok_s": max(rates),
              "fraction_of_copy_roofline": max(rates) / (copy / nbytes),
              "fraction_of_read_roofline": max(rates) / (read / nbytes)}
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "what"}, flush=True)
    save_result(f"card_bandwidth_{uuid[:8]}", result)


if __name__ == "__main__":
    main()
