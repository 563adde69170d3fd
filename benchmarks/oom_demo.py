"""A real out-of-memory: GLM-4-9B-Chat in bf16 on a GPU emulated as a 12 GiB card, and glmkit's explanation.

    python benchmarks/oom_demo.py --checkpoint /tmp/glm9b --budget-gib 12
Writes benchmarks/results/oom_12gib.json (and to $OUT). Run it in a fresh process.
"""

from __future__ import annotations

import argparse

from glmkit.bench import save_result
from glmkit.models import ensure_random_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="/tmp/glm9b")
    ap.add_argument("--budget-gib", type=float, default=12.0)
    args = ap.parse_args()
    import torch

    from glmkit.loading import load_model
    from glmkit.monitor import explain_oom
    from glmkit.planning import plan_memory

    ensure_random_checkpoint(args.checkpoint)
    total = torch.cuda.get_device_properties(0).total_memory
    budget = int(args.budget_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(budget / total, 0)
    record = {"budget_bytes": budget, "card_total_bytes": total}
    try:
        model = load_model(args.checkpoint, dtype=torch.bfloat16, device_map="cuda:0")
        record["loaded"] = True
        del model
    except torch.OutOfMemoryError as exc:
        from transformers import AutoConfig

        plan = plan_memory(AutoConfig.from_pretrained(args.checkpoint), {0: budget}, context_len=4096)
        explanation = explain_oom(exc, plan)
        record |= {"loaded": False, "exception": type(exc).__name__, "message": str(exc),
                   "allocated_at_oom": torch.cuda.memory_allocated(), "explanation": repr(explanation),
                   "plan": str(plan)}
        print(repr(explanation))
    except Exception as exc:  # record what a user would see if the loader wraps the OOM
        record |= {"loaded": False, "exception": type(exc).__name__, "message": str(exc)[:2000]}
    save_result(f"oom_{int(args.budget_gib)}gib", record)


if __name__ == "__main__":
    main()
