"""Train the tiny GLM-4 shipped in ``glmkit/assets/tiny-glm-trained`` on the kit's own corpus (CPU, minutes).

    python scripts/train_tiny.py                 # ~17 minutes on 2 cores; writes the checkpoint + training_log.json
    python scripts/train_tiny.py --steps 5 --out /tmp/t   # a quick run (used by the tests)
    python scripts/train_tiny.py --device cuda --seed 3 --out /tmp/t3   # 2.4 minutes on an H100 shared by 8 trainings

The corpus (glmkit/corpus.py) is generated from templates: questions and answers about running GLM-4 on GPUs
in GLM-4's chat format, plus templated sentences and lines of a fixed order-2 Markov chain sampled anew for every
step. Text from a seed training never uses is held out, so the perplexity measured on it
(notebooks/04_quantization.ipynb) is a real number, not a memorised one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glmkit.corpus import chain_lines, chat_texts, corpus_lines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "glmkit" / "assets" / "tiny-glm-trained"
CHAIN_PER_STEP = 96


def training_texts(step: int) -> list[str]:
    """Fresh text for every step: all chat turns, newly sampled templated sentences and lines of the order-2
    chain (seed 1000 + step).

    Sampling anew each step keeps the model from memorising particular combinations, so it learns the
    real odds of each slot (which GPU, which verb...). The templated sentences alone hardly need the layers
    that get quantized (their tokens are either certain or a uniform pick): 4-bit moved their perplexity by
    +-0.06% at random (8 trainings). The chain's graded, context-dependent odds are computed by the attention
    and MLP weights, so quantizing them costs perplexity there (fp4: higher in 8 of 8 trainings).
    """
    return chat_texts() + corpus_lines(seed=1000 + step, repeats=12) + chain_lines(seed=1000 + step, count=CHAIN_PER_STEP)


def batch_ids(tok, step: int, seq: int, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    texts = training_texts(step)
    order = torch.randperm(len(texts), generator=gen).tolist()
    ids = [i for k in order for i in tok(texts[k] + "<|endoftext|>", add_special_tokens=False).input_ids]
    while len(ids) < seq * batch:
        ids = ids + ids
    return torch.tensor(ids[: seq * batch]).view(batch, seq)


def train(out: Path = OUT, steps: int = 2400, seq: int = 128, batch: int = 16, lr: float = 3e-3, seed: int = 0,
          device: str = "cpu") -> dict:
    from transformers import AutoTokenizer, GenerationConfig, GlmForCausalLM

    from glmkit.models import TOKENIZER_DIR, tiny_glm_config

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = tiny_glm_config()
    model = GlmForCausalLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    log = {"steps": [], "loss": [], "seconds": [], "tokens_per_step": seq * batch,
           "config": {"seq": seq, "batch": batch, "lr": lr, "seed": seed, "params": model.num_parameters()}}
    start = time.perf_counter()
    for step in range(steps):
        x = batch_ids(tok, step, seq, batch).to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            log["steps"].append(step)
            log["loss"].append(round(loss.item(), 4))
            log["seconds"].append(round(time.perf_counter() - start, 1))
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.1f} s", flush=True)
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                               do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train(args.out, steps=args.steps, seq=args.seq, batch=args.batch, seed=args.seed, device=args.device)


if __name__ == "__main__":
    main()
