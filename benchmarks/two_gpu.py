"""Two GPUs emulated as 12 GiB cards (an RTX 3060 each): runs 1 and 2 of the multi-GPU issue.

1. Notebook 02's manual 20/20 split, accelerate's "auto" map and glmkit's KV-aware map (notebook 03) load
   GLM-4-9B-Chat (random weights, bf16) and generate at an 8K context; each card's peak against the planner.
2. The longest prompt each approach survives: plain ``generate()`` with accelerate's "auto" map against
   glmkit's KV-aware map + chunked prefill, next to the planner's limits (planned: 11,040 vs 131,072 tokens).

Each card is capped with ``torch.cuda.set_per_process_memory_fraction``; plans use no CUDA-context share, since
the cap limits PyTorch's allocator only. Needs a machine with 2 GPUs.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/two_gpu.py --checkpoint /tmp/glm9b
Writes benchmarks/results/two_gpu.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

from glmkit.bench import save_result, try_generate
from glmkit.models import ensure_random_checkpoint

CARD = 12 * 2**30
CARDS = [CARD, CARD]
MAX_MEMORY = {0: CARD, 1: CARD}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--maps-context", type=int, default=8192)
    ap.add_argument("--plain", nargs="+", type=int, default=[8192, 11000, 12288, 16384])
    ap.add_argument("--chunked", nargs="+", type=int, default=[32768, 65536, 98304, 131000])
    ap.add_argument("--chunk", type=int, default=2048)
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig

    from glmkit.device_map import DeviceMapError, split_layers
    from glmkit.loading import load_model
    from glmkit.placement import kv_aware_device_map
    from glmkit.planning import max_context, plan_memory

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"two_gpu.py needs two GPUs; this machine has {torch.cuda.device_count()}.")
    ensure_random_checkpoint(args.checkpoint)
    config = AutoConfig.from_pretrained(args.checkpoint)
    for i in (0, 1):
        torch.cuda.set_per_process_memory_fraction(CARD / torch.cuda.get_device_properties(i).total_memory, i)
    result: dict[str, Any] = {"maps": [], "longest": []}

    def save() -> None:
        save_result("two_gpu", {"method": "each card capped at 12 GiB (set_per_process_memory_fraction); bf16; plans "
                                          "with cuda_context=0; peaks = max_memory_reserved per card", **result})

    def load(device_map: Any) -> torch.nn.Module:
        gc.collect()
        torch.cuda.empty_cache()
        if device_map == "auto":
            return load_model(args.checkpoint, dtype=torch.bfloat16, device_map="auto", max_memory=MAX_MEMORY)
        return load_model(args.checkpoint, dtype=torch.bfloat16, device_map=device_map)

    def generate(model: torch.nn.Module, prompt_len: int, new_tokens: int, chunk: int | None) -> dict[str, Any]:
        for i in (0, 1):
            torch.cuda.reset_peak_memory_stats(i)
        ids = torch.randint(0, 1000, (1, prompt_len), device="cuda:0")
        row = try_generate(model, ids, new_tokens, chunk)
        return row | {"peak_reserved": [torch.cuda.max_memory_reserved(i) for i in (0, 1)]}

    # 1. the maps of notebooks 02 and 03 at an 8K context
    maps = {"manual 20/20 (notebook 02)": split_layers(config, layers_per_device=[20, 20]),
            "accelerate auto": "auto",
            "glmkit KV-aware (notebook 03)": kv_aware_device_map(config, CARDS, context_len=args.maps_context,
                                                                 cuda_context=0)}
    for name, device_map in maps.items():
        model = load(device_map)
        placed = dict(model.hf_device_map)
        plan = plan_memory(config, CARDS, device_map=placed, context_len=args.maps_context, cuda_context=0)
        row = {"map": name, "context": args.maps_context, "planned": [d.total for d in plan.devices],
               "layers": [sum(v == i for k, v in placed.items() if ".layers." in k) for i in (0, 1)],
               **generate(model, args.maps_context - 32, 32, None)}
        row["measured_over_planned"] = [m / p for m, p in zip(row["peak_reserved"], row["planned"])]
        result["maps"].append(row)
        print(row, flush=True)
        save()
        del model

    # 2. the longest prompt: plain generate() on accelerate's map vs chunked prefill on glmkit's map
    model = load("auto")
    predicted = max_context(config, CARDS, device_map=dict(model.hf_device_map), cuda_context=0)
    for n in args.plain:
        row = {"mode": "plain generate(), accelerate auto", "prompt_len": n, "planner_max_context": predicted,
               **generate(model, n, 4, None)}
        result["longest"].append(row)
        print(row, flush=True)
        save()
    del model
    predicted = max_context(config, CARDS, prefill_chunk=args.chunk, cuda_context=0)
    for n in args.chunked:
        row = {"mode": f"chunked prefill ({args.chunk}), glmkit KV-aware", "prompt_len": n,
               "planner_max_context": predicted}
        try:
            model = load(kv_aware_device_map(config, CARDS, context_len=n + 4, prefill_chunk=args.chunk,
                                             cuda_context=0))
        except DeviceMapError as exc:  # the planner says it cannot fit: recorded, not run
            row |= {"ok": False, "map_error": str(exc)[:300]}
        else:
            row |= generate(model, n, 4, args.chunk)
            del model
        result["longest"].append(row)
        print(row, flush=True)
        save()


if __name__ == "__main__":
    main()
