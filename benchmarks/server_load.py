"""Load on the OpenAI-compatible server: requests/s and tokens/s for 1, 4 and 16 concurrent clients.

Starts ``glmkit.server`` on loopback in this process (the tiny trained GLM on the CPU by default, or
``--checkpoint`` on a GPU), then each of N client threads sends requests with the official ``openai`` client
for a fixed time. Tokens are the server's ``usage.completion_tokens``.

    python benchmarks/server_load.py                                # tiny model, CPU
    python benchmarks/server_load.py --checkpoint /tmp/glm9b --name server_load_gpu
    python benchmarks/server_load.py --checkpoint /tmp/glm9b --device-map 20,20 --name server_load_2gpu
    python benchmarks/server_load.py --random-9b --fast-decode --name server_load_gpu_fast
Writes benchmarks/results/NAME.json (and to $OUT).
"""

from __future__ import annotations

import argparse
import threading
import time

from glmkit.bench import save_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="default: the tiny trained GLM")
    ap.add_argument("--random-9b", action="store_true",
                    help="GLM-4-9B-Chat with random weights built on the GPU (no checkpoint needed; tiny tokenizer)")
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device-map", help="with --checkpoint: auto, or layers per GPU like 20,20 (as glmkit serve)")
    ap.add_argument("--fast-decode", action="store_true", help="Engine(fast_decode=True), as glmkit serve --fast-decode")
    ap.add_argument("--name", default="server_load_cpu")
    args = ap.parse_args()
    import openai
    import torch

    from glmkit.engine import Engine
    from glmkit.loading import load_model, load_tokenizer
    from glmkit.models import TRAINED_TINY_DIR, model_label
    from glmkit.server import ServerThread, create_app

    path = args.checkpoint or TRAINED_TINY_DIR
    if args.random_9b:
        from transformers import GenerationConfig, GlmForCausalLM

        from glmkit.models import glm4_9b_chat_config, tiny_glm_config

        torch.set_default_dtype(torch.bfloat16)
        config = glm4_9b_chat_config()
        config.eos_token_id = tiny_glm_config().eos_token_id  # the tiny tokenizer's end tokens
        with torch.device("cuda"):
            model = GlmForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
        model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=0)
        path = "GLM-4-9B-Chat architecture, random weights (bf16)"
    else:
        from glmkit.cli import device_map_option

        model = load_model(path, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
                           device_map=device_map_option(args.device_map, str(path)))
    engine = Engine(model, load_tokenizer(None if args.random_9b else path), max_batch_size=max(args.clients),
                    max_context=1024, fast_decode=args.fast_decode)
    server = ServerThread(create_app(engine)).start()
    prompts = ["Tell me about GPUs.", "What is a device map?", "How do I split the model over two GPUs?",
               "What limits decode speed?"]
    warm = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
    for p in prompts:  # warm-up: first calls of the model, the server and the client are slow
        warm.chat.completions.create(model="glm-4-9b-chat", max_tokens=8, messages=[{"role": "user", "content": p}])
    rows = []
    for n in args.clients:
        # warm-up at this level: n requests at once, so that a batch of this size (and with --fast-decode its
        # decoder: compile, graph capture) is built before the clock starts
        warm_up = [threading.Thread(target=lambda p=p: warm.chat.completions.create(
            model="glm-4-9b-chat", max_tokens=8, messages=[{"role": "user", "content": p}]))
            for p in (prompts * n)[:n]]
        for t in warm_up:
            t.start()
        for t in warm_up:
            t.join()
        fast_before = engine.fast_requests
        counts = {"requests": 0, "tokens": 0}
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def client(i: int, stop_at: float = stop_at, counts: dict = counts, lock: threading.Lock = lock) -> None:
            c = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
            while time.perf_counter() < stop_at:
                r = c.chat.completions.create(model="glm-4-9b-chat", max_tokens=args.max_tokens, temperature=0.8,
                                              seed=i, messages=[{"role": "user", "content": prompts[i % len(prompts)]}])
                with lock:
                    counts["requests"] += 1
                    counts["tokens"] += r.usage.completion_tokens

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        rows.append({"clients": n, "seconds": seconds, "requests": counts["requests"], "tokens": counts["tokens"],
                     "requests_per_s": counts["requests"] / seconds, "tokens_per_s": counts["tokens"] / seconds,
                     "largest_batch": engine.largest_batch, "fast_path_requests": engine.fast_requests - fast_before})
        print(rows[-1], flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["tokens_per_s_vs_1_client"] = r["tokens_per_s"] / base
    server.stop()
    engine.close()
    save_result(args.name, {"model": model_label(path), "device_map": args.device_map, "fast_decode": args.fast_decode,
                            "method": f"{args.seconds:.0f} s per level after a warm-up of as many "
                                      f"concurrent 8-token requests, max_tokens {args.max_tokens}, temperature 0.8, "
                                      "openai client threads on loopback", "levels": rows})


if __name__ == "__main__":
    main()
