"""Short caches split over more programs? GLM-4-9B batch-1 decode (random weights, bf16, one GPU, one run) with
glmkit's decode attention as it is (a cache of at most ``ONE_SPLIT_MAX`` positions: one program per KV head, no
combine) and with every cache split by ``split_length``'s rule (at 288 positions: 64 per program, five programs
per KV head, then the combine kernel).

    PYTHONPATH=. python benchmarks/attention_split.py --checkpoint /tmp/glm9b    # about 1 minute on an H200
Writes benchmarks/results/attention_split.json (and to $OUT).
"""

from __future__ import annotations

import argparse

import glmkit.attention
from glmkit.bench import bytes_read_per_token, copy_bandwidth, load_random_9b, measure_decode, save_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    model = load_random_9b(args.checkpoint)
    bw = copy_bandwidth()
    result = {"what": __doc__.splitlines()[0], "roofline_tok_s": bw / bytes_read_per_token(model), "rows": []}
    default = glmkit.attention.ONE_SPLIT_MAX
    for one_split_max in (default, 0, default):
        glmkit.attention.ONE_SPLIT_MAX = one_split_max
        measure_decode(model, "fast", 1, 32, 32)
        row = {"one_split_max": one_split_max, **measure_decode(model, "fast", 1, 32, args.new_tokens)}
        result["rows"].append(row)
        print(row, flush=True)
        save_result("attention_split", result)
    glmkit.attention.ONE_SPLIT_MAX = default


if __name__ == "__main__":
    main()
