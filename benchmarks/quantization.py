"""GLM-4-9B-Chat (random weights) in every precision on one GPU: weights on the card and decode speed.

For bf16, fp16, int8, nf4, nf4-dq, fp4, fp4-dq: load through glmkit (bitsandbytes quantizes on load), measure
the bytes PyTorch holds for the weights next to the planner's figure, and plain generate() decode tok/s at batch
1 and 8 (32-token prompt, 32 new tokens, median of 3 runs after a warm-up). Random weights: quality is
measured on the trained tiny model in notebooks/04_quantization.ipynb, not here.

    python benchmarks/quantization.py --checkpoint /tmp/glm9b
Writes benchmarks/results/quantization_9b.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import gc

from glmkit.bench import decode_tokens_per_second, median_of, save_result
from glmkit.models import ensure_random_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--precisions", nargs="+")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig

    from glmkit.planning import unit_weight_bytes
    from glmkit.quantization import PRECISIONS, load_precision

    ensure_random_checkpoint(args.checkpoint)
    config = AutoConfig.from_pretrained(args.checkpoint)
    rows = []
    for precision in args.precisions or list(PRECISIONS):
        dtype, quantization = PRECISIONS[precision]
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = load_precision(args.checkpoint, precision, device_map="cuda:0")
        row = {"precision": precision, "dtype": dtype, "quantization": quantization,
               "loaded_bytes": torch.cuda.memory_allocated() - before,
               "planned_bytes": sum(unit_weight_bytes(config, dtype, quantization).values()), "tok_s": {}}
        for batch in args.batches:
            decode_tokens_per_second(model, 8, batch_size=batch)  # warm-up
            row["tok_s"][str(batch)] = median_of(
                lambda b=batch, m=model: decode_tokens_per_second(m, args.new_tokens, batch_size=b))
        rows.append(row)
        print({k: (round(v / 2**30, 3) if isinstance(v, int) and v > 2**20 else v) for k, v in row.items()}, flush=True)
        del model
        save_result("quantization_9b", {
            "method": f"plain generate(), dynamic cache, 32-token prompt, {args.new_tokens} new tokens, median of 3 runs "
                      "after a warm-up; tok/s summed over the batch; loaded_bytes = torch.cuda.memory_allocated() delta",
            "precisions": rows,
        })


if __name__ == "__main__":
    main()
